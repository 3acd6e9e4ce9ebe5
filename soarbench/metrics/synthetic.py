"""Randomly initialised weights in each scorer's real file layout, for tests and speed benchmarks.

Every builder writes what the real download would put on disk, so the metric loads it through its own loader:

    write_clip_folder(dir, scale)        transformers CLIPModel folder + processor + tokenizer files (ClipScore,
                                         the aesthetic predictor's encoder): openai/clip-vit-large-patch14's layout
    write_pickscore(root, scale)         (root/PickScore_v1, root/CLIP-ViT-H-14-laion2B-s32B-b79K): model folder
                                         and the separate processor folder PickScore loads its inputs with
    write_hps(root, scale)               (checkpoint, architecture): {"state_dict": open_clip state dict}, and the
                                         open_clip architecture to pass as HPSv2Metric(architecture=...)
    write_aesthetic_head(path, width)    the LAION head under its published keys layers.{0,2,4,6,7}
    write_imagereward(root, scale)       (root/ImageReward, root/bert-base-uncased): ImageReward.pt under BLIP's
                                         own key names + med_config.json, and a WordPiece vocab.txt folder

`scale` is "tiny" (one-layer towers, 32 wide: what the metric tests use) or "real" (the published
architectures: CLIP ViT-L/14 of openai/clip-vit-large-patch14, PickScore's CLIP ViT-H/14, open_clip "ViT-H-14"
for HPS v2.1, the 768-d aesthetic head). Real-scale towers are saved in fp16 by default (the loaders upcast to
fp32), which halves the disk written; the values are random, so scores mean nothing, but the compute per image
is that of the real model.

Tokenizers are built offline from the CLIP BPE vocabulary open_clip ships (soarbench.clip_tokenizer), so no
builder touches the network.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from soarbench.errors import did_you_mean

SCALES = ("tiny", "real")

# openai/clip-vit-large-patch14's and laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json (equal)
OPENAI_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}

# folder / file names under reward_ckpts/ (see manifest.toml)
CLIP_FOLDER = "clip-vit-large-patch14"
PICKSCORE_FOLDER = "PickScore_v1"
PICKSCORE_PROCESSOR_FOLDER = "CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_FILE = "HPS_v2.1_compressed.pt"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
IMAGEREWARD_FOLDER = "ImageReward"
BERT_TOKENIZER_FOLDER = "bert-base-uncased"

# The tiny towers of the metric tests: one layer, 32 wide, 224 px input cut in 32 px patches.
_TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TINY_PROJECTION = 16

# The published towers (transformers CLIPConfig fields).
CLIP_L14 = {
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   patch_size=14),
    "projection_dim": 768,
}
CLIP_H14 = {
    "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
    "vision": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   patch_size=14),
    "projection_dim": 1024,
}

# open_clip model config of the tiny HPS test model (the real one is open_clip's built-in "ViT-H-14")
HPS_TINY = {"embed_dim": 16,
            "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
HPS_TINY_NAME = "soarbench-test-tiny-hps"
HPS_REAL_NAME = "ViT-H-14"

AESTHETIC_REAL_WIDTH = 768  # CLIP ViT-L/14's projection width


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise did_you_mean("synthetic weights scale", scale, SCALES)
    return scale


def _dtype(scale: str, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None else (torch.float16 if scale == "real" else torch.float32)


# --------------------------------------------------------------------------------------- transformers CLIP


def clip_config(scale: str = "tiny", *, family: str = "openai", projection_dim: int | None = None,
                logit_scale: float | None = None):
    """A transformers CLIPConfig. family "openai" (ViT-L/14, quick_gelu) or "laion" (ViT-H/14, gelu: PickScore)."""
    from transformers import CLIPConfig

    from soarbench.clip_tokenizer import CLIP_VOCAB_SIZE

    check_scale(scale)
    if family not in ("openai", "laion"):
        raise did_you_mean("CLIP family", family, ("openai", "laion"))
    act = "quick_gelu" if family == "openai" else "gelu"
    if scale == "tiny":
        text, vision = dict(_TINY_TOWER), dict(_TINY_TOWER, patch_size=32)
        width = TINY_PROJECTION
    else:
        dims = CLIP_L14 if family == "openai" else CLIP_H14
        text, vision, width = dict(dims["text"]), dict(dims["vision"]), dims["projection_dim"]
    extra = {} if logit_scale is None else {"logit_scale_init_value": float(logit_scale)}
    return CLIPConfig(
        text_config=dict(text, hidden_act=act, vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77),
        vision_config=dict(vision, hidden_act=act, image_size=224),
        projection_dim=projection_dim if projection_dim is not None else width,
        **extra,
    )


def write_clip_processor(folder: str | Path) -> Path:
    """preprocessor_config.json and the CLIP tokenizer files (vocab, merges, tokenizer.json and configs)."""
    from transformers import CLIPTokenizer

    from soarbench.clip_tokenizer import write_clip_tokenizer_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(OPENAI_PREPROCESSOR, indent=2))
    write_clip_tokenizer_files(folder)
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77).save_pretrained(folder)
    special = folder / "special_tokens_map.json"
    if not special.exists():  # transformers 5 no longer writes it; the hub folders have it
        special.write_text(json.dumps(SPECIAL_TOKENS))
    return folder


def _write_clip_model(folder: Path, config, seed: int, dtype: torch.dtype) -> None:
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(config)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(folder)  # config.json + model.safetensors, as on the hub
    del model


def write_clip_folder(folder: str | Path, scale: str = "tiny", *, seed: int = 0, projection_dim: int | None = None,
                      dtype: torch.dtype | None = None) -> Path:
    """A random CLIPModel in openai/clip-vit-large-patch14's folder layout (model, processor, tokenizer)."""
    folder = Path(folder)
    config = clip_config(scale, family="openai", projection_dim=projection_dim)
    _write_clip_model(folder, config, seed, _dtype(scale, dtype))
    return write_clip_processor(folder)


