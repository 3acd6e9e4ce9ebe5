"""The shapes world: a procedural text-to-image world in which GenEval can be scored exactly.

Five flat shapes (circle, square, triangle, cross, diamond) in GenEval's ten colours on a plain mid-grey
background, 32..64 px images. Prompts come from GenEval's own grammar (soarbench.geneval.grammar) with these
five classes, so "a photo of two crosses" or "a photo of a red circle left of a blue square" mean exactly
what they mean to GenEval. Renders are exact (no antialiasing, no overlap, >= 1 px of background between
boxes), and `ShapesDetector` inverts them exactly: on a ground-truth render every GenEval rule passes with
detection scores of 1.0, so any failure of a generated image is the generator's fault.

Compositional split. A fixed world seed (WORLD_SEED) picks held-out attribute combinations once and for all:

* colour: each class holds out four colours and each colour is held out for exactly two classes (20 of the
  50 (colour, class) pairs), so every colour is still seen with three classes and every class with six colours;
* counting: each class holds out one count of 2..4 (5 of 15 (class, count) pairs);
* two_object: 4 of the 10 unordered class pairs, in both orders (8 of 20 ordered pairs: "a circle and a
  square" describes the same images as "a square and a circle");
* position: for "left of" and for "above" a random 5-cycle over the classes gives (A, rel, next(A)) and
  (A, rel, next(next(A))), and each triple's converse ("right of"/"below") is held out with it (40 of 80
  triples); every ordered class pair is still seen on both axes, with the other relation.

Training prompts never use a held-out combination; test prompts always do (color_attr test prompts hold out
both of their colour pairs), except single_object, which has only five possible prompts and so appears in
both splits. The whole test split has 378 prompts: 5 single_object, 8 two_object, 5 counting, 20 colors,
40 position and 300 color_attr (GenEval's overall score is the mean of the six task means, so the task sizes
set each task's precision, not its weight).
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from soarbench.errors import UserError
from soarbench.geneval import grammar
from soarbench.geneval.backends import Backend
from soarbench.geneval.grammar import COLORS, TAGS
from soarbench.geneval.rules import DEFAULT_RULES, Detection, relative_position
from soarbench.io import atomic_write_bytes, atomic_write_text
from soarbench.worlds import World

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")

# Saturated where possible: pairwise >= 99 apart in RGB (closest: red/brown), >= 121 from the background, and
# every colour >= 89 from any other colour's background-mixing line (see _palette_labels), so noisy or
# slightly blurred pixels are still read as the colour that was drawn.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 20, 30),
    "orange": (255, 125, 0),
    "yellow": (250, 235, 20),
    "green": (20, 170, 40),
    "blue": (20, 60, 235),
    "purple": (140, 25, 185),
    "pink": (255, 120, 210),
    "brown": (135, 70, 0),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
BACKGROUND: tuple[int, int, int] = (153, 153, 153)  # GenEval's own crop background (#999999)

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE, DEFAULT_IMAGE_SIZE = 32, 64, 32
WORLD_SEED = 20250607  # fixes the held-out combinations; changing it defines a different benchmark
TEST_SEED = 0  # default seed of the test prompt set
ALL_TEST_PROMPTS = 300  # n_per_tag that takes every held-out prompt (the largest task, color_attr, has 300)
BACKEND_VERSION = "shapes-exact-2"  # 2: detection scores are edge-tolerant IoUs (1 was the plain IoU)

DEFAULT_EDGE_TOLERANCE = 1  # px of a shape's outline the detection score forgives (ShapesDetector)
DEFAULT_MAX_COLOR_DISTANCE = 40.0  # RGB units; every palette colour is >= 89 from every other's mixing line

# Palette colours as directions away from the background, in COLORS order (see _palette_labels).
_BACKGROUND_RGB = np.array(BACKGROUND, dtype=np.float32)
_DIRECTIONS = np.array([PALETTE[c] for c in COLORS], dtype=np.float32) - _BACKGROUND_RGB
_DIRECTION_NORM2 = (_DIRECTIONS * _DIRECTIONS).sum(axis=-1)
_NOTHING = -1  # label of background pixels and of pixels no palette colour explains
COLOURS_HELD_PER_CLASS = 4  # 20 of the 50 (colour, class) pairs
HELD_PAIRS = 4  # unordered class pairs held out of two_object (8 of 20 ordered prompts)
_MAX_SCENE_ATTEMPTS = 2000  # whole-scene restarts before giving up (typical scenes need 1-20)
_MAX_PLACEMENT_TRIES = 200  # positions tried for one shape before restarting the scene

Row = dict[str, Any]


# ======================================================================================= shapes and rendering


def shape_size_range(image_size: int) -> tuple[int, int]:
    """Inclusive range of shape box sizes: 7..11 px at 32 px, scaled linearly (14..22 at 64 px)."""
    return (7 * image_size + 16) // 32, (11 * image_size + 16) // 32


def _cross_arm(extent: int) -> int:
    """Arm thickness of a cross: about a third of the box, with the parity of the box so the arm is centred."""
    arm = max(extent // 3, 1)
    return arm + 1 if (extent - arm) % 2 else arm


@lru_cache(maxsize=4096)
def shape_mask(cls: str, height: int, width: int) -> np.ndarray:
    """The boolean template of `cls` filling a height x width box (read-only; cached).

    Integer geometry on doubled pixel-centre coordinates (X = 2j + 1 - w, Y = 2i + 1 - h, both in (-w, w) and
    (-h, h)) makes every template exact and symmetric, and each touches all four sides of a square box, so a
    rendered shape's tight bounding box is the box it was drawn in.
    """
    if height < 1 or width < 1:
        raise ValueError(f"shape box must be at least 1x1, got {height}x{width}")
    Y = (2 * np.arange(height) + 1 - height)[:, None]
    X = (2 * np.arange(width) + 1 - width)[None, :]
    row = np.arange(height)[:, None]
    if cls == "circle":
        mask = X * X * height * height + Y * Y * width * width <= width * width * height * height
    elif cls == "square":
        mask = np.ones((height, width), dtype=bool)
    elif cls == "triangle":  # apex up: row i spans (i + 1) / h of the width
        mask = np.abs(X) * height <= (row + 1) * width
    elif cls == "cross":
        mask = (np.abs(X) <= _cross_arm(width) - 1) | (np.abs(Y) <= _cross_arm(height) - 1)
    elif cls == "diamond":
        mask = np.abs(X) * height + np.abs(Y) * width <= width * height
    else:
        raise ValueError(f"unknown shape {cls!r}; the shapes world has {SHAPE_CLASSES}")
    mask = np.broadcast_to(mask, (height, width)).copy()
    mask.setflags(write=False)
    return mask


@dataclass(frozen=True)
class PlacedShape:
    """One rendered object: its class, colour name, box (x1, y1, x2, y2) with x2/y2 exclusive, and clause."""

    cls: str
    color: str
    box: tuple[int, int, int, int]
    clause: int  # index of the include clause it renders


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # HxWx3 uint8
    objects: tuple[PlacedShape, ...]


def _check_image_size(size: int) -> None:
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise UserError(f"shapes world image size must be {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px, got {size}")


def _object_specs(row: Mapping[str, Any], rng: np.random.Generator) -> list[tuple[str, str, int]]:
    """(class, colour, clause index) for every object to draw: `count` per include clause, colour as asked."""
    specs = []
    for index, clause in enumerate(row["include"]):
        for _ in range(int(clause["count"])):
            color = clause.get("color") or COLORS[int(rng.integers(len(COLORS)))]
            specs.append((clause["class"], color, index))
    return specs


def _separated(a: Sequence[int], b: Sequence[int], gap: int = 1) -> bool:
    """Boxes with exclusive ends have >= `gap` background pixels between them on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _positions_hold(row: Mapping[str, Any], boxes: Sequence[tuple[int, int, int, int]], clause_of: list[int]) -> bool:
    """Every position clause holds between all its objects and all objects of its target, by GenEval's rule."""
    for index, clause in enumerate(row["include"]):
        if "position" not in clause:
            continue
        relation, target = clause["position"][0], int(clause["position"][1])
        for box_a in (b for b, c in zip(boxes, clause_of) if c == index):
            for box_b in (b for b, c in zip(boxes, clause_of) if c == target):
                if relation not in relative_position(box_a, box_b, DEFAULT_RULES.position_threshold):
                    return False
    return True


