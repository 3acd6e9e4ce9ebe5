"""The "mask2former-hf" GenEval backend on tiny random models saved in the real transformers folder layouts: a
Mask2Former with a Swin backbone and a CLIP, found through the weights manifest by name. Random weights, so the
detector is checked for structure (classes, scores, boxes = mask extents); the colour step is checked exactly:
the #999999 composite + crop pixels, and the chosen colour = argmax over a hand computation of the three-template
zero-shot classifier with the same model's embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.geneval.backends import BACKENDS, load_backend
from soarbench.geneval.grammar import COLORS
from soarbench.geneval.hf_backend import ClipColorClassifier, geneval_name, mask_box, masked_crop
from soarbench.geneval.rules import Detection
from soarbench.geneval.metric import GenEvalMetric
from soarbench.metrics.weights import load_manifest

try:  # pytest puts tests/ on sys.path (rootdir conftest, no __init__.py)
    from test_metric_clipscore import write_tiny_clip
except ImportError:  # pragma: no cover - run from the repository root as a package
    from tests.test_metric_clipscore import write_tiny_clip

torch.set_num_threads(1)

LABELS = ["person", "cat", "dog", "mouse"]  # COCO names; "mouse" is GenEval's "computer mouse"
GREY = (0x99, 0x99, 0x99)


def write_tiny_mask2former(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised Mask2FormerForUniversalSegmentation (Swin backbone) + its image processor."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    try:
        from transformers import Mask2FormerImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x
        from transformers import Mask2FormerImageProcessor as processor_class

    torch.manual_seed(seed)
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    # The pixel decoder's GroupNorm(32, ...) needs feature sizes divisible by 32.
    config = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=6, id2label=dict(enumerate(LABELS)),
                               label2id={name: i for i, name in enumerate(LABELS)})
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    processor_class(size={"shortest_edge": 64, "longest_edge": 64}, size_divisor=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights root holding both manifest entries the backend uses by default, at their manifest paths."""
    root = tmp_path_factory.mktemp("ckpts")
    manifest = load_manifest()
    write_tiny_mask2former(root / manifest.get("mask2former-swin-s-coco").path)
    write_tiny_clip(root / manifest.get("clip-vit-large-patch14").path)
    return root


@pytest.fixture(scope="module")
def backend(weights):
    return load_backend("mask2former-hf", device="cpu", weights_root=str(weights))