def write_pickscore(root: str | Path, scale: str = "tiny", *, seed: int = 0, projection_dim: int | None = None,
                    logit_scale: float | None = None, dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """(model folder, processor folder) under `root` with reward_ckpts/' names: PickScore_v1 (config + weights
    only, as on the hub) and CLIP-ViT-H-14-laion2B-s32B-b79K (preprocessor and tokenizer files only)."""
    root = Path(root)
    model_dir, processor_dir = root / PICKSCORE_FOLDER, root / PICKSCORE_PROCESSOR_FOLDER
    config = clip_config(scale, family="laion", projection_dim=projection_dim, logit_scale=logit_scale)
    _write_clip_model(model_dir, config, seed, _dtype(scale, dtype))
    write_clip_processor(processor_dir)
    return model_dir, processor_dir


# ----------------------------------------------------------------------------------------------- HPS v2.1


def hps_config(scale: str = "tiny") -> dict[str, Any]:
    """The open_clip model config: the tiny test model, or open_clip's own "ViT-H-14"."""
    if check_scale(scale) == "tiny":
        return json.loads(json.dumps(HPS_TINY))
    import open_clip

    return dict(open_clip.get_model_config(HPS_REAL_NAME))


def write_hps(root: str | Path, scale: str = "tiny", *, seed: int = 0,
              dtype: torch.dtype | None = None) -> tuple[Path, str]:
    """(checkpoint, architecture): root/HPS_v2.1_compressed.pt holding {"state_dict": ...} of a random open_clip
    model, and what HPSv2Metric(architecture=...) takes for it: "ViT-H-14" at real scale, else the path of the
    tiny model's config JSON (written beside the checkpoint as soarbench-test-tiny-hps.json)."""
    from soarbench.metrics.hpsv2 import build_model

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = hps_config(scale)
    if scale == "tiny":
        architecture = root / f"{HPS_TINY_NAME}.json"
        architecture.write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = build_model(cfg)
    dtype = _dtype(scale, dtype)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    del model
    checkpoint = root / HPS_FILE
    torch.save({"state_dict": state}, checkpoint)
    return checkpoint, (HPS_REAL_NAME if scale == "real" else str(architecture))


# ----------------------------------------------------------------------------------------- aesthetic head


def aesthetic_head_state(width: int = TINY_PROJECTION, seed: int = 11) -> OrderedDict:
    """Random weights under the published checkpoint's keys: layers.{0,2,4,6,7}.{weight,bias}; the last bias is
    centred on 5 so the output looks like a rating."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"0": (1024, width), "2": (128, 1024), "4": (64, 128), "6": (16, 64), "7": (1, 16)}
    state = OrderedDict()
    for index, (out_f, in_f) in shapes.items():
        state[f"layers.{index}.weight"] = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(out_f, generator=g) * 0.1 + (5.0 if index == "7" else 0.0)
    return state


def write_aesthetic_head(path: str | Path, width: int | None = None, *, scale: str = "tiny",
                         seed: int = 11) -> Path:
    """The head saved with torch.save as the published .pth (a plain state dict); width defaults to the CLIP
    projection width of `scale` (16 tiny, 768 real)."""
    if width is None:
        width = AESTHETIC_REAL_WIDTH if check_scale(scale) == "real" else TINY_PROJECTION
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(aesthetic_head_state(width, seed), path)
    return path


# ------------------------------------------------------------------------------------------------ ImageReward

# A WordPiece vocabulary for the tiny model: BERT's five special tokens first, then a few prompt words.
BERT_TINY_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "blue", "cube", "ball",
                   "##s", "two", "and", ".")
# BLIP_Pretrain(vit=...) + med_config.json sizes. "real" is ImageReward-v1.0: ViT-L/16 at 224 and BERT-base with a
# cross-attention block per layer (446.2 M parameters = the published 1.79 GB ImageReward.pt in fp32).
IMAGEREWARD_SIZES = {
    "tiny": dict(vision_width=128, vision_depth=2, patch=16, image_size=32, text_width=32, text_depth=2,
                 text_heads=2, text_mlp=48, vocab_size=len(BERT_TINY_VOCAB) + 2, max_positions=40),
    "real": dict(vision_width=1024, vision_depth=24, patch=16, image_size=224, text_width=768, text_depth=12,
                 text_heads=12, text_mlp=3072, vocab_size=30524, max_positions=512),
}


def imagereward_med_config(scale: str = "tiny") -> dict[str, Any]:
    """med_config.json as ImageReward ships it (BERT fields + encoder_width + add_cross_attention)."""
    z = IMAGEREWARD_SIZES[check_scale(scale)]
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": z["text_width"], "initializer_range": 0.02,
            "intermediate_size": z["text_mlp"], "layer_norm_eps": 1e-12, "max_position_embeddings": z["max_positions"],
            "model_type": "bert", "num_attention_heads": z["text_heads"], "num_hidden_layers": z["text_depth"],
            "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": z["vocab_size"], "encoder_width": 768,
            "add_cross_attention": True}


def imagereward_state(scale: str = "tiny", seed: int = 0) -> OrderedDict:
    """Random tensors under ImageReward.pt's key names: BLIP_Pretrain under "blip." (its unused vision_proj and
    text_proj included), the reward MLP under "mlp.layers.{0,2,4,6,7}"."""
    z = IMAGEREWARD_SIZES[check_scale(scale)]
    g = torch.Generator().manual_seed(seed)
    vw, tw = z["vision_width"], z["text_width"]

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, width):
        state[f"{prefix}.weight"] = 1 + rand(width, scale=0.1)
        state[f"{prefix}.bias"] = rand(width, scale=0.1)

    def linear(prefix, n_in, n_out):
        state[f"{prefix}.weight"] = rand(n_out, n_in, scale=n_in ** -0.5)
        state[f"{prefix}.bias"] = rand(n_out)

    state = OrderedDict()
    v = "blip.visual_encoder"
    state[f"{v}.cls_token"] = rand(1, 1, vw)
    state[f"{v}.pos_embed"] = rand(1, (z["image_size"] // z["patch"]) ** 2 + 1, vw)
    state[f"{v}.patch_embed.proj.weight"] = rand(vw, 3, z["patch"], z["patch"], scale=0.05)
    state[f"{v}.patch_embed.proj.bias"] = rand(vw)
    for i in range(z["vision_depth"]):
        b = f"{v}.blocks.{i}"
        norm(f"{b}.norm1", vw)
        linear(f"{b}.attn.qkv", vw, 3 * vw)
        linear(f"{b}.attn.proj", vw, vw)
        norm(f"{b}.norm2", vw)
        linear(f"{b}.mlp.fc1", vw, 4 * vw)
        linear(f"{b}.mlp.fc2", 4 * vw, vw)
    norm(f"{v}.norm", vw)
    t = "blip.text_encoder"
    state[f"{t}.embeddings.position_ids"] = torch.arange(z["max_positions"]).unsqueeze(0)
    state[f"{t}.embeddings.word_embeddings.weight"] = rand(z["vocab_size"], tw)
    state[f"{t}.embeddings.position_embeddings.weight"] = rand(z["max_positions"], tw)
    norm(f"{t}.embeddings.LayerNorm", tw)
    for i in range(z["text_depth"]):
        layer = f"{t}.encoder.layer.{i}"
        for block, kv_width in (("attention", tw), ("crossattention", vw)):
            linear(f"{layer}.{block}.self.query", tw, tw)
            linear(f"{layer}.{block}.self.key", kv_width, tw)
            linear(f"{layer}.{block}.self.value", kv_width, tw)
            linear(f"{layer}.{block}.output.dense", tw, tw)
            norm(f"{layer}.{block}.output.LayerNorm", tw)
        linear(f"{layer}.intermediate.dense", tw, z["text_mlp"])
        linear(f"{layer}.output.dense", z["text_mlp"], tw)
        norm(f"{layer}.output.LayerNorm", tw)
    linear("blip.vision_proj", vw, 256)
    linear("blip.text_proj", tw, 256)
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((tw, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        linear(f"mlp.layers.{index}", n_in, n_out)
    return state


def write_bert_tokenizer(folder: str | Path, scale: str = "tiny") -> Path:
    """A bert-base-uncased style tokenizer folder (vocab.txt + tokenizer_config.json). "real" pads the tiny word
    list with [unusedN] entries to bert-base-uncased's 30522 rows, [UNK]/[CLS]/[SEP]/[MASK] at its ids 100-103."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if check_scale(scale) == "tiny":
        vocab = list(BERT_TINY_VOCAB)
    else:
        vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab += [w for w in BERT_TINY_VOCAB if not w.startswith("[")]
        vocab += [f"[unused{i}]" for i in range(99, 99 + 30522 - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
    return folder


def write_imagereward(root: str | Path, scale: str = "tiny", *, seed: int = 0,
                      state: OrderedDict | None = None) -> tuple[Path, Path]:
    """(root/ImageReward with ImageReward.pt + med_config.json, root/bert-base-uncased); `state` replaces the
    random checkpoint (tests write broken ones)."""
    root = Path(root)
    model = root / IMAGEREWARD_FOLDER
    model.mkdir(parents=True, exist_ok=True)
    torch.save(state if state is not None else imagereward_state(scale, seed), model / "ImageReward.pt")
    (model / "med_config.json").write_text(json.dumps(imagereward_med_config(scale), indent=2), encoding="utf-8")
    return model, write_bert_tokenizer(root / BERT_TOKENIZER_FOLDER, scale)
