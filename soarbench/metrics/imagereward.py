"""ImageReward-v1.0 (Xu et al. 2023) on transformers' BLIP modules, loaded from the published ImageReward.pt.

    metric = ImageRewardMetric()    # reward_ckpts/ImageReward/{ImageReward.pt, med_config.json}
                                    # + reward_ckpts/bert-base-uncased/ (the tokenizer), all checked
    metric = ImageRewardMetric(model="path/to/ImageReward", tokenizer="path/to/bert-base-uncased")
    records = metric.score(images, prompts)     # [{"score": ...}, ...]

The model is BLIP's ViT image encoder, BLIP's BERT text encoder with a cross-attention block in every layer
(med_config.json), and a reward head. The official package (THUDM/image-reward) pins timm 0.6.13 and breaks on
transformers 5, so the same computation runs here on transformers' BlipVisionModel and BlipTextModel, whose
layers are the ones BLIP's vit.py and med.py define; the checkpoint's keys are renamed onto them (`rename_*`).

    image  -> resize shortest side to S bicubic, centre crop S, RGB, OpenAI mean/std (torchvision's arithmetic)
           -> ViT (patch 16, LayerNorm eps 1e-6, final norm)                    -> image tokens
    prompt -> bert-base-uncased WordPiece + [DEC] (bos) and [ENC] added, padded/truncated to 35 tokens
           -> BERT (self-attention over the prompt, cross-attention to every image token)
    [CLS] feature -> Linear 768-1024-128-64-16-1 with dropouts and no activations
    reward = (head - 0.16717362830052426) / 1.0333394966054072

S is the ViT's input size, read from the checkpoint's position embeddings (224 for ImageReward-v1.0); the
vision width, depth, patch size and MLP width are read from it too, the heads as width / 64 (BLIP's ViT-B and
ViT-L both use 64-wide heads), the text encoder from med_config.json with its cross-attention width set to the
vision width (as BLIP_Pretrain does). Keys the score does not use (BLIP's vision_proj / text_proj) are ignored,
as the official loader's strict=False ignores them; a missing key is an error.

Like the official `inference_rank`, the [CLS] token is BERT's [CLS] (not [ENC]), the image attention mask is all
ones, and the score is stored as the normalised reward (what the papers report; about -2..2).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from torch import nn

from soarbench.errors import UserError
from soarbench.metrics.aesthetic import AestheticMLP
from soarbench.metrics.base import Metric, MetricInfo, check_protocol
from soarbench.metrics.clipscore import batches, check_pairs, openai_clip_pixels, positive_int, resolve_device
from soarbench.metrics.pixels import as_pil
from soarbench.metrics.weights import load_checkpoint, locate

CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35
HEAD_WIDTH = 64  # BLIP's ViTs: 768 / 12 heads and 1024 / 16 heads

VISION_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."
HEAD_PREFIX = "mlp."
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")

# BLIP vit.py names -> transformers BlipVisionModel names (within one block, then outside the blocks).
_BLOCK_PARTS = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VISION_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)")


# ------------------------------------------------------------------------------------------ checkpoint


def rename_vision_key(key: str) -> str | None:
    """A key of BLIP's VisionTransformer (without the prefix) as BlipVisionModel names it; None if unknown."""
    if key in _VISION_TOP:
        return _VISION_TOP[key]
    match = _BLOCK_KEY.fullmatch(key)
    if match and match.group(2) in _BLOCK_PARTS:
        return f"encoder.layers.{match.group(1)}.{_BLOCK_PARTS[match.group(2)]}.{match.group(3)}"
    return None


