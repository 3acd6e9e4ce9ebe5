"""The shapes world: exact renders, an exact detector, and a compositional train/test split."""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from soarbench.errors import UserError
from soarbench.geneval import grammar
from soarbench.geneval.backends import ColorClassifier, Detector
from soarbench.geneval.rules import Detection, evaluate_image, relative_position
from soarbench.worlds import shapes
from soarbench.worlds.shapes import (
    BACKGROUND,
    PALETTE,
    SHAPE_CLASSES,
    ShapesColorClassifier,
    ShapesDetector,
    held_out_combinations,
    render_metadata,
    shape_mask,
    shapes_metadata,
)

DETECTOR = ShapesDetector()
COLOR_CLASSIFIER = ShapesColorClassifier()


def evaluate(row, image):
    return evaluate_image(row, DETECTOR.detect(image), image=image, color_classifier=COLOR_CLASSIFIER,
                          class_order=SHAPE_CLASSES, with_partial_credit=True)


def corrupt(image: np.ndarray, rng: np.random.Generator, noise: float = 10.0, blur: float = 0.5) -> np.ndarray:
    """Slight Gaussian blur, then Gaussian pixel noise (noise in 0..255 units)."""
    pixels = ndimage.gaussian_filter(image.astype(np.float32), sigma=(blur, blur, 0))
    pixels += rng.normal(0.0, noise, pixels.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- templates, palette


@pytest.mark.parametrize("cls", SHAPE_CLASSES)
def test_templates_fill_their_box_exactly(cls):
    for side in range(1, 31):
        mask = shape_mask(cls, side, side)
        assert mask.shape == (side, side)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert np.array_equal(mask, mask[:, ::-1])  # left-right symmetric
        assert ndimage.label(mask)[1] == 1 and np.array_equal(ndimage.binary_fill_holes(mask), mask)


def test_templates_are_distinct_at_every_render_size():
    for side in range(7, 23):
        masks = [shape_mask(c, side, side) for c in SHAPE_CLASSES]
        for a, b in itertools.combinations(masks, 2):
            assert (a & b).sum() / (a | b).sum() < 0.9


def test_plurals_and_articles_come_from_the_grammar():
    assert [grammar.plural(c) for c in SHAPE_CLASSES] == ["circles", "squares", "triangles", "crosses", "diamonds"]
    assert grammar.counting("cross", 3)["prompt"] == "a photo of three crosses"


def test_palette_is_well_separated_from_itself_and_the_background():
    assert list(PALETTE) == list(grammar.COLORS)
    background = np.array(BACKGROUND, float)
    colours = {name: np.array(rgb, float) for name, rgb in PALETTE.items()}
    assert len(set(PALETTE.values()) | {BACKGROUND}) == 11
    for a, b in itertools.combinations(colours.values(), 2):
        assert np.linalg.norm(a - b) > 95
    for name, rgb in colours.items():
        assert np.linalg.norm(rgb - background) > 120
        for other, orgb in colours.items():
            if other == name:
                continue
            # distance from this colour to the other's "at least half mixed with background" segment
            direction = orgb - background
            share = np.clip((rgb - background) @ direction / (direction @ direction), 0.5, 1.0)
            assert np.linalg.norm(rgb - background - share * direction) > 2 * shapes.DEFAULT_MAX_COLOR_DISTANCE


# ----------------------------------------------------------------------------------------------- rendering


def _check_scene(row, scene, size):
    image, objects = scene.image, scene.objects
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    smin, smax = shapes.shape_size_range(size)
    for obj in objects:
        x1, y1, x2, y2 = obj.box
        assert 0 <= x1 and 0 <= y1 and x2 <= size and y2 <= size
        assert smin <= x2 - x1 <= smax and x2 - x1 == y2 - y1
        # the drawn pixels are exactly the template, in exactly the palette colour
        drawn = np.all(image[y1:y2, x1:x2] == PALETTE[obj.color], axis=-1)
        assert np.array_equal(drawn, shape_mask(obj.cls, y2 - y1, x2 - x1))
    for a, b in itertools.combinations(objects, 2):
        assert shapes._separated(a.box, b.box, gap=1)
    # exactly the requested objects, in the requested colours
    expected = Counter((c["class"], c.get("color")) for c in row["include"] for _ in range(c["count"]))
    got = Counter((o.cls, row["include"][o.clause].get("color") and o.color) for o in objects)
    assert got == expected
    for obj in objects:
        clause = row["include"][obj.clause]
        if "position" in clause:
            relation, target = clause["position"]
            for other in (o for o in objects if o.clause == target):
                assert relation in relative_position(obj.box, other.box)


@pytest.mark.parametrize("size", [32, 48, 64])
def test_renders_are_exact_and_satisfy_every_clause(size):
    for i, row in enumerate(shapes_metadata("test", n_per_tag=6)):
        _check_scene(row, render_metadata(row, np.random.default_rng(i), size), size)


def test_rendering_is_deterministic_and_size_is_checked():
    row = grammar.counting("cross", 4)
    a = render_metadata(row, np.random.default_rng(7))
    b = render_metadata(row, np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and a.objects == b.objects
    assert len(a.objects) == 4
    with pytest.raises(UserError, match="32..64"):
        render_metadata(row, np.random.default_rng(0), size=16)
    with pytest.raises(UserError, match="not in the shapes world"):
        render_metadata(grammar.single_object("cat"), np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------- the split


def test_held_out_scheme():
    held = held_out_combinations()
    colour = [h for h in held if h[0] == "color"]
    assert len(colour) == 20
    assert Counter(c for _, c, _ in colour) == Counter({c: 2 for c in grammar.COLORS})
    assert Counter(cls for _, _, cls in colour) == Counter({c: 4 for c in SHAPE_CLASSES})
    counts = [h for h in held if h[0] == "count"]
    assert sorted(cls for _, cls, _ in counts) == sorted(SHAPE_CLASSES)
    pairs = {h[1:] for h in held if h[0] == "pair"}
    assert len(pairs) == 8 and all((b, a) in pairs for a, b in pairs)
    positions = {h[1:] for h in held if h[0] == "position"}
    converse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    assert len(positions) == 40 and all((b, converse[r], a) in positions for a, r, b in positions)
    assert Counter(r for _, r, _ in positions) == Counter({r: 10 for r in grammar.RELATIONS})
    # every ordered pair of classes keeps one relation per axis for training
    for a, b in itertools.permutations(SHAPE_CLASSES, 2):
        assert {(a, "left of", b), (a, "right of", b)} - positions and {(a, "above", b), (a, "below", b)} - positions
    assert held_out_combinations() == held_out_combinations(shapes.WORLD_SEED)


def test_train_never_and_test_always_uses_a_held_out_combination():
    held = held_out_combinations()
    train = shapes_metadata("train", seed=1, n_per_tag=300)
    assert Counter(r["tag"] for r in train) == Counter({t: 300 for t in grammar.TAGS})
    for row in train:
        assert not any(c in held for c in shapes.row_combinations(row)), row["prompt"]
    test = shapes_metadata("test")
    for row in test:
        combos = shapes.row_combinations(row)
        if row["tag"] == "single_object":
            assert combos == []  # only five such prompts exist: they are shared by both splits
        else:
            assert combos and all(c in held for c in combos), row["prompt"]
    # the training distribution still covers every colour, class, count and relation
    seen = {c for row in train for c in shapes.row_combinations(row)}
    assert {c for _, c, _ in (s for s in seen if s[0] == "color")} == set(grammar.COLORS)
    assert {n for _, _, n in (s for s in seen if s[0] == "count")} == {2, 3, 4}


def test_test_split_is_deterministic_distinct_and_sized():
    test = shapes_metadata("test", n_per_tag=20)
    assert test == shapes_metadata("test", n_per_tag=20)
    sizes = Counter(r["tag"] for r in test)
    assert sizes == {"single_object": 5, "two_object": 8, "counting": 5, "colors": 20, "position": 20,
                     "color_attr": 20}
    assert len({grammar.canonical_key(r) for r in test}) == len(test) == 78
    assert shapes_metadata("test", seed=1) != test
    # the whole split: every held-out prompt once; color_attr pairs two held-out (colour, class) pairs of
    # different classes and colours: 20 x (19 - 3 of the same class - 1 of the same colour) = 300
    full = shapes_metadata("test", n_per_tag=shapes.ALL_TEST_PROMPTS)
    assert Counter(r["tag"] for r in full) == {"single_object": 5, "two_object": 8, "counting": 5, "colors": 20,
                                               "position": 40, "color_attr": 300}
    assert len({grammar.canonical_key(r) for r in full}) == len(full) == 378
    assert shapes_metadata("test", n_per_tag=10_000) == full
    with pytest.raises(UserError, match="unknown shapes split"):
        shapes_metadata("val")


def test_written_files_are_byte_identical_per_seed(tmp_path):
    a = shapes.write_training_split(tmp_path / "a", n_images=24, seed=3)
    b = shapes.write_training_split(tmp_path / "b", n_images=24, seed=3)
    c = shapes.write_training_split(tmp_path / "c", n_images=24, seed=4)
    assert a == tmp_path / "a" / "train.jsonl"
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    images_a = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert images_a == sorted(p.name for p in (tmp_path / "b" / "images").iterdir())
    lines = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(lines) == 24
    assert Counter(line["tag"] for line in lines) == Counter({t: 4 for t in grammar.TAGS})
    for line in lines:
        assert list(line) == ["md5", "caption_en", "bw", "bh", "tag", "include", "exclude"]
        png = tmp_path / "a" / "images" / f"{line['md5']}.png"
        assert hashlib.md5(png.read_bytes()).hexdigest() == line["md5"]
        assert (line["bw"], line["bh"]) == (32, 32)
        # the image on disk is an exact render of its caption
        meta = {"tag": line["tag"], "include": line["include"], "prompt": line["caption_en"]}
        if line["exclude"]:
            meta["exclude"] = line["exclude"]
        assert evaluate(meta, np.asarray(Image.open(png).convert("RGB")))["correct"]


def test_write_test_metadata(tmp_path):
    path = shapes.write_test_metadata(tmp_path / "shapes_test.jsonl")
    assert path.read_text() == grammar.dumps_metadata(shapes_metadata("test"))
    assert grammar.load_metadata(path) == shapes_metadata("test")


# ----------------------------------------------------------------------------------------------- the detector


def test_backend_protocols():
    assert isinstance(DETECTOR, Detector) and isinstance(COLOR_CLASSIFIER, ColorClassifier)


@pytest.mark.parametrize("size", [32, 64])
def test_detector_is_exact_on_every_ground_truth_render_of_the_test_split(size):
    for i, row in enumerate(shapes_metadata("test")):
        scene = render_metadata(row, np.random.default_rng(i), size)
        detections = DETECTOR.detect(scene.image)
        assert sorted((d.cls, d.box) for d in detections) == sorted((o.cls, o.box) for o in scene.objects)
        assert all(d.score == 1.0 for d in detections)
        row_result = evaluate(row, scene.image)
        assert row_result["correct"] and row_result["reason"] == "", (row["prompt"], row_result["reason"])
        assert row_result["partial_credit"] == 1.0


def test_colour_classifier_reads_the_drawn_colour():
    for i, colour in enumerate(grammar.COLORS):
        row = grammar.colors(SHAPE_CLASSES[i % 5], colour)
        scene = render_metadata(row, np.random.default_rng(i))
        assert COLOR_CLASSIFIER.classify(scene.image, DETECTOR.detect(scene.image), row["include"][0]["class"]) == [
            colour
        ]
        # without a mask it votes over the box, ignoring the background
        box_only = [Detection("x", 1.0, scene.objects[0].box)]
        assert COLOR_CLASSIFIER.classify(scene.image, box_only, "x") == [colour]


def test_detector_is_mostly_right_on_noisy_blurred_renders():
    test = shapes_metadata("test")
    correct = []
    for i, row in enumerate(test):
        rng = np.random.default_rng(i)
        noisy = corrupt(render_metadata(row, rng).image, rng, noise=10.0, blur=0.5)
        correct.append(evaluate(row, noisy)["correct"])
    assert np.mean(correct) >= 0.95


def test_detector_finds_nothing_in_backgrounds_and_noise():
    rng = np.random.default_rng(0)
    grey = np.empty((32, 32, 3), np.uint8)
    grey[...] = BACKGROUND
    assert DETECTOR.detect(grey) == []
    assert DETECTOR.detect(corrupt(grey, rng, noise=20.0)) == []
    assert DETECTOR.detect(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) == []
    assert DETECTOR.detect(Image.fromarray(grey)) == []  # PIL images are accepted too


def test_detector_speed():
    images = [render_metadata(r, np.random.default_rng(i)).image for i, r in enumerate(shapes_metadata("test"))]
    DETECTOR.detect(images[0])
    start = time.perf_counter()
    for image in images:
        DETECTOR.detect(image)
    per_image = (time.perf_counter() - start) / len(images)
    assert per_image < 0.005  # ~0.3 ms measured on 2 CPU cores; generous for loaded CI machines


# ----------------------------------------------------------------------------------------------- detection scores


def _scene_with(mask: np.ndarray, colour: str = "red", size: int = 32, at: tuple[int, int] = (5, 7)) -> np.ndarray:
    image = np.empty((size, size, 3), np.uint8)
    image[...] = BACKGROUND
    y, x = at
    image[y:y + mask.shape[0], x:x + mask.shape[1]][mask] = PALETTE[colour]
    return image


def test_score_of_a_notched_square_is_the_hand_computed_tolerant_iou():
    # 9x9 square with a notch 3 wide and 2 deep in the middle of its top edge: the box stays 9x9, the best
    # template is the square. Plain IoU: 75 / 81. With 1 px of the outline forgiven, the judged pixels are the
    # 7x7 core (the band is the outer ring; outside the box nothing is drawn): the notch's second row (3 px)
    # is in the core, so 46 / 49.
    notched = np.ones((9, 9), bool)
    notched[0:2, 3:6] = False
    (plain,) = ShapesDetector(edge_tolerance=0).detect(_scene_with(notched))
    (tolerant,) = ShapesDetector(edge_tolerance=1).detect(_scene_with(notched))
    assert plain.cls == tolerant.cls == "square"
    assert plain.score == pytest.approx(75 / 81)
    assert tolerant.score == pytest.approx(46 / 49)
    assert shapes.tolerant_iou(notched, shape_mask("square", 9, 9), 0) == pytest.approx(75 / 81)


@pytest.mark.parametrize("cls", SHAPE_CLASSES)
def test_an_outline_one_pixel_off_is_forgiven_and_two_pixels_are_not(cls):
    template = shape_mask(cls, 11, 11)
    fat = ndimage.binary_dilation(np.pad(template, 1), np.ones((3, 3), bool))  # every edge 1 px further out
    # the fat shape's box is 13x13: score it against the template it was grown from, placed in that box
    grown_from = np.pad(template, 1)
    assert shapes.tolerant_iou(fat, grown_from, 1) == 1.0
    assert shapes.tolerant_iou(fat, grown_from, 0) < 0.9
    fatter = ndimage.binary_dilation(np.pad(template, 2), np.ones((3, 3), bool), iterations=2)
    assert shapes.tolerant_iou(fatter, np.pad(template, 2), 1) < 1.0
    thin = ndimage.binary_erosion(template, np.ones((3, 3), bool), border_value=0)
    assert shapes.tolerant_iou(thin, template, 1) == 1.0


def test_edge_tolerance_is_checked_and_versioned():
    with pytest.raises(UserError, match="edge_tolerance must be a whole number of pixels >= 0, got -1"):
        ShapesDetector(edge_tolerance=-1)
    assert shapes.make_backend().version == shapes.BACKEND_VERSION
    assert shapes.make_backend(edge_tolerance=0).version == shapes.BACKEND_VERSION + "-tol0"


def test_generated_data_of_another_split_or_draw_is_written_again(tmp_path):
    from soarbench.harness.data import ensure_generated

    jsonl = tmp_path / "train" / "train.jsonl"
    cfg = {"jsonl": str(jsonl), "generate": {"world": "shapes", "n_images": 12, "seed": 5, "image_size": 32}}
    ensure_generated(cfg)
    first = jsonl.read_bytes()
    assert shapes.is_current_training_split(jsonl.parent, 12, 5, 32)
    manifest = json.loads((jsonl.parent / shapes.MANIFEST).read_text())
    assert manifest["n_images"] == 12 and len(manifest["held_out_sha256"]) == 64
    # data from an older split (its manifest names other held-out combinations) is not reused
    stale = dict(manifest, held_out_sha256="0" * 64)
    (jsonl.parent / shapes.MANIFEST).write_text(json.dumps(stale))
    jsonl.write_text("stale\n")
    ensure_generated(cfg)
    assert jsonl.read_bytes() == first
    # nor is data of another draw
    ensure_generated(dict(cfg, generate=dict(cfg["generate"], n_images=6)))
    assert len(jsonl.read_text().splitlines()) == 6 and shapes.is_current_training_split(jsonl.parent, 6, 5, 32)
    # a folder without the manifest is not the world's: refused, never written (tests/test_generated_data.py)
    (jsonl.parent / shapes.MANIFEST).unlink()
    assert not shapes.is_current_training_split(jsonl.parent, 6, 5, 32)
    with pytest.raises(UserError, match="did not write"):
        ensure_generated(cfg)
    assert len(jsonl.read_text().splitlines()) == 6
