"""OCR: Flow-GRPO's protocol as pure functions, and the metric with the REAL rapidocr models (shipped in its wheel)
reading text rendered with a TrueType font."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.metrics.ocr import OCRMetric, join_lines, levenshtein, normalize, ocr_score, target_text
from soarbench.metrics.registry import build_metric

FONT_CANDIDATES = ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                   "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf"]


def font(size: int = 40) -> ImageFont.FreeTypeFont:
    for path in FONT_CANDIDATES:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    default = ImageFont.load_default(size=size)  # Pillow's own bundled scalable font, where the system has none
    assert isinstance(default, ImageFont.FreeTypeFont), "needs a TrueType font: Pillow built with FreeType"
    return default


def render(*lines: str, size=(512, 256)) -> Image.Image:
    """Black text on white, one line every 70 px: large and clean enough for PP-OCR to read exactly."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((24, 40 + 70 * i), line, fill="black", font=font())
    return image


# ---------------------------------------------------------------------------------------- protocol, pure


def test_target_is_the_text_between_the_first_pair_of_double_quotes():
    assert target_text('A neon sign that says "Open Late" above a "Bar" door') == "Open Late"
    assert target_text('a t-shirt printed with "Hello') == "Hello"  # a lone quote: the rest, as split('"')[1]
    assert target_text('"quoted" at the start') == "quoted"
    with pytest.raises(UserError, match="double quotes"):
        target_text("a poster without quotes")


def test_normalisation_is_lowercase_without_spaces():
    assert normalize("Hello World ") == "helloworld"
    assert normalize("TAB\tKEPT") == "tab\tkept"  # only " " is removed, as in the reference


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == levenshtein("lawn", "flaw") == 2
    assert levenshtein("same", "same") == 0


def test_score_substring_cap_spaces_and_case():
    assert ocr_score("HeLLo WoRLD", "hello world") == (1.0, 0)
    assert ocr_score("the big sale today", "Big Sale") == (1.0, 0)  # substring: distance 0
    assert ocr_score("open24hours", "OPEN 24 HOURS DAILY") == (1 - 5 / 16, 5)
    assert ocr_score("xxxxxxxxxxxxxxxxxxxxxxxx", "ab") == (0.0, 2)  # distance 24 capped at len(target)
    assert ocr_score("", "Cotton") == (0.0, 6)
    assert ocr_score("catt", "cat") == (1.0, 0)
    assert ocr_score("cot", "cat") == (pytest.approx(2 / 3), 1)
    with pytest.raises(UserError, match="empty"):
        ocr_score("anything", "   ")


def test_lines_with_confidence_above_zero_are_joined_in_order_without_separator():
    assert join_lines([("OPEN", 0.99), ("noise", 0.0), ("24 H", 0.7), ("x", -1.0)]) == "OPEN24 H"
    assert join_lines([]) == ""


# ------------------------------------------------------------------------------------ the real rapidocr models


@pytest.fixture(scope="module")
def metric() -> OCRMetric:
    return OCRMetric(threads=1)


def test_rendered_text_gets_the_exact_expected_scores(metric):
    cases = [
        (render("Hello World"), 'A sign that says "Hello World"', 1.0),                        # exact reading
        (render("OPEN 24 HOURS"), 'a poster with "OPEN 24 HOURS DAILY" in neon', 1 - 5 / 16),  # partial
        (render("Welcome to Paris"), 'a banner reading "Paris"', 1.0),                       # substring
        (render(), 'a shirt with "Cotton" printed', 0.0),                                     # nothing to read
        (render("HELLO", "WORLD"), 'graffiti that says "hello world"', 1.0),                  # two lines, in order
    ]
    records = metric.score([c[0] for c in cases], [c[1] for c in cases])
    assert [r["score"] for r in records] == pytest.approx([c[2] for c in cases], abs=1e-12)
    assert [r["recognized"] for r in records] == ["Hello World", "OPEN 24 HOURS", "Welcome to Paris", "",
                                                  "HELLOWORLD"]
    assert [r["distance"] for r in records] == [0, 5, 0, 6, 0]
    assert records[1]["target"] == "OPEN 24 HOURS DAILY"
    assert all(r["engine"] == "rapidocr-3.10.0" for r in records)
    summary = metric.summarize(records)
    assert summary == {"ocr": pytest.approx((3 + 11 / 16) / 5), "ocr/exact": pytest.approx(3 / 5)}


def test_engine_and_models_are_recorded(metric):
    assert metric.info.name == "ocr" and metric.info.higher_is_better
    assert metric.info.version == ("flow-grpo-ocr/rapidocr-3.10.0/PP-OCRv6_det_small+PP-OCRv6_rec_small/"
                                   "det-max960-score0.5")
    assert metric.info.scale.startswith("1 - capped Levenshtein")
    described = metric.describe()
    assert described["models"] == {"det": "PP-OCRv6_det_small.onnx", "rec": "PP-OCRv6_rec_small.onnx"}
    assert described["settings"] == {"det_limit_type": "max", "det_limit_side_len": 960, "text_score": 0.5,
                                     "use_cls": False}


def test_pixels_reach_the_engine_as_the_rgb_array_flow_grpo_passes(metric, monkeypatch):
    seen = []
    monkeypatch.setattr(metric.engine, "read", lambda rgb: seen.append(rgb) or [("RGB", 0.9)])
    image = Image.new("RGB", (8, 4), (255, 0, 0))
    assert metric.score([image.convert("RGBA")], ['"rgb"'])[0]["score"] == 1.0
    assert seen[0].dtype == np.uint8 and seen[0].shape == (4, 8, 3) and tuple(seen[0][0, 0]) == (255, 0, 0)


def test_an_ocr_failure_scores_zero(metric, monkeypatch):
    def broken(rgb):
        raise RuntimeError("onnxruntime exploded")

    monkeypatch.setattr(metric.engine, "read", broken)
    record = metric.score([render("x")], ['say "hi"'])[0]
    assert record["score"] == 0.0 and record["recognized"] is None and "exploded" in record["error"]
    assert metric.summarize([record])["ocr/failures"] == 1.0


def test_bad_prompts_and_engines_are_user_errors(metric):
    with pytest.raises(UserError, match="double quotes"):
        metric.score([render("x")], ["no quotes here"])
    with pytest.raises(UserError, match="prompt 0: the quoted text is empty"):
        metric.score([render("x")], ['an empty " " sign'])
    with pytest.raises(UserError, match="1 images and 2 prompts"):
        metric.score([render("x")], ['"a"', '"b"'])
    with pytest.raises(UserError, match="did you mean 'rapidocr'"):
        OCRMetric(engine="rapidcor")
    with pytest.raises(UserError, match="unexpected keyword"):
        OCRMetric(threads=1, det_limit=960)


def test_paddleocr_is_an_optional_engine():
    try:
        import paddleocr  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install paddleocr==2.9.1"):
            build_metric("ocr", engine="paddleocr")
    else:
        pytest.skip("paddleocr is installed here; its absence cannot be tested")


def test_registry_builds_it(metric):
    built = build_metric("ocr", threads=1, weights_root="/unused")
    assert isinstance(built, OCRMetric) and built.info.version == metric.info.version
