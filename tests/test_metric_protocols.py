"""Metric protocols ("official" | "paper"): GenEval's red/blue swap on the detector input only (a fake Mask2Former
backend records what it is handed), GenEval's two averages on a results table computed by hand, ClipScore's
"paper" preprocessing against torchvision's bilinear resize + centre crop, OCR's engine requirement, and the
one-line error for an unknown protocol on every metric."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.geneval import grammar
from soarbench.geneval.backends import Backend
from soarbench.geneval.rules import Detection
from soarbench.metrics import ocr, synthetic
from soarbench.metrics.clipscore import OPENAI_MEAN, OPENAI_STD, ClipScoreMetric
from soarbench.geneval.metric import GenEvalMetric
from soarbench.metrics.registry import METRICS, build_metric

torch.set_num_threads(1)

# ------------------------------------------------------------------------------------ GenEval: the swap

RED, BLUE = (200, 10, 30), (30, 10, 200)
APPLE = {"tag": "colors", "include": [{"class": "apple", "count": 1, "color": "red"}],
         "prompt": "a photo of a red apple"}


class RedThingDetector:
    """Finds one apple covering the image when it looks red to a detector that reads channel 0 as red; records
    every image it was handed."""

    classes = ("apple",)

    def __init__(self):
        self.seen: list[np.ndarray] = []

    def detect(self, image):
        image = np.array(image)  # a copy: what it was handed, not a view that may change
        self.seen.append(image)
        h, w = image.shape[:2]
        looks_red = image[..., 0].mean() > image[..., 2].mean()
        return [Detection("apple", 0.95, (0, 0, w, h), np.ones((h, w), bool))] if looks_red else []


class MeanColour:
    """Names the colour of the whole image from its mean channels; records what it was handed."""

    def __init__(self):
        self.seen: list[np.ndarray] = []

    def classify(self, image, objects, classname):
        image = np.array(image)
        self.seen.append(image)
        colour = "red" if image[..., 0].mean() > image[..., 2].mean() else "blue"
        return [colour for _ in objects]


def fake_mask2former(metric: GenEvalMetric, name: str = "mask2former") -> tuple[RedThingDetector, MeanColour]:
    detector, colours = RedThingDetector(), MeanColour()
    metric.backend = Backend(name=name, version="fake", detector=detector, color_classifier=colours)
    return detector, colours


@pytest.mark.parametrize("backend", ["mask2former", "mask2former-hf"])
def test_paper_protocol_swaps_red_and_blue_on_the_detector_input_only(backend):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[:, :4], rgb[:, 4:] = RED, RED
    rgb[0, 0] = (1, 2, 3)  # an asymmetric pixel: the order of all three channels is checked
    image = Image.fromarray(rgb)

    official = GenEvalMetric()
    detector, colours = fake_mask2former(official, backend)
    record = official.score([image], [APPLE["prompt"]], [APPLE])[0]
    assert np.array_equal(detector.seen[-1], rgb) and np.array_equal(colours.seen[-1], rgb)
    assert record["correct"] and official.describe()["detector_input"] == "RGB"

    paper = GenEvalMetric(protocol="paper")
    detector, colours = fake_mask2former(paper, backend)
    record = paper.score([image], [APPLE["prompt"]], [APPLE])[0]
    swapped = detector.seen[-1]
    assert tuple(swapped[0, 0]) == (3, 2, 1) and tuple(swapped[3, 5]) == BLUE  # by hand
    assert np.array_equal(swapped, rgb[..., ::-1])
    # the red apple looks blue to the papers' detector: nothing found, so the colour classifier is not even asked
    assert not record["correct"] and colours.seen == []
    assert paper.describe()["protocol"] == "paper"
    assert "swapped" in paper.describe()["detector_input"]


def test_paper_protocol_hands_the_colour_classifier_the_true_rgb():
    # a blue image: the papers' detector sees red and finds the apple; CLIP colours still see it blue
    blue = np.full((6, 8, 3), BLUE, np.uint8)
    paper = GenEvalMetric(protocol="paper")
    detector, colours = fake_mask2former(paper)
    record = paper.score([Image.fromarray(blue)], [APPLE["prompt"]], [APPLE])[0]
    assert tuple(detector.seen[-1][0, 0]) == RED
    assert np.array_equal(colours.seen[-1], blue)
    assert not record["correct"] and "blue" in record["reason"]


def test_shapes_backend_accepts_paper_and_changes_nothing():
    from soarbench.worlds.shapes import render_metadata

    rows = [grammar.colors("square", "red"), grammar.colors("circle", "blue"), grammar.counting("triangle", 3)]
    images = [Image.fromarray(render_metadata(r, np.random.default_rng(i)).image) for i, r in enumerate(rows)]
    prompts = [r["prompt"] for r in rows]
    official, paper = GenEvalMetric(), GenEvalMetric(protocol="paper")
    assert not paper.swaps_detector_channels and paper.info.version == official.info.version
    assert paper.describe()["protocol"] == "paper" and paper.describe()["detector_input"] == "RGB"
    a, b = official.score(images, prompts, rows), paper.score(images, prompts, rows)
    assert [r["correct"] for r in a] == [r["correct"] for r in b] == [True, True, True]
    assert [r["details"] for r in a] == [r["details"] for r in b]


# -------------------------------------------------------------------------------- GenEval: two averages


def row(tag: str, prompt: str, correct: bool) -> dict:
    return {"tag": tag, "prompt": prompt, "correct": correct, "metadata": json.dumps({"tag": tag, "prompt": prompt})}


def test_official_overall_and_the_papers_image_average_by_hand():
    rows = ([row("single_object", "a photo of a cat", ok) for ok in (True, True, True, False)]  # 3/4
            + [row("counting", "a photo of two cats", False), row("counting", "a photo of three dogs", False)]
            + [row("colors", "a photo of a red car", True), row("colors", "a photo of a blue car", True)])
    summary = GenEvalMetric().summarize(rows)
    assert summary["geneval/single_object"] == 0.75 and summary["geneval/counting"] == 0.0
    assert summary["geneval/colors"] == 1.0
    assert summary["geneval"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)  # official: mean of the task accuracies
    assert summary["geneval/paper_avg"] == pytest.approx(5 / 8)  # the papers': mean over the 8 images
    assert summary["geneval/image_mean"] == summary["geneval/paper_avg"]
    assert summary["geneval/prompt_any_correct"] == pytest.approx(3 / 5)  # cat, red car, blue car of 5 prompts


# ------------------------------------------------------------------------------- ClipScore "paper"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return synthetic.write_clip_folder(tmp_path_factory.mktemp("ckpts") / synthetic.CLIP_FOLDER, "tiny", seed=39)


def paper_pixels_by_hand(image: Image.Image) -> torch.Tensor:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    x = TF.to_tensor(image)  # float in [0, 1]
    x = TF.resize(x, 224, interpolation=InterpolationMode.BILINEAR, antialias=True)
    x = TF.center_crop(x, [224, 224])
    return TF.normalize(x, list(OPENAI_MEAN), list(OPENAI_STD))


def test_paper_clipscore_is_bilinear_antialiased_resize_and_centre_crop(clip_folder):
    from transformers import AutoTokenizer, CLIPModel

    # 100 x 171 -> 224 x 383: the crop offset 79.5 rounds (torchvision) to 80, where a floor would give 79
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(100, 171), (300, 260)]]
    prompts = ["a red cube", "two blue spheres"]
    metric = ClipScoreMetric(model=str(clip_folder), device="cpu", protocol="paper")
    official = ClipScoreMetric(model=str(clip_folder), device="cpu")
    pixels = torch.stack([paper_pixels_by_hand(im) for im in images])

    model = CLIPModel.from_pretrained(str(clip_folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(clip_folder))
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        text_embeds = model.text_projection(model.text_model(**tokens).pooler_output)
    expected = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)

    records = metric.score(images, prompts)
    assert [r["cosine"] for r in records] == pytest.approx(expected.tolist(), abs=1e-5)
    baseline = [r["cosine"] for r in official.score(images, prompts)]
    assert max(abs(a - r["cosine"]) for a, r in zip(baseline, records)) > 1e-5  # the protocol is live
    described = metric.describe()
    assert described["protocol"] == "paper" and "bilinear" in described["preprocess"]
    assert official.describe()["protocol"] == "official" and "bicubic" in official.describe()["preprocess"]


# ------------------------------------------------------------------------------------------------ OCR


def test_ocr_paper_protocol_requires_paddleocr(monkeypatch):
    monkeypatch.setattr(ocr, "_installed", lambda module: False)
    with pytest.raises(UserError, match="needs the paddleocr engine.*pip install paddleocr==2.9.1") as info:
        ocr.OCRMetric(protocol="paper")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="paper' runs the papers' engine, paddleocr, not 'rapidocr'"):
        ocr.OCRMetric(engine="rapidocr", protocol="paper")


def test_ocr_describe_names_the_engine_and_its_models():
    described = build_metric("ocr").describe()
    assert described["protocol"] == "official" and described["engine"] == "rapidocr"
    assert described["engine_models"].startswith("PP-OCRv6")
    assert ocr.ENGINE_MODELS["paddleocr"].startswith("en_PP-OCRv3 det + en_PP-OCRv4 rec")


# ------------------------------------------------------------------------------------- unknown protocol


@pytest.mark.parametrize("name", ["geneval", "clipscore", "pickscore", "hpsv2", "aesthetic", "imagereward", "ocr"])
def test_unknown_protocol_is_a_one_line_error_with_a_suggestion(name, tmp_path):
    # checked before any weights are looked for: an empty weights root is enough
    with pytest.raises(UserError, match=r"unknown .*protocol 'papers' \(valid: official, paper\); did you mean "
                                        r"'paper'\?") as info:
        build_metric(name, protocol="papers", **({} if name == "geneval" else {"weights_root": str(tmp_path)}))
    assert "\n" not in str(info.value)
    assert name in METRICS.names()


# ------------------------------------------------------------------------------ what an eval folder records


def test_eval_summary_records_the_protocol_and_both_geneval_averages(tmp_path):
    import dataclasses

    from soarbench.benchmarks import build_benchmark
    from soarbench.evaluate import score_images
    from soarbench.worlds.shapes import encode_png, render_metadata

    bench = build_benchmark("shapes")
    rows = bench.metadata[:6]
    bench = dataclasses.replace(bench, prompts=[r["prompt"] for r in rows], metadata=rows,
                                metrics={"geneval": {"protocol": "paper"}})
    for i, r in enumerate(rows):
        (tmp_path / "images" / f"{i:05d}" / "samples").mkdir(parents=True)
        (tmp_path / "images" / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(r))
        image = render_metadata(r, np.random.default_rng(i), size=32).image
        (tmp_path / "images" / f"{i:05d}" / "samples" / "0000.png").write_bytes(encode_png(image))
    summary = score_images(tmp_path / "images", bench, tmp_path / "eval")
    assert summary["metrics"]["geneval"]["protocol"] == "paper"
    assert summary["scores"]["geneval/paper_avg"] == summary["scores"]["geneval/image_mean"] == 1.0
