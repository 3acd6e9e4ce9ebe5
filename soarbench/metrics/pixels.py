"""Decoded pixel tensors for scorers: the 8-bit conversion evaluation uses, and torch preprocessing for rewards.

A model's decoder hands scorers a (B, 3, H, W) float tensor in [-1, 1] (SD3Adapter.decode). Two ways on:

    images = to_pil(pixels)                         # what evaluation saves and scores: 8-bit RGB PIL images
    x = unit_pixels(pixels)                          # [0, 1] float32, still on the autograd graph
    x = resize_shortest(x, 224, "bicubic")           # torch's antialiased resize in PIL's two clamped passes
    x = center_crop(x, 224, rounding="floor")        # transformers' crop offset ("round": torchvision's)
    x = normalize(x)                                 # OpenAI CLIP mean / std

`to_pil` is the same arithmetic as soarbench.evaluate.to_pil (a test holds them equal); it lives here so that a
scorer can use it without importing the generation pipeline.

Why torch preprocessing: a differentiable reward needs the gradient to reach the decoded pixels, which PIL cannot
carry. torch's antialiased bilinear / bicubic resize uses PIL's filters (bicubic with a = -0.5, support widened
by the downscale factor), so the only differences from the PIL path are PIL's 8-bit input and its fixed-point
arithmetic with 8-bit rounding between the horizontal and vertical passes.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from soarbench.errors import UserError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def as_pil(image: Any) -> Image.Image:
    """A PIL image (in its own mode) from a PIL image or an HW / HWC uint8 array."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise UserError(f"images must be PIL images or HWC uint8 arrays, got {type(image).__name__} "
                        f"{getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}")
    return Image.fromarray(array)


def as_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image of any mode or an HWC uint8 array."""
    image = as_pil(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """8-bit RGB images from (B, 3, H, W) pixels in [-1, 1]: round((x + 1) * 127.5), clamped to [0, 255]."""
    arr = ((pixels.detach().float().cpu().permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255)
    return [Image.fromarray(a) for a in arr.to(torch.uint8).numpy()]


def check_pixels(images: torch.Tensor, what: str = "images") -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        dtype = getattr(images, "dtype", "")
        raise UserError(f"{what} must be a (B, 3, H, W) float tensor in [-1, 1] (decoded pixels), got {shape} "
                        f"{dtype}".rstrip())


def unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1] from decoded pixels in [-1, 1], differentiable. Clamped like to_pil, so
    a pixel the decoder pushed outside [-1, 1] gets no gradient (it would be saturated in the saved image)."""
    check_pixels(images)
    return ((images.float() + 1) / 2).clamp(0, 1)


def pil_unit_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from a PIL image (any mode, converted to RGB) or an HWC uint8 array."""
    return torch.from_numpy(np.array(as_rgb(image), dtype=np.float32) / 255.0).permute(2, 0, 1)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side = size and the longer int(size * long / short), as transformers and
    torchvision size a shortest-edge resize."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


_MODES = {"bilinear": "BILINEAR", "bicubic": "BICUBIC"}


def resize(x: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """Antialiased bilinear / bicubic resize of (..., H, W) to (height, width); the identity when equal."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if tuple(x.shape[-2:]) == (height, width):
        return x
    mode = getattr(InterpolationMode, _MODES[interpolation])
    return TF.resize(x, [height, width], interpolation=mode, antialias=True)


def resize_like_pil(x: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """Resize as PIL does on 8-bit images, in float: horizontal pass, clamp to [0, 1], vertical pass, clamp.
    PIL clamps (and rounds) between its two passes; bicubic overshoots at edges, so the clamp matters there."""
    if x.shape[-1] != width:
        x = resize(x, x.shape[-2], width, interpolation).clamp(0, 1)
    if x.shape[-2] != height:
        x = resize(x, height, width, interpolation).clamp(0, 1)
    return x


def resize_shortest(x: torch.Tensor, size: int, interpolation: str = "bicubic", like_pil: bool = True
                    ) -> torch.Tensor:
    """Shortest side -> size: in PIL's two clamped passes (like_pil, see resize_like_pil) or one torchvision
    call (as a reward that resizes float tensors does)."""
    height, width = shortest_side_size(*x.shape[-2:], size)
    return resize_like_pil(x, height, width, interpolation) if like_pil else resize(x, height, width, interpolation)


def center_crop(x: torch.Tensor, size: int, rounding: str = "floor") -> torch.Tensor:
    """The central size x size window of (..., H, W) (H, W >= size). The offset (H - size) / 2 is floored
    ("floor": transformers' CLIP processor) or rounded half to even ("round": torchvision's center_crop)."""
    height, width = x.shape[-2:]
    if rounding == "floor":
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return x[..., top:top + size, left:left + size]


def normalize(x: torch.Tensor, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
              ) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - m) / s


def clip_processor_pixels(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The CLIP image processor's steps in torch on [0, 1] pixels (shortest side -> size bicubic, floor centre
    crop, OpenAI mean/std): what openai/clip-vit-large-patch14's and PickScore's processors do with PIL."""
    return normalize(center_crop(resize_shortest(x, size, "bicubic"), size, rounding="floor"))


def paper_clip_pixels(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The papers' tensor CLIP preprocessing on [0, 1] pixels (ClipScore protocol "paper"): one torchvision
    bilinear antialiased resize of the shortest side to size, torchvision's centre crop, OpenAI mean/std."""
    return normalize(center_crop(resize_shortest(x, size, "bilinear", like_pil=False), size, rounding="round"))