def _place(n_objects: int, size: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]] | None:
    """Random square boxes inside the image, pairwise separated; None when the scene got too crowded."""
    smin, smax = shape_size_range(size)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(n_objects):
        side = int(rng.integers(smin, smax, endpoint=True))
        for _ in range(_MAX_PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, size - side, size=2, endpoint=True))
            box = (x, y, x + side, y + side)
            if all(_separated(box, other) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def render_metadata(row: Mapping[str, Any], rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE) -> Scene:
    """A ground-truth image for a GenEval metadata row over the shape classes.

    Each include clause is drawn `count` times (so counting prompts get exactly their count and the exclude
    clause holds), in the requested colour or a random palette colour; layouts are rejection-sampled until
    every position clause holds under GenEval's own rule, margin included.
    """
    _check_image_size(size)
    for clause in row["include"]:
        if clause["class"] not in SHAPE_CLASSES:
            raise UserError(f"class {clause['class']!r} is not in the shapes world {SHAPE_CLASSES}")
    specs = _object_specs(row, rng)
    clause_of = [clause for _, _, clause in specs]
    for _ in range(_MAX_SCENE_ATTEMPTS):
        boxes = _place(len(specs), size, rng)
        if boxes is not None and _positions_hold(row, boxes, clause_of):
            break
    else:
        raise RuntimeError(f"could not lay out {row['prompt']!r} in a {size}px image")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[...] = BACKGROUND
    objects = []
    for (cls, color, clause), box in zip(specs, boxes):
        x1, y1, x2, y2 = box
        image[y1:y2, x1:x2][shape_mask(cls, y2 - y1, x2 - x1)] = PALETTE[color]
        objects.append(PlacedShape(cls, color, box, clause))
    return Scene(image, tuple(objects))


def encode_png(image: np.ndarray) -> bytes:
    """Lossless, deterministic PNG bytes (no timestamps or text chunks), so md5s are reproducible."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# ======================================================================================= the compositional split


def _converse(relation: str) -> str:
    return {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]


@lru_cache(maxsize=None)
def held_out_combinations(world_seed: int = WORLD_SEED) -> frozenset[tuple]:
    """The held-out combinations, as tagged tuples (see the module docstring for the scheme):

    ("color", colour, class), ("count", class, n), ("pair", A, B), ("position", A, relation, B).
    """
    rng = np.random.default_rng(world_seed)
    held: set[tuple] = set()
    colour_order = rng.permutation(len(COLORS))
    for k, cls in enumerate(SHAPE_CLASSES):  # a cyclic Latin design: each colour twice, each class four times
        for j in range(COLOURS_HELD_PER_CLASS):
            held.add(("color", COLORS[int(colour_order[(2 * k + j) % len(COLORS)])], cls))
    for k, i in enumerate(rng.permutation(len(SHAPE_CLASSES))):
        held.add(("count", SHAPE_CLASSES[int(i)], 2 + k % (grammar.MAX_COUNT - 1)))
    unordered = list(itertools.combinations(SHAPE_CLASSES, 2))
    for i in rng.choice(len(unordered), size=HELD_PAIRS, replace=False):
        a, b = unordered[int(i)]
        held.update({("pair", a, b), ("pair", b, a)})
    for relation in ("left of", "above"):
        cycle = [SHAPE_CLASSES[int(i)] for i in rng.permutation(len(SHAPE_CLASSES))]
        for step in (1, 2):  # A -> the next class and A -> the one after: 10 of the 20 ordered pairs per axis
            for a, b in zip(cycle, cycle[step:] + cycle[:step]):
                held.update({("position", a, relation, b), ("position", b, _converse(relation), a)})
    return frozenset(held)


def row_combinations(row: Mapping[str, Any]) -> list[tuple]:
    """The attribute combinations a metadata row uses, in the tagged form of `held_out_combinations`."""
    include, tag = row["include"], row["tag"]
    if tag in ("colors", "color_attr"):
        return [("color", c["color"], c["class"]) for c in include]
    if tag == "counting":
        return [("count", include[0]["class"], int(include[0]["count"]))]
    if tag == "two_object":
        return [("pair", include[0]["class"], include[1]["class"])]
    if tag == "position":
        target, subject = include[0], include[1]
        return [("position", subject["class"], subject["position"][0], target["class"])]
    return []  # single_object: nothing to hold out


def uses_held_out(row: Mapping[str, Any], world_seed: int = WORLD_SEED) -> bool:
    held = held_out_combinations(world_seed)
    return any(combo in held for combo in row_combinations(row))


_TRAIN_SAMPLERS = {
    "two_object": grammar.sample_two_object,
    "counting": grammar.sample_counting,
    "colors": grammar.sample_colors,
    "position": grammar.sample_position,
    "color_attr": grammar.sample_color_attr,
}


def _sample_train_row(rng: np.random.Generator, tag: str) -> Row:
    """One training prompt of `tag`: GenEval's own sampler over the shapes, redrawn while it hits a held-out combo."""
    if tag == "single_object":
        return grammar.single_object(SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))])
    while True:
        row = _TRAIN_SAMPLERS[tag](rng, SHAPE_CLASSES)
        if not uses_held_out(row):
            return row


