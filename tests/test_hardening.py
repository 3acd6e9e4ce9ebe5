"""Bad input is one clear line and damages nothing: images of every mode, training JSONL, CLI values, full disks."""
from __future__ import annotations

import errno
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soarbench.errors import UserError
from soarbench.images import load_rgb, to_rgb


def _px(image: Image.Image) -> list[tuple[int, int, int]]:
    assert image.mode == "RGB"
    return [tuple(int(c) for c in p) for p in np.asarray(image).reshape(-1, 3)]


def _over(colour: int, alpha: int, background: int) -> int:
    """Alpha compositing written out: colour * a + background * (1 - a)."""
    return round(colour * alpha / 255 + background * (1 - alpha / 255))


# ------------------------------------------------------------------------------------------------ images
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")  # what Pillow makes of a 16-bit PNG
    assert _px(load_rgb(tmp_path / "g16.png")) == [(v, v, v) for v in (0, 1, 128, 255)]


def test_palette_with_a_transparent_index_shows_the_background(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.putdata([0, 1])
    im.save(tmp_path / "p.png", transparency=0)
    assert _px(load_rgb(tmp_path / "p.png")) == [(255, 255, 255), (0, 0, 255)]
    assert _px(load_rgb(tmp_path / "p.png", background=(10, 20, 30))) == [(10, 20, 30), (0, 0, 255)]


@pytest.mark.parametrize("mode,pixel", [("RGBA", (200, 100, 0, 128)), ("LA", (40, 200))])
def test_alpha_is_composited_on_the_background(tmp_path, mode, pixel):
    Image.new(mode, (1, 1), pixel).save(tmp_path / "a.png")
    colour = pixel[:3] if mode == "RGBA" else (pixel[0],) * 3
    alpha = pixel[-1]
    for bg in ((255, 255, 255), (0, 64, 255)):
        got = _px(load_rgb(tmp_path / "a.png", background=bg))[0]
        want = tuple(_over(c, alpha, b) for c, b in zip(colour, bg))
        assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (got, want)


def test_palette_with_alpha_channel():
    im = Image.new("P", (2, 1))
    im.putpalette([0, 255, 0] + [0] * (256 * 3 - 3))
    im.putdata([0, 0])
    im.putalpha(Image.frombytes("L", (2, 1), bytes([0, 255])))
    assert im.mode == "PA"
    assert _px(to_rgb(im)) == [(255, 255, 255), (0, 255, 0)]


def test_cmyk_and_one_bit(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)])  # cyan, black, white
    cmyk.save(tmp_path / "c.tif")
    assert _px(load_rgb(tmp_path / "c.tif")) == [(0, 255, 255), (0, 0, 0), (255, 255, 255)]
    bits = Image.new("1", (2, 1))
    bits.putdata([0, 255])
    bits.save(tmp_path / "b.png")
    assert _px(load_rgb(tmp_path / "b.png")) == [(0, 0, 0), (255, 255, 255)]


def test_float_images_and_broken_files_are_refused_in_one_line(tmp_path):
    Image.fromarray(np.array([[0.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(UserError) as e:
        load_rgb(tmp_path / "f.tif")
    assert str(e.value) == f"{tmp_path / 'f.tif'}: image mode F cannot be read as RGB (no faithful 8-bit RGB reading)"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    (tmp_path / "t.png").write_bytes((tmp_path / "t.png").read_bytes()[:60])
    with pytest.raises(UserError, match=r"t.png: cannot read image \("):
        load_rgb(tmp_path / "t.png")
    with pytest.raises(UserError, match=r"data.jsonl:4: image .*missing.png: no such file"):
        load_rgb(tmp_path / "missing.png", where="data.jsonl:4")


def test_training_pixels_go_through_the_same_reading(tmp_path):
    from soarbench.harness.data import Record, load_pixels

    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    px = load_pixels(Record(tmp_path / "clear.png", "c", 4, 4, "d.jsonl:1"), random.Random(0), False)
    assert px.shape == (3, 4, 4) and bool((px == 1.0).all())  # transparent -> white -> +1, not black
    Image.fromarray(np.array([[0.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(UserError, match=r"^d.jsonl:2: image .*f.tif: image mode F cannot be read as RGB"):
        load_pixels(Record(tmp_path / "f.tif", "c", 1, 1, "d.jsonl:2"), random.Random(0), False)


# ------------------------------------------------------------------------------------------------ training JSONL
def _train_config(tmp_path: Path, model: Path, jsonl: Path) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")  # line 1's image: only line 2 is bad
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{model}"\nmax_sequence_length = 0\n[data]\njsonl = "{jsonl}"\n'
                   f'[method]\nname = "sft"\n[budget]\nunit = "fwd_bwd"\namount = 8\n[train]\nbatch_size = 4\n'
                   f'device = "cpu"\n')
    return cfg


AS_STRING = "(the caption, or a JSON caption object written as a string)"


@pytest.mark.parametrize("caption,expected", [
    ("3", "field 'caption_en' = 3 is a number: expected a string " + AS_STRING),
    ('["a", "b"]', "field 'caption_en' = [\"a\", \"b\"] is a list: expected a string " + AS_STRING),
    ("null", "field 'caption_en' = null is null: expected a string " + AS_STRING),
    ('{"long_caption": "x"}', "field 'caption_en' = {\"long_caption\": \"x\"} is an object: expected a string "
                              + AS_STRING),
    (json.dumps(json.dumps({"title": "x"})), "field 'caption_en' holds a JSON object without any of long_caption, "
                                             "medium_caption, short_caption, text"),
])
def test_captions_of_a_wrong_type_name_file_and_line(tmp_path, tiny_model_dir, cli, caption, expected):
    data = tmp_path / "train.jsonl"
    data.write_text('{"md5": "a", "caption_en": "fine", "bw": 32, "bh": 32}\n'
                    f'{{"md5": "b", "caption_en": {caption}, "bw": 32, "bh": 32}}\n')
    code, _, err = cli("train", "--config", _train_config(tmp_path, tiny_model_dir, data), "--out", tmp_path / "run")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err == f"error: {data}:2: {expected}"
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_a_plain_caption_that_starts_with_a_brace_is_still_a_caption(tmp_path):
    from soarbench.harness.data import read_records

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"md5": "a", "caption_en": "{braces} in a caption", "bw": 8, "bh": 8}) + "\n")
    assert [r.caption for r in read_records(data)] == ["{braces} in a caption"]
    data.write_text(json.dumps({"md5": 12, "caption_en": "x", "bw": 8, "bh": 8}) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl:1: field 'md5' = 12: expected the image's file name stem"):
        read_records(data)


def test_a_jsonl_that_is_not_utf8_names_the_line(tmp_path, tiny_model_dir, cli):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"md5": "a", "caption_en": "fine", "bw": 32, "bh": 32}\n'
                     b'{"md5": "b", "caption_en": "caf\xe9", "bw": 32, "bh": 32}\n')
    code, _, err = cli("train", "--config", _train_config(tmp_path, tiny_model_dir, data), "--out", tmp_path / "run")
    assert code == 2
    assert err == f"error: {data}:2: not UTF-8 text (byte 0xe9 at column 32); save the file as UTF-8"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    from soarbench.io import read_jsonl

    path = tmp_path / "x.jsonl"
    path.write_bytes('\ufeff{"a": 1}\n{"a": "é"}\n'.encode("utf-8"))
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (2, {"a": "é"})]
