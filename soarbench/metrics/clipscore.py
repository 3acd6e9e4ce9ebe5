"""ClipScore: text-image cosine of OpenAI CLIP ViT-L/14 (transformers), plus the transformers-CLIP helpers that
PickScore and the aesthetic predictor share.

    metric = ClipScoreMetric()                        # reward_ckpts/clip-vit-large-patch14, checked
    metric = ClipScoreMetric(model="path/to/folder")  # any transformers CLIPModel folder with its processor files
    records = metric.score(images, prompts)           # [{"score": ..., "cosine": ...}, ...]

The raw number is cos(text, image) of the projected embeddings, i.e. diag(logits_per_image) / exp(logit_scale)
(= / 100 for OpenAI's CLIP), about 0.26-0.30 for SD-class images; that is what the tables report. Two other
conventions are named options of `scale`:

    "cosine"        cos                          (default; Flow-GRPO / DiffusionNFT tables)
    "torchmetrics"  100 * cos per image; the summary is max(mean, 0), as torchmetrics' CLIPScore computes it
    "hessel"        2.5 * max(cos, 0)            (Hessel et al. 2021, who used ViT-B/32)

Every record also carries the raw "cosine". Images go through the CLIP image processor with its PIL backend
(resize shortest side 224 bicubic, centre crop 224, OpenAI mean/std), as in transformers 4.x, torchmetrics and
the PickScore reference; prompts are tokenised with truncation at the model's 77 positions. Flow-GRPO's training
reward instead resizes decoded tensors bilinearly, which moves the cosine by about 1e-3; protocol="paper" does
that (float image, shortest side 224 bilinear with antialias, torchvision's centre crop, OpenAI mean/std), in
score() after converting each 8-bit image to a float tensor.

Tensor path (training rewards): `score_tensor(pixels, prompts)` takes decoded (B, 3, H, W) pixels in [-1, 1],
keeps the autograd graph through the image tower and returns (B,) scores on the pixels' device. With the
official protocol it runs the processor's steps in torch (soarbench.metrics.pixels.clip_processor_pixels:
antialiased bicubic in PIL's two clamped passes, floor-offset crop). Measured against score() on the 8-bit
images (8 sizes from 30 x 70 to 512 x 512, up- and downscaled, 4 images each): the preprocessed pixels differ by
at most 0.024 (mean 0.005) in normalised units, i.e. 1.5 / 255 (8-bit input, PIL's fixed-point passes and
rounding between them); on the tiny test towers the cosine differs by at most 3.8e-4. TENSOR_COSINE_ATOL = 1e-3
is the tolerance stated and tested (x 100 on the "torchmetrics" scale, x 2.5 for "hessel"; PickScore and the
aesthetic predictor, which share this path, state theirs). With protocol "paper" the two paths run the same
torch steps and differ only by the 8-bit rounding of score()'s input (equal within 1e-5 on 8-bit-exact pixels).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from soarbench.errors import UserError, did_you_mean
from soarbench.metrics import pixels as pixels_lib
from soarbench.metrics.pixels import as_rgb
from soarbench.metrics.base import Metric, MetricInfo, check_protocol
from soarbench.metrics.weights import locate

SCALES = {
    "cosine": "cosine similarity in [-1, 1] (CLIP ViT-L/14: about 0.26-0.30)",
    "torchmetrics": "100 * cosine per image; summary max(mean, 0) as torchmetrics' CLIPScore (about 26-30)",
    "hessel": "2.5 * max(cosine, 0), Hessel et al.'s CLIP-S (about 0.65-0.75 with ViT-L/14)",
}

# |score_tensor - score| on the cosine, official protocol (measured max 3.8e-4; see the module docstring)
TENSOR_COSINE_ATOL = 1e-3

PREPROCESS = {
    "official": "CLIP image processor (PIL backend): shortest side 224 bicubic, centre crop 224, OpenAI mean/std",
    "paper": "float tensor: shortest side 224 bilinear (antialiased), centre crop 224, OpenAI mean/std",
}

# ------------------------------------------------------------------------------------------ shared helpers


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None


def check_pairs(metric: str, images: Sequence[Any], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise UserError(f"{metric} scores each image against its prompt; got {len(images)} images and "
                        f"{len(prompts)} prompts")


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


OPENAI_MEAN, OPENAI_STD = pixels_lib.OPENAI_MEAN, pixels_lib.OPENAI_STD


def openai_clip_pixels(image: Image.Image, size: int = 224) -> torch.Tensor:
    """(3, size, size): OpenAI CLIP's own transform as torchvision runs it on a PIL image (Resize(size, BICUBIC)
    of the shortest side, CenterCrop(size), RGB, ToTensor, Normalize) -- what open_clip's "openai" preprocess
    and ImageReward apply. Its crop offset rounds half to even (torchvision's round((h - size) / 2)), where
    transformers' CLIP processor floors, so the two differ by a pixel on some non-square images."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short != size:
        long_new = int(size * long / short)
        image = image.resize((size, long_new) if width <= height else (long_new, size), Image.BICUBIC)
    width, height = image.size
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)