def _test_candidates(tag: str) -> list[Row]:
    """Every test prompt of `tag`, in a fixed order: the rows built from held-out combinations only."""
    held = sorted(held_out_combinations())
    if tag == "single_object":
        return [grammar.single_object(c) for c in SHAPE_CLASSES]
    if tag == "two_object":
        return [grammar.two_object(a, b) for kind, a, b in (h for h in held if h[0] == "pair")]
    if tag == "counting":
        return [grammar.counting(c, n) for kind, c, n in (h for h in held if h[0] == "count")]
    if tag == "position":
        return [grammar.position(a, r, b) for kind, a, r, b in (h for h in held if h[0] == "position")]
    colour_pairs = [(cls, colour) for kind, colour, cls in (h for h in held if h[0] == "color")]
    if tag == "colors":
        return [grammar.colors(cls, colour) for cls, colour in colour_pairs]
    if tag == "color_attr":
        return [
            grammar.color_attr(ca, a, cb, b)
            for (ca, a), (cb, b) in itertools.permutations(colour_pairs, 2)
            if ca != cb and a != b
        ]
    raise ValueError(f"unknown tag {tag!r}")


def shapes_metadata(split: str, seed: int = TEST_SEED, n_per_tag: int = 20) -> list[Row]:
    """GenEval metadata rows over the shape classes, task by task in GenEval's order.

    "train": `n_per_tag` independent draws per task from GenEval's samplers, never using a held-out
    combination; repeats are kept (they are more samples of the training distribution).
    "test": per task, `n_per_tag` distinct held-out prompts drawn without replacement (all of them when fewer
    exist: 5 single_object, 8 two_object, 5 counting, 20 colors, 40 position, 300 color_attr), deduplicated;
    n_per_tag >= 300 (ALL_TEST_PROMPTS) is the whole split of 378 prompts.
    """
    if split not in ("train", "test"):
        raise UserError(f"unknown shapes split '{split}' (valid: test, train)")
    if n_per_tag < 0:
        raise UserError(f"n_per_tag must be >= 0, got {n_per_tag}")
    rng = np.random.default_rng(seed)
    if split == "train":
        return [_sample_train_row(rng, tag) for tag in TAGS for _ in range(n_per_tag)]
    return _choose_per_tag({tag: _test_candidates(tag) for tag in TAGS}, rng, n_per_tag)