def split_checkpoint(state: Mapping[str, torch.Tensor], where: str) -> tuple[dict, dict, dict]:
    """(vision, text, head) state dicts in transformers' / AestheticMLP's names from ImageReward.pt's."""
    vision, text, head, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(VISION_PREFIX):
            name = rename_vision_key(key[len(VISION_PREFIX):])
            if name is None:
                unknown.append(key)
            else:
                vision[name] = value
        elif key.startswith(TEXT_PREFIX):
            name = key[len(TEXT_PREFIX):]
            if name != "embeddings.position_ids":  # a buffer (arange), not a weight
                text[name] = value
        elif key.startswith(HEAD_PREFIX):
            head[key[len(HEAD_PREFIX):]] = value
        elif not key.startswith(UNUSED_PREFIXES):
            unknown.append(key)
    if unknown:
        raise UserError(f"{where}: not an ImageReward checkpoint (unexpected keys {unknown[:3]})")
    for part, keys, example in (("image encoder", vision, VISION_PREFIX + "cls_token"),
                                ("text encoder", text, TEXT_PREFIX + "embeddings.word_embeddings.weight"),
                                ("reward head", head, HEAD_PREFIX + "layers.0.weight")):
        if not keys:
            raise UserError(f"{where}: no {part} weights (expected keys like {example})")
    return vision, text, head


def vision_config(vision: Mapping[str, torch.Tensor], where: str):
    """The BlipVisionConfig that the checkpoint's image-encoder tensors imply."""
    from transformers import BlipVisionConfig

    try:
        width = int(vision["embeddings.class_embedding"].shape[-1])
        patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
        positions = int(vision["embeddings.position_embedding"].shape[1])
        mlp_width = int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise UserError(f"{where}: image encoder weight {e.args[0]} is missing") from None
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1 or width % HEAD_WIDTH:
        raise UserError(f"{where}: image encoder of width {width} with {positions} positions is not a square "
                        f"grid of {HEAD_WIDTH}-wide heads")
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(hidden_size=width, intermediate_size=mlp_width, num_hidden_layers=depth,
                            num_attention_heads=width // HEAD_WIDTH, image_size=grid * patch, patch_size=patch,
                            hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)