def rgb_image(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_registered_and_labelled_non_official(backend, weights):
    assert "mask2former-hf" in BACKENDS.names()
    assert backend.name == "mask2former-hf"
    assert "NON-OFFICIAL" in backend.version
    assert "mask2former-swin-s-coco@" in backend.version and "clip-vit-large-patch14@" in backend.version
    assert any("NON-OFFICIAL" in need for need in backend.needs)
    manifest = load_manifest()
    assert {f.path.rsplit("/", 1)[1] for f in manifest.get("mask2former-swin-s-coco").files} == {
        "config.json", "model.safetensors", "preprocessor_config.json"}


def test_detector_returns_valid_detections(backend):
    detector = backend.detector
    assert detector.classes == ("person", "cat", "dog", "computer mouse")
    detections = detector.detect(rgb_image())
    assert detections, "a random model still gives every query with a non-empty mask at threshold 0"
    assert len(detections) <= 6  # at most one per query: no thresholding, no NMS, nothing added
    for det in detections:
        assert isinstance(det, Detection)
        assert det.cls in detector.classes
        assert 0.0 <= det.score <= 1.0
        assert det.mask is not None and det.mask.dtype == bool and det.mask.shape == (64, 64) and det.mask.any()
        x1, y1, x2, y2 = det.box
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
        assert det.box == mask_box(det.mask)


def test_detector_keeps_the_image_size_of_non_square_inputs(backend):
    for det in backend.detector.detect(Image.fromarray(rgb_image(40, 56, seed=1))):
        assert det.mask.shape == (40, 56)
        assert det.box[2] <= 56 and det.box[3] <= 40


def test_mask_box_has_exclusive_ends():
    mask = np.zeros((6, 8), dtype=bool)
    mask[2:4, 3:7] = True
    mask[5, 4] = True
    assert mask_box(mask) == (3.0, 2.0, 7.0, 6.0)
    assert mask_box(np.zeros((4, 4), dtype=bool)) is None


def test_masked_crop_composites_over_999999_and_crops_to_the_box():
    pixels = np.arange(8 * 10 * 3, dtype=np.uint8).reshape(8, 10, 3)
    mask = np.zeros((8, 10), dtype=bool)
    mask[2:5, 3:7] = True
    mask[2, 3] = False  # a hole inside the box shows the background
    crop = np.asarray(masked_crop(Image.fromarray(pixels), Detection("cat", 0.9, (3, 2, 7, 5), mask)))
    expected = pixels[2:5, 3:7].copy()
    expected[0, 0] = GREY
    assert crop.shape == (3, 4, 3)
    np.testing.assert_array_equal(crop, expected)
    # A box wider than the mask keeps grey around it; PIL rounds a fractional box to whole pixels.
    wide = np.asarray(masked_crop(Image.fromarray(pixels), Detection("cat", 0.9, (1.6, 1.4, 8.2, 5.0), mask)))
    assert wide.shape == (4, 6, 3)
    np.testing.assert_array_equal(wide[1:4, 1:5], expected)
    assert (wide[0] == GREY).all() and (wide[:, 0] == GREY).all() and (wide[:, 5] == GREY).all()
    # Without a mask the image itself is cropped.
    plain = np.asarray(masked_crop(Image.fromarray(pixels), Detection("cat", 0.9, (3, 2, 7, 5))))
    np.testing.assert_array_equal(plain, pixels[2:5, 3:7])


def test_colour_is_the_argmax_of_the_three_template_classifier(backend):
    classifier = backend.color_classifier
    assert isinstance(classifier, ClipColorClassifier)
    clip = classifier.clip
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    masks = []
    for rows, cols in ((slice(4, 20), slice(2, 18)), (slice(10, 30), slice(20, 38))):
        mask = np.zeros((32, 40), dtype=bool)
        mask[rows, cols] = True
        mask[rows.start + 3:rows.start + 6, cols.start + 2:cols.start + 5] = False  # a hole of grey
        masks.append(mask)
    objects = [Detection("cat", 0.9, mask_box(m), m) for m in masks]

    # By hand: each template embedded alone, unit-normalised, averaged per colour, renormalised.
    templates = ["a photo of a {c} cat", "a photo of a {c}-colored cat", "a photo of a {c} object"]
    per_template = torch.stack([clip.embed_texts([t.format(c=c) for c in COLORS]) for t in templates])
    by_hand = torch.nn.functional.normalize(per_template.mean(dim=0), dim=-1)
    torch.testing.assert_close(classifier.color_embeddings("cat"), by_hand, atol=1e-5, rtol=0)
    assert classifier.color_embeddings("cat") is classifier.color_embeddings("cat")  # cached per class

    crops = []
    for mask in masks:
        rows, cols = np.nonzero(mask)
        composite = np.where(mask[..., None], image, np.array(GREY, dtype=np.uint8))
        crops.append(Image.fromarray(composite[rows.min():rows.max() + 1, cols.min():cols.max() + 1]))
    from open_clip.transform import image_transform  # the official evaluator's crop preprocessing

    official = image_transform(clip.image_size, is_train=False)
    logits = clip.embed_pixels(torch.stack([official(c) for c in crops])) @ by_hand.T
    expected = [COLORS[int(i)] for i in logits.argmax(dim=-1)]
    gaps = logits.sort(dim=-1, descending=True).values
    assert (gaps[:, 0] - gaps[:, 1] > 1e-5).all(), "the hand computation must have a clear winner"
    assert classifier.classify(image, objects, "cat") == expected
    assert classifier.classify(image, [], "cat") == []


def test_geneval_metric_end_to_end(weights):
    metric = GenEvalMetric(backend="mask2former-hf", device="cpu", weights_root=str(weights), threshold="0.0")
    assert "NON-OFFICIAL" in metric.info.version
    rows = [
        {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
        {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "computer mouse", "count": 1}],
         "prompt": "a photo of a dog and a computer mouse"},
    ]
    images = [Image.fromarray(rgb_image(seed=s)) for s in (4, 5)]
    records = metric.score(images, [r["prompt"] for r in rows], rows)
    assert len(records) == 2
    for record, row in zip(records, rows):
        assert record["tag"] == row["tag"] and record["prompt"] == row["prompt"]
        assert record["score"] in (0.0, 1.0) and record["score"] == float(record["correct"])
        assert json.loads(record["metadata"]) == row
        details = json.loads(record["details"])
        assert set(details) <= {"person", "cat", "dog", "computer mouse"}
        assert all(len(box) == 5 for boxes in details.values() for box in boxes)
        assert isinstance(record["partial_credit"], float)
    # The colour clause was reached (threshold 0 keeps the random model's cats) and named a GenEval colour.
    colours = json.loads(records[0]["details"])
    assert "cat" in colours
    assert records[0]["correct"] or any(f"1 {c}" in records[0]["reason"] for c in COLORS)
    summary = metric.summarize(records)
    assert set(summary) >= {"geneval", "geneval/colors", "geneval/two_object", "geneval/partial_credit"}


def test_missing_weights_are_a_user_error(tmp_path, weights):
    with pytest.raises(UserError, match="mask2former-swin-s-coco"):
        load_backend("mask2former-hf", device="cpu", weights_root=str(tmp_path))
    with pytest.raises(UserError, match="no such file or folder"):
        load_backend("mask2former-hf", model=str(tmp_path / "nowhere"), device="cpu", weights_root=str(weights))


def test_detector_labels_become_geneval_class_names():
    # COCO's names for three classes, and mmdet 3.x's coco_classes() underscores (seen on a real mmdet 3.3.0)
    assert [geneval_name(n) for n in ("mouse", "remote", "keyboard", "traffic_light", "sports_ball", " cat ")] == [
        "computer mouse", "tv remote", "computer keyboard", "traffic light", "sports ball", "cat"]