def _choose_per_tag(candidates: Mapping[str, list[Row]], rng: np.random.Generator, n_per_tag: int) -> list[Row]:
    """Per task in GenEval's order, n_per_tag distinct candidates drawn without replacement (all when fewer)."""
    rows: list[Row] = []
    for tag in TAGS:
        chosen = rng.choice(len(candidates[tag]), size=min(n_per_tag, len(candidates[tag])), replace=False)
        rows.extend(candidates[tag][int(i)] for i in chosen)
    return grammar.dedup(rows)


def training_rows(n_images: int, seed: int) -> list[Row]:
    """The prompt rows of `write_training_split(n_images, seed)`, in order, without rendering anything (prompts
    have their own random stream): tasks cycle in GenEval order."""
    prompt_rng = np.random.default_rng(seed)
    return [_sample_train_row(prompt_rng, TAGS[i % len(TAGS)]) for i in range(n_images)]


def training_prompt_metadata(n_images: int, seed: int, choice_seed: int = TEST_SEED,
                             n_per_tag: int = ALL_TEST_PROMPTS) -> list[Row]:
    """Distinct prompts of the training draw (n_images, seed), at most n_per_tag per task drawn with choice_seed:
    the in-distribution counterpart of the test split, to tell "did not learn" from "did not generalise"."""
    by_tag: dict[str, list[Row]] = {tag: [] for tag in TAGS}
    for row in grammar.dedup(training_rows(n_images, seed)):
        by_tag[row["tag"]].append(row)
    return _choose_per_tag(by_tag, np.random.default_rng(choice_seed), n_per_tag)


