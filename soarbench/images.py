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

Sizes are read from the file's header before anything is decoded (`image_size`): an image above MAX_PIXELS
(8192 x 8192 = 67,108,864 pixels; `soarbench eval --images ... --max-pixels N` changes it) is refused in one line
naming the file and its size, instead of filling the memory (six 10000 x 10000 PNGs were OOM-killed after 32
minutes). Scoring also refuses images under MIN_SCORED_SIDE (16) pixels on a side: a 1 x 1 image is a broken
export, and every metric would quietly score it as an empty picture.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from soarbench.errors import UserError

WHITE = (255, 255, 255)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
PLAIN = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
MAX_PIXELS = 8192 * 8192
MIN_SCORED_SIDE = 16


class ModeError(ValueError):
    """An image mode with no faithful 8-bit RGB reading."""


class SizeError(ValueError):
    """An image too large to decode safely, or too small to score."""


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise SizeError(f"{width} x {height} pixels (read from its header) is above the limit of {max_pixels:,} "
                        f"pixels; downscale it (soarbench eval --images takes --max-pixels N to raise the limit)")
    if min(width, height) < min_side:
        raise SizeError(f"{width} x {height} pixels is below the {min_side} px a side an image needs to be scored "
                        f"(a broken export? every metric would score it as an empty picture); replace or remove it")


def _bomb_pixels(error: Exception) -> str:
    """The pixel count in Pillow's DecompressionBombError ("Image size (N pixels) exceeds limit of M pixels...")."""
    m = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(m.group(1)):,}" if m else "too many"


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


def image_size(path: str | Path, max_pixels: int = MAX_PIXELS, min_side: int = 1,
               where: str | None = None) -> tuple[int, int]:
    """(width, height) from the file's header, nothing decoded; a UserError naming the file for a file that is
    missing or not an image, above `max_pixels`, or with a side under `min_side`."""
    return _read(path, where, max_pixels, min_side, lambda image: image.size)


def load_rgb(path: str | Path, background: tuple[int, int, int] = WHITE, where: str | None = None,
             max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image at `path` as 8-bit RGB; a UserError (one line, prefixed with `where`, e.g. "data.jsonl:3") for a
    file that is missing, not an image, truncated, above `max_pixels` (refused before decoding), or in a mode
    with no faithful RGB reading."""
    def decode(image: Image.Image) -> Image.Image:
        image.load()
        return to_rgb(image, background)

    return _read(path, where, max_pixels, 1, decode)


def _read(path: str | Path, where: str | None, max_pixels: int, min_side: int, then: Callable):
    """Open lazily (Pillow reads only the header), check the size, then `then(image)`; every failure one line."""
    name = f"{where}: image {path}" if where else f"{path}"
    image = None
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit and refuses above twice it: the size is checked here instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(*image.size, max_pixels, min_side)
                return then(image)
    except SizeError as e:
        raise UserError(f"{name}: {e}") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{name}: {_bomb_pixels(e)} pixels (read from its header) is above the limit of "
                        f"{min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels)):,} pixels; downscale it") \
            from None
    except ModeError as e:
        what = "mode" if where else "image mode"
        raise UserError(f"{name}: {what} {image.mode} cannot be read as RGB ({e})") from None
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        read = f"{where}: cannot read image {path}" if where else f"{path}: cannot read image"
        raise UserError(f"{read} ({detail})") from None