def pil_image_processor(folder: Path):
    """The CLIP image processor of a folder with the PIL backend (transformers 5 defaults to torchvision)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class  # transformers >= 5
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL implementation
        from transformers import CLIPImageProcessor as processor_class
    return processor_class.from_pretrained(str(folder), local_files_only=True)


class HFClip:
    """A transformers CLIPModel and its processor from local folders, with embeddings computed the same way on
    transformers 4.x and 5.x (whose get_*_features return types differ): tower pooler output -> projection."""

    def __init__(self, model_dir: Path, processor_dir: Path | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPModel

        processor_dir = processor_dir or model_dir
        for folder, what in ((model_dir, "model"), (processor_dir, "processor")):
            if not Path(folder).is_dir():
                raise UserError(f"{folder}: the CLIP {what} must be a folder (transformers layout)")
        try:
            self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
            self.image_processor = pil_image_processor(Path(processor_dir))
            self.tokenizer = AutoTokenizer.from_pretrained(str(processor_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load a CLIP model from {model_dir} (processor {processor_dir}): {first}") \
                from None
        self.device = torch.device(device)
        # fp32 whatever dtype the checkpoint was saved in (transformers 5 loads the saved dtype by default)
        self.model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @property
    def projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) L2-normalised float32 image embeddings of the folder's image processor, on the CPU."""
        pixels = self.image_processor(images=[as_rgb(im) for im in images], return_tensors="pt")["pixel_values"]
        return self.embed_pixels(pixels)

    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised float32 embeddings of already preprocessed (N, 3, S, S) pixels, on the CPU."""
        return self.image_features(pixels).cpu()

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalised float32 embeddings of preprocessed pixels, on the model's device, differentiable
        with respect to `pixels` when grad is enabled (the weights themselves are frozen)."""
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, torch.float32)).pooler_output
        embeds = self.model.visual_projection(pooled).float()
        return torch.nn.functional.normalize(embeds, dim=-1)

    def tensor_pixels(self, x: torch.Tensor, interpolation: str = "bicubic") -> torch.Tensor:
        """The image processor's steps in torch on (N, 3, H, W) [0, 1] pixels, differentiable: shortest side to
        the model's size ("bicubic", antialiased, as the processor's PIL resize; "bilinear" for the papers'
        tensor rewards), centre crop (floor offset as transformers; torchvision's rounding for "bilinear", as
        those rewards crop with torchvision), OpenAI mean/std."""
        if interpolation == "bicubic":
            return pixels_lib.clip_processor_pixels(x, self.image_size)
        return pixels_lib.paper_clip_pixels(x, self.image_size)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised float32 text embeddings (truncated at the model's positions), on the CPU."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        pooled = self.model.text_model(input_ids=tokens["input_ids"].to(self.device),
                                       attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        embeds = self.model.text_projection(pooled).float()
        return torch.nn.functional.normalize(embeds, dim=-1).cpu()

    def cosine(self, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int) -> torch.Tensor:
        """(N,) cos(text_i, image_i)."""
        out = []
        for s in batches(len(images), batch_size):
            out.append((self.embed_images(images[s]) * self.embed_texts(prompts[s])).sum(-1))
        return torch.cat(out) if out else torch.zeros(0)


def clip_cosine_tensor(clip: HFClip, images: torch.Tensor, prompts: Sequence[str], batch_size: int,
                       interpolation: str = "bicubic") -> torch.Tensor:
    """(B,) cos(text_i, image_i) of decoded pixels in [-1, 1] on their device, on the autograd graph when grad is
    enabled: the tensor path shared by ClipScore and PickScore."""
    x = pixels_lib.unit_pixels(images)
    out = []
    for s in batches(len(x), batch_size):
        features = clip.image_features(clip.tensor_pixels(x[s], interpolation))
        with torch.no_grad():
            text = clip.embed_texts(prompts[s]).to(features.device)
        out.append((features * text).sum(-1))
    return (torch.cat(out) if out else x.new_zeros(0)).to(images.device)


def clip_image_embeddings(clip: HFClip, images: torch.Tensor, batch_size: int,
                          interpolation: str = "bicubic") -> torch.Tensor:
    """(B, D) L2-normalised image embeddings of decoded pixels in [-1, 1], on the autograd graph when grad is
    enabled, on the pixels' device: clip_cosine_tensor's image side."""
    x = pixels_lib.unit_pixels(images)
    out = [clip.image_features(clip.tensor_pixels(x[s], interpolation)) for s in batches(len(x), batch_size)]
    return (torch.cat(out) if out else x.new_zeros(0, clip.projection_dim)).to(images.device)


# -------------------------------------------------------------------------------------------------- metric


class ClipScoreMetric(Metric):
    """cos(text, image) of a transformers CLIP (default: OpenAI ViT-L/14 from reward_ckpts)."""

    differentiable = True

    def __init__(self, model: str = "clip-vit-large-patch14", scale: str = "cosine",
                 weights_root: str | None = None, device: str = "auto", batch_size: int = 32,
                 protocol: str = "official"):
        if scale not in SCALES:
            raise did_you_mean("ClipScore scale", scale, SCALES)
        self.protocol = check_protocol("ClipScore", protocol)
        self.scale = scale
        self.batch_size = positive_int("batch_size", batch_size)
        path, label = locate(model, weights_root)
        self.clip = HFClip(path, device=resolve_device(device))
        self.weights = label
        # "paper": the float image resized bilinearly (antialiased), as Flow-GRPO's / DiffusionNFT's reward
        self.interpolation = "bilinear" if protocol == "paper" else "bicubic"
        suffix = "" if protocol == "official" else "/paper-bilinear"
        self.info = MetricInfo(
            name="clipscore",
            version=f"hf-clip/{label}/{scale}{suffix}",
            scale=SCALES[scale],
            higher_is_better=True,
            needs=[str(path)],
        )

    def _scaled(self, cosine: float) -> float:
        if self.scale == "torchmetrics":
            return 100.0 * cosine
        if self.scale == "hessel":
            return 2.5 * max(cosine, 0.0)
        return cosine

    def _scaled_tensor(self, cosine: torch.Tensor) -> torch.Tensor:
        if self.scale == "torchmetrics":
            return 100.0 * cosine
        if self.scale == "hessel":
            return 2.5 * cosine.clamp(min=0.0)
        return cosine

    def _paper_cosines(self, images: Sequence[Any], prompts: Sequence[str]) -> list[float]:
        """The "paper" preprocessing on 8-bit images: each converted to a float tensor first (sizes may differ)."""
        out = []
        with torch.no_grad():
            for s in batches(len(images), self.batch_size):
                pixels = torch.cat([self.clip.tensor_pixels(pixels_lib.pil_unit_pixels(im)[None], "bilinear")
                                    for im in images[s]])
                text = self.clip.embed_texts(prompts[s]).to(self.clip.device)
                out.extend((self.clip.image_features(pixels) * text).sum(-1).cpu().tolist())
        return out

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str],
              metadata: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        check_pairs("ClipScore", images, prompts)
        if self.protocol == "paper":
            cosines = self._paper_cosines(list(images), list(prompts))
        else:
            cosines = self.clip.cosine(list(images), list(prompts), self.batch_size).tolist()
        return [{"score": self._scaled(c), "cosine": c} for c in cosines]

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str],
                     metadata: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        """(B,) scores of decoded pixels in [-1, 1], differentiable. Official protocol: the processor's bicubic
        resize done by torch on the float pixels; it matches score() on the saved 8-bit images to within
        TENSOR_COSINE_ATOL on the cosine. "paper": the same bilinear path as score(), without 8-bit rounding."""
        check_pairs("ClipScore", images, prompts)
        cosine = clip_cosine_tensor(self.clip, images, list(prompts), self.batch_size, self.interpolation)
        return self._scaled_tensor(cosine)

    # ---- embeddings for SRPO's semantic relative reward (soarbench.methods.direct_align) --------------------
    def embed_images_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings of decoded pixels in [-1, 1], on the autograd graph (the same
        preprocessing as score_tensor), on the pixels' device."""
        return clip_image_embeddings(self.clip, images, self.batch_size, self.interpolation)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings, without gradient, on the CPU."""
        return self.clip.embed_texts(list(texts))

    @property
    def relative_scale(self) -> float:
        """SRPO's factor on img . [(1 + k) txt+ - txt-] for a transformers CLIP: exp(logit_scale) / 20 (the
        reference's CLIP reward, scaled to be comparable with HPS)."""
        return self.clip.logit_scale / 20.0

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        if not records:
            return {"clipscore": float("nan")}
        mean = sum(float(r["score"]) for r in records) / len(records)
        out = {"clipscore": max(mean, 0.0) if self.scale == "torchmetrics" else mean}
        if self.scale != "cosine":
            out["clipscore/cosine"] = sum(float(r["cosine"]) for r in records) / len(records)
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": self.weights, "scale_option": self.scale,
                "preprocess": PREPROCESS[self.protocol]}