def write_test_metadata(path: str | os.PathLike, seed: int = TEST_SEED, n_per_tag: int = 20) -> Path:
    """Write the test prompts as a GenEval evaluation_metadata.jsonl (official line format); returns the path."""
    path = Path(path)
    atomic_write_text(path, grammar.dumps_metadata(shapes_metadata("test", seed, n_per_tag)))
    return path


def write_training_split(
    out_dir: str | os.PathLike, n_images: int, seed: int, size: int = DEFAULT_IMAGE_SIZE
) -> Path:
    """Render `n_images` training images with their prompts; returns the path of train.jsonl.

    Images go to out_dir/images/<md5 of the PNG bytes>.png; train.jsonl has one HY-SOAR line per image,
    {"md5", "caption_en", "bw", "bh"}, plus the GenEval row ("tag", "include", "exclude" ([] if none)) so a
    GenEval reward can score training samples. Tasks cycle in GenEval order, so any prefix is balanced. Image i
    is rendered from its own stream (seed, i): the same seed gives byte-identical files.
    """
    _check_image_size(size)
    if n_images < 0:
        raise UserError(f"n_images must be >= 0, got {n_images}")
    out_dir = Path(out_dir)
    if not owns_folder(out_dir):
        raise UserError(f"{out_dir}: holds files the shapes world did not write (no {MANIFEST}); it writes only "
                        f"into a new or empty folder, or one it wrote before: choose another folder")
    # Claim the folder before the first image: a write killed half-way leaves a folder still marked as ours (and,
    # the claim not being a finished draw's manifest, not current), so the next run writes it again.
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / MANIFEST, json.dumps({"world": "shapes", "complete": False}) + "\n")
    image_dir = out_dir / "images"
    lines = []
    for i, row in enumerate(training_rows(n_images, seed)):
        png = encode_png(render_metadata(row, np.random.default_rng((seed, i)), size).image)
        md5 = hashlib.md5(png).hexdigest()
        image_path = image_dir / f"{md5}.png"
        if not image_path.exists():  # same bytes, same name: an identical render is already there
            atomic_write_bytes(image_path, png)
        line = {"md5": md5, "caption_en": row["prompt"], "bw": size, "bh": size}
        line.update(tag=row["tag"], include=row["include"], exclude=row.get("exclude", []))
        lines.append(json.dumps(line) + "\n")
    jsonl = out_dir / "train.jsonl"
    atomic_write_text(jsonl, "".join(lines))
    atomic_write_text(out_dir / MANIFEST, json.dumps(training_manifest(n_images, seed, size), sort_keys=True) + "\n")
    return jsonl


MANIFEST = "shapes_world.json"  # written beside a generated train.jsonl: what world, split and draw made it


def training_manifest(n_images: int, seed: int, size: int) -> dict[str, Any]:
    """What identifies generated training data: the draw (n_images, seed, size) and the held-out split it avoids."""
    held = json.dumps(sorted(held_out_combinations()), separators=(",", ":"))
    return {"world": "shapes", "held_out_sha256": hashlib.sha256(held.encode()).hexdigest(), "n_images": int(n_images),
            "seed": int(seed), "image_size": int(size)}


def owns_folder(out_dir: str | os.PathLike) -> bool:
    """Whether the shapes world may write training data into out_dir: a folder that does not exist yet, an empty
    one, or one holding its manifest (data it wrote before). Any other folder is the user's and never written."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    if not any(out_dir.iterdir()):
        return True
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("world") == "shapes"


def is_current_training_split(out_dir: str | os.PathLike, n_images: int, seed: int, size: int) -> bool:
    """True when out_dir holds train.jsonl written by this world for exactly this draw. Data from an older split
    (or without a manifest) could use combinations the current test split holds out, so it is not reused."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (out_dir / "train.jsonl").is_file() and manifest == training_manifest(n_images, seed, size)