def text_config(med: Mapping[str, Any], encoder_width: int, where: str):
    """The BlipTextConfig of med_config.json, cross-attending to `encoder_width`-wide image tokens."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention"):
        raise UserError(f"{where}: add_cross_attention must be true (ImageReward's text encoder attends to the "
                        "image)")
    try:
        return BlipTextConfig(
            vocab_size=int(med["vocab_size"]), hidden_size=int(med["hidden_size"]),
            encoder_hidden_size=encoder_width, intermediate_size=int(med["intermediate_size"]),
            num_hidden_layers=int(med["num_hidden_layers"]), num_attention_heads=int(med["num_attention_heads"]),
            max_position_embeddings=int(med["max_position_embeddings"]), hidden_act=str(med["hidden_act"]),
            layer_norm_eps=float(med["layer_norm_eps"]), pad_token_id=int(med.get("pad_token_id", 0)),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            is_decoder=True,  # in transformers' BLIP this is what builds the cross-attention blocks
            bos_token_id=None, eos_token_id=None, sep_token_id=None,
        )
    except KeyError as e:
        raise UserError(f"{where}: field {e.args[0]} is missing") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def read_med_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} is missing: ImageReward needs med_config.json beside {CHECKPOINT_FILE}")
    try:
        med = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(med, dict):
        raise UserError(f"{path}: expected a JSON object of BERT settings")
    return med


def load_tokenizer(folder: Path, vocab_size: int):
    """bert-base-uncased's tokenizer with BLIP's two added tokens: [DEC] as bos, [ENC] as an extra special."""
    from transformers import BertTokenizer

    if not (folder / "vocab.txt").is_file():
        raise UserError(f"{folder}: no vocab.txt (the bert-base-uncased tokenizer folder)")
    try:
        tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a BERT tokenizer from {folder}: {str(e).strip().splitlines()[0]}") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) > vocab_size:
        raise UserError(f"{folder}: {len(tokenizer)} tokens (with [DEC], [ENC]) do not fit the text encoder's "
                        f"{vocab_size}-row embedding")
    return tokenizer


# ------------------------------------------------------------------------------------------------ model


class ImageRewardModel(nn.Module):
    """Image tokens -> cross-attending BERT -> [CLS] -> reward head -> normalised reward."""

    def __init__(self, vision, text, head: AestheticMLP):
        super().__init__()
        self.vision, self.text, self.head = vision, text, head

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state  # after the final LayerNorm
        # No image mask: every image token is attended to (the official all-ones mask).
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens)
        raw = self.head(text.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (raw - REWARD_MEAN) / REWARD_STD


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], part: str, where: str) -> None:
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3]) or str(e)
        raise UserError(f"{where}: the {part} weights do not fit ({detail[:300]})") from None


def load_model(folder: Path, trust_pickle: bool = False) -> ImageRewardModel:
    """The model of an ImageReward folder (ImageReward.pt + med_config.json), or of an ImageReward.pt path with
    med_config.json beside it."""
    from transformers import BlipTextModel, BlipVisionModel

    checkpoint = folder if folder.is_file() else folder / CHECKPOINT_FILE
    med = read_med_config(checkpoint.parent / MED_CONFIG_FILE)
    state = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{checkpoint}: expected a state dict, got {type(state).__name__}")
    vision_state, text_state, head_state = split_checkpoint(state, str(checkpoint))
    v_config = vision_config(vision_state, str(checkpoint))
    t_config = text_config(med, v_config.hidden_size, str(checkpoint.parent / MED_CONFIG_FILE))
    vision = BlipVisionModel(v_config)
    text = BlipTextModel(t_config, add_pooling_layer=False)
    width = head_state.get("layers.0.weight")
    head = AestheticMLP(embed_dim=int(width.shape[1]) if width is not None else t_config.hidden_size)
    _load_strict(vision, vision_state, "image encoder", str(checkpoint))
    _load_strict(text, text_state, "text encoder", str(checkpoint))
    _load_strict(head, head_state, "reward head", str(checkpoint))
    if head.layers[0].in_features != t_config.hidden_size:
        raise UserError(f"{checkpoint}: reward head takes {head.layers[0].in_features}-d features but the text "
                        f"encoder is {t_config.hidden_size} wide")
    return ImageRewardModel(vision, text, head).eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------------- metric


class ImageRewardMetric(Metric):
    def __init__(self, model: str = "imagereward-v1", tokenizer: str = "bert-base-uncased-tokenizer",
                 weights_root: str | None = None, device: str = "auto", batch_size: int = 16,
                 trust_pickle: bool = False, protocol: str = "official"):
        # The papers score with the official ImageReward package's preprocessing: "paper" changes nothing here.
        self.protocol = check_protocol("ImageReward", protocol)
        self.batch_size = positive_int("batch_size", batch_size)
        model_path, model_label = locate(model, weights_root)
        tokenizer_path, tokenizer_label = locate(tokenizer, weights_root)
        self.device = resolve_device(device)
        self.model = load_model(Path(model_path), trust_pickle=trust_pickle).to(self.device, torch.float32)
        self.tokenizer = load_tokenizer(Path(tokenizer_path), self.model.text.config.vocab_size)
        self.weights = {"model": model_label, "tokenizer": tokenizer_label}
        self.info = MetricInfo(
            name="imagereward",
            version=f"imagereward-v1.0-transformers/{model_label}/{tokenizer_label}",
            scale=f"normalised reward (head - {REWARD_MEAN}) / {REWARD_STD}, about -2..2 (as published)",
            higher_is_better=True,
            needs=[str(model_path), str(tokenizer_path)],
        )

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str],
              metadata: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        images, prompts = list(images), [str(p) for p in prompts]
        check_pairs("imagereward", images, prompts)
        size = self.model.image_size
        scores: list[float] = []
        for s in batches(len(images), self.batch_size):
            pixels = torch.stack([openai_clip_pixels(as_pil(im), size) for im in images[s]]).to(self.device)
            tokens = {k: v.to(self.device) for k, v in self.tokenize(prompts[s]).items()}
            scores.extend(self.model(pixels, **tokens).float().cpu().tolist())
        return [{"score": v} for v in scores]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": self.weights}

