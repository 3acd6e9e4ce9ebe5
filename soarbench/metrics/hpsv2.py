"""HPS v2.1 (Wu et al., Human Preference Score v2): an open_clip ViT-H-14 fine-tuned on human preferences.

    metric = HPSv2Metric()                           # reward_ckpts/HPS_v2.1_compressed.pt, open_clip ViT-H-14
    metric = HPSv2Metric(architecture="cfg.json", weights="path/to/ckpt.pt")   # another open_clip model config
    records = metric.score(images, prompts)          # [{"score": ...}, ...]

The architecture is built from open_clip's config without pretrained weights; the checkpoint's "state_dict"
(every parameter of the model) is then loaded strictly on top. Preprocessing follows the HPSv2 / DiffusionNFT
scorer: the image as a float tensor in [0, 1]; bicubic (antialiased) resize so that the LONGEST side is the model's
input size (224), sizes rounded with Python's round; centre zero-pad to a square (black pixels, before
normalisation; an odd remainder goes right/bottom); OpenAI mean/std. The reference skips the pad when no resize
was needed (a 224 x 100 image would reach the model unpadded and fail); we always pad to the square.
Score = cos(text, image) of the normalised features, about 0.25-0.33 (the HPS benchmark prints it x 100).

score_tensor(pixels, prompts) is the differentiable path for decoded (B, 3, H, W) pixels in [-1, 1]: the same
torch preprocessing (hps_preprocess_tensor) on the float pixels, so it differs from score() on the saved 8-bit
images only by their rounding: at most 1.1e-4 on the cosine on the tiny test model over 8 image sizes;
TENSOR_ATOL = 5e-4 is the stated tolerance.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from soarbench.errors import UserError
from soarbench.metrics import pixels as pixels_lib
from soarbench.metrics.base import Metric, MetricInfo, check_protocol
from soarbench.metrics.clipscore import batches, check_pairs, positive_int, resolve_device
from soarbench.metrics.pixels import as_rgb
from soarbench.metrics.weights import load_checkpoint, locate

TENSOR_ATOL = 5e-4  # |score_tensor - score| on the cosine, see the module docstring
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def hps_preprocess(image: Image.Image | np.ndarray, size: int = 224, mean: Sequence[float] = OPENAI_MEAN,
                   std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """(3, size, size) float32: to tensor, bicubic resize longest side -> size, centre zero-pad, normalise."""
    pixels = torch.from_numpy(np.array(as_rgb(image))).permute(2, 0, 1).float().div(255.0)
    return hps_preprocess_tensor(pixels, size, mean, std)


def hps_preprocess_tensor(pixels: torch.Tensor, size: int = 224, mean: Sequence[float] = OPENAI_MEAN,
                          std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """hps_preprocess on (..., 3, H, W) float pixels in [0, 1], differentiable (the reference's own steps run on
    tensors, so the PIL path differs from this only by its 8-bit input)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    height, width = pixels.shape[-2:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_h, new_w = round(height * scale), round(width * scale)
        pixels = TF.resize(pixels, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    height, width = pixels.shape[-2:]
    pad_h, pad_w = size - height, size - width
    if pad_h or pad_w:
        # torchvision's order: left, top, right, bottom
        pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0)
    return TF.normalize(pixels, mean=list(mean), std=list(std))


def _model_config(architecture: str) -> tuple[dict[str, Any], str]:
    """(open_clip model config, label) from a built-in open_clip name or a path to a model-config JSON."""
    import open_clip

    if architecture.endswith(".json") or "/" in architecture:
        path = Path(architecture)
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read an open_clip model config ({e})") from None
        cfg = cfg.get("model_cfg", cfg)  # open_clip_config.json wraps it
        label = f"local:{path.name}"
    else:
        cfg = open_clip.get_model_config(architecture)
        if cfg is None:
            close = difflib.get_close_matches(architecture, open_clip.list_models(), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"unknown open_clip architecture '{architecture}' (a name from open_clip.list_models() "
                            f"or a path to a model-config .json){hint}")
        label = architecture
    if not isinstance(cfg, Mapping) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"{architecture}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    unsupported = [k for k in ("timm_model_name",) if k in cfg["vision_cfg"]]
    unsupported += [k for k in ("hf_model_name", "hf_tokenizer_name") if k in cfg["text_cfg"]]
    if unsupported or "multimodal_cfg" in cfg:
        raise UserError(f"{architecture}: only plain CLIP towers are supported here (found {unsupported or 'CoCa'})")
    return dict(cfg), label


def build_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    import open_clip

    cfg = dict(cfg)
    model_class = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    return model_class(**cfg, output_dict=True)


class HPSv2Metric(Metric):
    differentiable = True

    def __init__(self, weights: str = "hpsv2.1", architecture: str = "ViT-H-14", weights_root: str | None = None,
                 device: str = "auto", batch_size: int = 16, trust_pickle: bool = False,
                 protocol: str = "official"):
        import open_clip

        # The papers run HPS's own scorer (this preprocessing): "paper" is accepted and changes nothing.
        self.protocol = check_protocol("HPSv2", protocol)
        self.batch_size = positive_int("batch_size", batch_size)
        cfg, arch_label = _model_config(str(architecture))
        path, weights_label = locate(weights, weights_root)
        checkpoint = load_checkpoint(path, trust_pickle=trust_pickle)
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
            raise UserError(f"{path}: expected an HPS checkpoint, a dict with a 'state_dict' entry")
        model = build_model(cfg)
        missing, unexpected = [], []
        try:
            result = model.load_state_dict(checkpoint["state_dict"], strict=False)
            missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        except RuntimeError as e:  # shape mismatches
            raise UserError(f"{path}: its state_dict does not fit architecture {arch_label} "
                            f"({str(e).splitlines()[-1].strip()})") from None
        if missing or unexpected:
            raise UserError(f"{path}: its state_dict does not fit architecture {arch_label} (missing "
                            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                            f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        size = cfg["vision_cfg"].get("image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.tokenizer = open_clip.SimpleTokenizer(context_length=int(cfg["text_cfg"].get("context_length", 77)))
        self.weights = {"checkpoint": weights_label, "architecture": arch_label}
        self.info = MetricInfo(
            name="hpsv2",
            version=f"hpsv2/{weights_label}/{arch_label}",
            scale="cosine similarity in [-1, 1] (HPS v2.1: about 0.25-0.33; the HPS benchmark prints x100)",
            higher_is_better=True,
            needs=[str(path)],
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return hps_preprocess(image, self.image_size)

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str],
              metadata: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        check_pairs("HPSv2", images, prompts)
        images, prompts = list(images), list(prompts)
        scores = []
        for s in batches(len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in images[s]]).to(self.device)
            tokens = self.tokenizer(prompts[s]).to(self.device)
            image_features = self.model.encode_image(pixels, normalize=True)
            text_features = self.model.encode_text(tokens, normalize=True)
            scores.extend((image_features * text_features).sum(-1).float().cpu().tolist())
        return [{"score": v} for v in scores]

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str],
                     metadata: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        """(B,) scores of decoded pixels in [-1, 1], differentiable: hps_preprocess_tensor on the float pixels
        (within TENSOR_ATOL of score() on the 8-bit images)."""
        check_pairs("HPSv2", images, prompts)
        x, prompts = pixels_lib.unit_pixels(images), list(prompts)
        out = []
        for s in batches(len(x), self.batch_size):
            pixels = hps_preprocess_tensor(x[s], self.image_size).to(self.device)
            image_features = self.model.encode_image(pixels, normalize=True)
            with torch.no_grad():
                text_features = self.model.encode_text(self.tokenizer(prompts[s]).to(self.device), normalize=True)
            out.append((image_features * text_features).sum(-1).float())
        return (torch.cat(out) if out else x.new_zeros(0)).to(images.device)

    # ---- embeddings for SRPO's semantic relative reward (soarbench.methods.direct_align) --------------------
    def embed_images_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings of decoded pixels in [-1, 1] (score_tensor's preprocessing), on
        the autograd graph, on the pixels' device."""
        x = pixels_lib.unit_pixels(images)
        out = [self.model.encode_image(hps_preprocess_tensor(x[s], self.image_size).to(self.device),
                                       normalize=True).float() for s in batches(len(x), self.batch_size)]
        return torch.cat(out).to(images.device) if out else x.new_zeros(0, 0)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings, without gradient, on the CPU."""
        texts = list(texts)
        out = [self.model.encode_text(self.tokenizer(texts[s]).to(self.device), normalize=True).float().cpu()
               for s in batches(len(texts), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 0)

    @property
    def relative_scale(self) -> float:
        """SRPO's factor for HPS v2.1: 1 (normalised features, no logit scale), as the reference."""
        return 1.0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": self.weights}