# ======================================================================================= the exact detector


def _as_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    return array[..., :3]


def _palette_labels(pixels: np.ndarray, max_distance: float) -> np.ndarray:
    """Per pixel: the index (into COLORS) of the palette colour it shows, or -1 for background / nothing.

    Each pixel is explained as a mix of the background and one palette colour, p = bg + a * (colour - bg):
    the projection gives the colour's share `a` and the residual distance says how well that mix explains p.
    A pixel belongs to the colour with the smallest residual among those with a >= 0.5 and residual <=
    `max_distance`. Thresholding the share at one half is what makes blurred or antialiased edges come back at
    the rendered outline instead of eroding, while off-palette pixels explain with nothing and are dropped.
    """
    offset = pixels.astype(np.float32) - _BACKGROUND_RGB  # (..., 3)
    along = offset @ _DIRECTIONS.T  # (..., n_colours): offset . (colour - bg)
    share = np.clip(along / _DIRECTION_NORM2, 0.0, 1.0)
    residual2 = (offset * offset).sum(axis=-1, keepdims=True) - 2.0 * share * along + share**2 * _DIRECTION_NORM2
    residual2[(share < 0.5) | (residual2 > max_distance**2)] = np.inf
    labels = residual2.argmin(axis=-1)
    labels[np.isinf(np.take_along_axis(residual2, labels[..., None], axis=-1)[..., 0])] = _NOTHING
    return labels


def _best_shape(component: np.ndarray) -> tuple[str, float]:
    """The class whose template at the component's box overlaps it best, and that IoU."""
    best_cls, best_iou = SHAPE_CLASSES[0], -1.0
    for cls in SHAPE_CLASSES:
        iou = tolerant_iou(component, shape_mask(cls, *component.shape), 0)
        if iou > best_iou:
            best_cls, best_iou = cls, iou
    return best_cls, best_iou


_SQUARE_NEIGHBOURHOOD = np.ones((3, 3), dtype=bool)


def tolerant_iou(component: np.ndarray, template: np.ndarray, tolerance: int) -> float:
    """IoU of two same-size masks that ignores the pixels within `tolerance` px (8-neighbourhood) of the
    template's outline: a shape drawn a pixel too fat or too thin is the right shape, a notch or bulge deeper
    than that is not. Pixels outside the box count as background. tolerance 0 is the plain IoU; a template
    with no pixel outside its band agrees with any component inside the band (1.0)."""
    if tolerance <= 0:
        inter = int(np.count_nonzero(component & template))
        return inter / (int(component.sum()) + int(template.sum()) - inter)
    t = np.pad(template, tolerance)
    c = np.pad(component, tolerance)
    grown = ndimage.binary_dilation(t, _SQUARE_NEIGHBOURHOOD, iterations=tolerance)
    core = ndimage.binary_erosion(t, _SQUARE_NEIGHBOURHOOD, iterations=tolerance, border_value=0)
    judged = core | ~grown
    union = int(np.count_nonzero((c | t) & judged))
    return int(np.count_nonzero(c & t & judged)) / union if union else 1.0


