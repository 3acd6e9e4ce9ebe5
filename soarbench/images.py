"""One way to turn an image file into 8-bit RGB, for training data and for scoring existing images.

    from soarbench.images import load_rgb
    image = load_rgb("cat.png")                          # PIL RGB image; transparency composited on white
    image = load_rgb("cat.png", background=(0, 0, 0))    # ... on black

Every mode Pillow reads becomes what a viewer would show, or is refused in one line naming the file and mode:
  1, L, P, RGB, CMYK, YCbCr, HSV   Pillow's own conversion to RGB
  I;16, I;16L, I;16B, I;16N, I     16-bit grayscale scaled to 8 bits (x * 255 / 65535, rounded), not clipped
  RGBA, LA, PA, RGBa, La           alpha-composited over `background`
  P or L or RGB with a transparency key (PNG tRNS)   made RGBA first, then composited
  F (32-bit float), LAB            refused: there is no one right way to map them to 8-bit RGB
Pillow's plain `convert("RGB")` gets three of these wrong: it clips 16-bit values at 255 (a white image), and it
drops alpha, so transparent pixels show whatever colour they hold (often black).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from soarbench.errors import UserError

WHITE = (255, 255, 255)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
PLAIN = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")


class ModeError(ValueError):
    """An image mode with no faithful 8-bit RGB reading."""


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ModeError(f"values {values.min()}..{values.max()} outside the 16-bit range 0..65535")
    return Image.fromarray(np.rint(values * (255 / 65535)).astype(np.uint8), mode="L")


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """An 8-bit RGB copy of a PIL image of any supported mode (see the module docstring); ModeError otherwise."""
    mode = image.mode
    if mode in SIXTEEN_BIT:
        return _sixteen_bit_to_l(image).convert("RGB")
    if mode in WITH_ALPHA:
        return _composite(image.convert("RGBA"), background)
    if mode in ("P", "L", "RGB", "1") and "transparency" in image.info:
        return _composite(image.convert("RGBA"), background)
    if mode == "RGB":
        return image.copy()
    if mode in PLAIN:
        return image.convert("RGB")
    raise ModeError("no faithful 8-bit RGB reading" if mode in ("F", "LAB") else "not a supported mode")


def load_rgb(path: str | Path, background: tuple[int, int, int] = WHITE, where: str | None = None) -> Image.Image:
    """The image at `path` as 8-bit RGB; a UserError (one line, prefixed with `where`, e.g. "data.jsonl:3") for a
    file that is missing, not an image, truncated, or in a mode with no faithful RGB reading."""
    name = f"{where}: image {path}" if where else f"{path}"
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, background)
    except ModeError as e:
        what = "mode" if where else "image mode"
        raise UserError(f"{name}: {what} {image.mode} cannot be read as RGB ({e})") from None
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        read = f"{where}: cannot read image {path}" if where else f"{path}: cannot read image"
        raise UserError(f"{read} ({detail})") from None