class ShapesDetector:
    """Exact instance detector for the shapes world (implements backends.Detector).

    Pixels are labelled by `_palette_labels` (a palette colour covering at least half the pixel, within
    `max_color_distance` RGB units, else nothing), so blurred edges come back at the rendered outline and
    off-palette noise forms no objects. Each 4-connected component of one colour, with holes filled and at
    least `min_area` (a fraction of the image area) pixels, is one instance; its class is the template with
    the best IoU at the component's bounding box. Its score, the confidence GenEval's thresholds (0.3, and 0.9
    on counting prompts) apply to, is that template's `tolerant_iou` with `edge_tolerance` px of the outline
    ignored: 1.0 on exact renders and on shapes whose outline is off by up to that much (a real detector is
    not less sure of a circle drawn a pixel too wide), lower the more of the shape is wrong. edge_tolerance 0
    scores the plain IoU. Boxes are (x1, y1, x2, y2) with exclusive ends, matching `render_metadata`.
    """

    classes: tuple[str, ...] = SHAPE_CLASSES

    def __init__(self, max_color_distance: float = DEFAULT_MAX_COLOR_DISTANCE, min_area: float = 0.01,
                 edge_tolerance: int = DEFAULT_EDGE_TOLERANCE):
        if int(edge_tolerance) != edge_tolerance or edge_tolerance < 0:
            raise UserError(f"shapes detector: edge_tolerance must be a whole number of pixels >= 0, got {edge_tolerance!r}")
        self.max_color_distance = float(max_color_distance)
        self.min_area = float(min_area)
        self.edge_tolerance = int(edge_tolerance)

    def detect(self, image: Any) -> list[Detection]:
        rgb = _as_rgb_array(image)
        height, width = rgb.shape[:2]
        labels = _palette_labels(rgb, self.max_color_distance)
        min_pixels = self.min_area * height * width
        detections = []
        for color_index in np.unique(labels):
            if color_index == _NOTHING:
                continue
            components, _ = ndimage.label(labels == color_index)  # default structure: 4-connectivity
            for number, box in enumerate(ndimage.find_objects(components), start=1):
                component = components[box] == number
                if np.count_nonzero(component) < min_pixels:
                    continue
                component = ndimage.binary_fill_holes(component)  # noise punches holes; no shape has any
                cls, _ = _best_shape(component)
                score = tolerant_iou(component, shape_mask(cls, *component.shape), self.edge_tolerance)
                mask = np.zeros((height, width), dtype=bool)
                mask[box] = component
                rows, cols = box
                detections.append(Detection(cls, score, (cols.start, rows.start, cols.stop, rows.stop), mask))
        return detections


class ShapesColorClassifier:
    """The palette colour held by most of an object's pixels (implements backends.ColorClassifier).

    Uses the mask when there is one, else the box minus background pixels; pixels that match no palette colour
    do not vote. An object with no voting pixel gets the colour nearest its mean pixel.
    """

    def __init__(self, max_color_distance: float = DEFAULT_MAX_COLOR_DISTANCE):
        self.max_color_distance = float(max_color_distance)

    def classify(self, image: Any, objects: Sequence[Detection], classname: str) -> list[str]:
        rgb = _as_rgb_array(image)
        return [self._color_of(rgb, obj) for obj in objects]

    def _color_of(self, rgb: np.ndarray, obj: Detection) -> str:
        if obj.mask is not None:
            pixels = rgb[obj.mask]
        else:
            x1, y1, x2, y2 = (int(round(v)) for v in obj.box)
            pixels = rgb[y1:y2, x1:x2].reshape(-1, 3)
        if pixels.size == 0:
            return COLORS[0]
        labels = _palette_labels(pixels, self.max_color_distance)
        votes = np.bincount(labels[labels != _NOTHING], minlength=len(COLORS))
        if votes.any():
            return COLORS[int(votes.argmax())]
        gap = _DIRECTIONS - (pixels.astype(np.float32).mean(axis=0) - _BACKGROUND_RGB)
        return COLORS[int((gap * gap).sum(axis=-1).argmin())]


def make_backend(max_color_distance: float = DEFAULT_MAX_COLOR_DISTANCE, min_area: float = 0.01,
                 edge_tolerance: int = DEFAULT_EDGE_TOLERANCE) -> Backend:
    """The "shapes" GenEval backend: exact detector + majority-colour classifier."""
    return Backend(
        name="shapes",
        version=BACKEND_VERSION if edge_tolerance == DEFAULT_EDGE_TOLERANCE else f"{BACKEND_VERSION}-tol{edge_tolerance}",
        detector=ShapesDetector(max_color_distance=max_color_distance, min_area=min_area,
                                edge_tolerance=edge_tolerance),
        color_classifier=ShapesColorClassifier(max_color_distance=max_color_distance),
    )


# ----------------------------------------------------------------------------------------------- web captions
# A pretraining corpus scraped from the web describes many images wrongly. The shapes world's "web" captions
# reproduce GenEval's own failure modes as caption errors, so that a base pretrained on them has NOT converged on
# the exact captions of the post-training data (the setting of SOAR, arXiv 2604.12617: SFT data is curated data
# the base has not seen). Each wrong caption is the row of one specific misdescription of the same image.

def web_caption(row: Mapping[str, Any], rng: np.random.Generator) -> Row:
    """A wrong description of the image `row` describes, as a GenEval row of the same task:

    single_object / two_object: one object named as another class (two_object keeps the two classes distinct);
    counting: another count in 2..4; colors: another colour; position: another relation ("left of" or "above" for
    an image of "right of"); color_attr: half the time the two colours bound to the wrong objects ("a red circle
    and a blue square" for a blue circle and a red square), else one object given a third colour."""
    tag, inc = row["tag"], row["include"]

    def other(options: Sequence[Any], *avoid: Any) -> Any:
        choices = [o for o in options if o not in avoid]
        return choices[int(rng.integers(len(choices)))]

    if tag == "single_object":
        return grammar.single_object(other(SHAPE_CLASSES, inc[0]["class"]))
    if tag == "two_object":
        a, b = inc[0]["class"], inc[1]["class"]
        if rng.integers(2):
            return grammar.two_object(a, other(SHAPE_CLASSES, a, b))
        return grammar.two_object(other(SHAPE_CLASSES, a, b), b)
    if tag == "counting":
        return grammar.counting(inc[0]["class"], other(range(2, grammar.MAX_COUNT + 1), inc[0]["count"]))
    if tag == "colors":
        return grammar.colors(inc[0]["class"], other(COLORS, inc[0]["color"]))
    if tag == "position":
        target, subject = inc[0]["class"], inc[1]["class"]
        return grammar.position(subject, other(grammar.RELATIONS, inc[1]["position"][0]), target)
    if tag == "color_attr":
        (cls_a, col_a), (cls_b, col_b) = ((c["class"], c["color"]) for c in inc)
        if rng.integers(2):  # binding: each colour on the other object
            return grammar.color_attr(cls_a, col_b, cls_b, col_a)
        if rng.integers(2):
            return grammar.color_attr(cls_a, other(COLORS, col_a, col_b), cls_b, col_b)
        return grammar.color_attr(cls_a, col_a, cls_b, other(COLORS, col_a, col_b))
    raise ValueError(f"unknown tag {tag!r}")


def write_web_captions(jsonl: str | os.PathLike, out: str | os.PathLike, noise: float, seed: int) -> Path:
    """A copy of a shapes train.jsonl (write_training_split's) in which a fraction `noise` of the records (each
    with probability `noise`, drawn from its own stream (seed, line index)) carries a wrong caption (web_caption)
    and its GenEval row, marked "web_wrong": true; the images are the same files. A wrong caption is checked on
    the image itself with the GenEval rules engine and the exact detector (a diagonal "right of" can also be
    "above") and never names a held-out combination, so the test split's prompts stay unseen; up to 20 draws,
    after which the record keeps its true caption. Written atomically; returns `out`."""
    from soarbench.geneval.rules import evaluate_image

    if not 0.0 <= noise <= 1.0:
        raise UserError(f"web caption noise must be in [0, 1], got {noise}")
    jsonl = Path(jsonl)
    detector, colours = ShapesDetector(), ShapesColorClassifier()

    def misdescribes(row: Row, image: np.ndarray) -> bool:
        if uses_held_out(row):
            return False
        return not evaluate_image(row, detector.detect(image), image=image, color_classifier=colours)["correct"]

    lines = []
    for i, line in enumerate(jsonl.read_text().splitlines()):
        rec = json.loads(line)
        rng = np.random.default_rng((seed, i))
        if rng.random() < noise:
            image = np.asarray(Image.open(jsonl.parent / "images" / f"{rec['md5']}.png").convert("RGB"))
            wrong = next((w for w in (web_caption(rec, rng) for _ in range(20)) if misdescribes(w, image)), None)
            if wrong is not None:
                rec.update(caption_en=wrong["prompt"], tag=wrong["tag"], include=wrong["include"],
                           exclude=wrong.get("exclude", []), web_wrong=True)
        lines.append(json.dumps(rec) + "\n")
    out = Path(out)
    atomic_write_text(out, "".join(lines))
    return out


WORLD = World(name="shapes", manifest=MANIFEST, owns_folder=owns_folder, is_current=is_current_training_split,
              write=write_training_split)
