"""GenEval's decision rules as a pure engine over detections (djghosh13/geneval af4902f, evaluation/evaluate_images.py).

The official evaluator runs Mask2Former, keeps per class the detections above a confidence threshold (0.9 for
every class when the tag is "counting", else 0.3) in score order, at most 16 of them, with NMS off, and then
checks the metadata row clause by clause. Everything after the detector is reproduced here without any model:

* include clauses are ANDed: the class must have >= count objects; colour and position are judged on the
  top-`count` objects only (the most confident ones);
* colour: a colour classifier labels each top-`count` crop, and >= count of them must carry the colour;
* position: every top-`count` object must stand in the relation to every object of the target clause's group,
  by `relative_position` (centre offset shrunk by 10 % of the summed box sizes, per axis);
* exclude clauses are ORed: the image fails if any class has >= the clause's count objects.

`evaluate_image` returns a row in the official results.jsonl format; `summarize` computes the official summary
(overall = unweighted mean of the per-task accuracies). `partial_credit` is Flow-GRPO's dense training reward
(see its docstring for exactly what is followed). Boxes are (x1, y1, x2, y2) in pixels with y pointing down; a
renderer that fills columns x1..x2-1 should report x2 exclusive, as mmdetection's boxes are continuous.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from soarbench.geneval.grammar import COLORS, TAGS

Box = tuple[float, float, float, float]
Objects = dict[str, list["Detection"]]
# (class name, detections of that class) -> one colour name per detection, in order.
ColorsOf = Callable[[str, Sequence["Detection"]], list[str]]

# Below this, a revised offset counts as zero on both axes: the boxes are "on top of each other" (official 1e-3).
_NO_RELATION_EPS = 1e-3


@dataclass(frozen=True)
class Detection:
    """One detected instance: class name, confidence, pixel box (x1, y1, x2, y2), optional HxW boolean mask."""

    cls: str
    score: float
    box: Box
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    def row_box(self) -> list[float]:
        """The official details format: [x1, y1, x2, y2, score]."""
        return [float(v) for v in self.box] + [float(self.score)]


@dataclass(frozen=True)
class RuleConfig:
    """The official `--options` that change decisions (defaults = the published GenEval numbers)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    position_threshold: float = 0.1

    def confidence_threshold(self, tag: str) -> float:
        # The official evaluator raises the bar for *every* class on counting prompts, not only the counted one.
        return self.counting_threshold if tag == "counting" else self.threshold


DEFAULT_RULES = RuleConfig()


# ----------------------------------------------------------------------------------------------- geometry


def relative_position(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.1) -> set[str]:
    """The relations that hold for A relative to B ("A is left of B", ...), y pointing down.

    offset = centre(A) - centre(B); per axis the offset is shrunk towards zero by `margin` times the summed box
    sizes on that axis (so barely separated boxes relate on neither axis); if both shrunk components are ~0 no
    relation holds. Otherwise the shrunk offset is divided by the length of the *unshrunk* offset and a
    relation holds where that component passes +-0.5, i.e. roughly within 60 degrees of the axis.
    """
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a[:4])
    bx1, by1, bx2, by2 = (float(v) for v in box_b[:4])
    offset = ((ax1 + ax2 - bx1 - bx2) / 2.0, (ay1 + ay2 - by1 - by2) / 2.0)
    dims = (abs(ax2 - ax1) + abs(bx2 - bx1), abs(ay2 - ay1) + abs(by2 - by1))
    revised = [math.copysign(max(abs(o) - margin * d, 0.0), o) for o, d in zip(offset, dims)]
    if all(abs(r) < _NO_RELATION_EPS for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


# ----------------------------------------------------------------------------------------------- selection


def _above(score: float, threshold: float) -> bool:
    # mmdetection's scores are float32 arrays and numpy compares them with the Python threshold in float32, so a
    # score of exactly float32(0.3) is NOT above 0.3 there (in float64 it would be).
    return bool(np.float32(score) > np.float32(threshold))


def select_objects(
    detections: Iterable[Detection],
    tag: str,
    config: RuleConfig = DEFAULT_RULES,
    class_order: Sequence[str] | None = None,
) -> Objects:
    """Per class, the detections scoring strictly above the tag's threshold, best first, at most max_objects.

    Classes with nothing left are absent. Keys follow `class_order` (the detector's class list, as the official
    details JSON does), then any other class in order of first appearance. Ties keep detector order.
    """
    threshold = config.confidence_threshold(tag)
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for det in detections:
        by_class[det.cls].append(det)
    ordered = [c for c in (class_order or ()) if c in by_class] + [c for c in by_class if c not in (class_order or ())]
    objects: Objects = {}
    for cls in ordered:
        kept = sorted((d for d in by_class[cls] if _above(d.score, threshold)), key=lambda d: -d.score)
        if kept:
            objects[cls] = kept[: config.max_objects]
    return objects


# ----------------------------------------------------------------------------------------------- the verdict


def _color_reason(clause: Mapping[str, Any], colors: list[str]) -> str:
    wanted, cls, count = clause["color"], clause["class"], clause["count"]
    tally = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
    return f"expected {wanted} {cls}>={count}, found {colors.count(wanted)} {wanted}; and {tally}"


def _target_group(clause: Mapping[str, Any], groups: list[list[Detection] | None]) -> tuple[str, int]:
    relation, target = clause["position"]
    if not 0 <= int(target) < len(groups):
        raise ValueError(f"position clause of {clause['class']!r} targets group {target}: not an earlier clause")
    return relation, int(target)


def _first_position_failure(
    found: Sequence[Detection], targets: Sequence[Detection], relation: str, margin: float
) -> set[str] | None:
    """The relations actually found for the first (object, target) pair that misses `relation`, or None."""
    for obj in found:
        for target in targets:
            actual = relative_position(obj.box, target.box, margin)
            if relation not in actual:
                return actual
    return None


def _require_colors(colors_of: ColorsOf | None) -> ColorsOf:
    if colors_of is None:
        raise ValueError("this metadata has a colour clause but no colour classifier was given")
    return colors_of


def evaluate(
    metadata: Mapping[str, Any],
    objects: Mapping[str, Sequence[Detection]],
    colors_of: ColorsOf | None = None,
    config: RuleConfig = DEFAULT_RULES,
) -> tuple[bool, str]:
    """(correct, reason) for one image, given its selected objects; reason lines are joined with newlines."""
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []  # per include clause: its top-count objects if it held, else None
    for clause in metadata.get("include", []):
        cls, count = clause["class"], int(clause["count"])
        found = list(objects.get(cls, []))[:count]
        held = len(found) >= count
        if not held:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colors = _require_colors(colors_of)(cls, found)
                if colors.count(clause["color"]) < count:
                    held = False
                    reasons.append(_color_reason(clause, colors))
            # Like the official code, position is only judged once count and colour have held.
            if "position" in clause and held:
                relation, target = _target_group(clause, groups)
                if groups[target] is None:
                    held = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    actual = _first_position_failure(found, groups[target], relation, config.position_threshold)
                    if actual is not None:
                        held = False
                        reasons.append(f"expected {cls} {relation} target, found {' and '.join(actual)} target")
        correct = correct and held
        groups.append(found if held else None)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], int(clause["count"])
        n_found = len(objects.get(cls, []))
        if n_found >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {n_found}")
    return correct, "\n".join(reasons)


def partial_credit(
    metadata: Mapping[str, Any],
    objects: Mapping[str, Sequence[Detection]],
    colors_of: ColorsOf | None = None,
    config: RuleConfig = DEFAULT_RULES,
) -> float:
    """Flow-GRPO's dense GenEval reward: the mean of per-clause terms.

    Followed exactly from yifan123/reward-server `reward_server/gen_eval.py::evaluate_reward` (the server that
    Flow-GRPO's `geneval_score` queries, whose "score" is the training reward):

    * every include clause adds 1 - |count - n| / count, where n is the number of *all* selected objects of the
      class (threshold and 16-cap applied, not truncated to count). It is not clipped: 3 cats for "a cat"
      give 1 - 2/1 = -1.
    * a clause with a colour or position adds a second term, 0.0 if n != count. Otherwise colour adds
      1 - |count - k| / count (k = objects classified as the colour), and position adds 0.0 when its target
      clause did not match and 1.0 when every object stands in the relation to every target object.
    * upstream quirk, kept so rewards match: when the relation fails for some pair the server appends 0.0 *and*
      then 1.0, so a wrong position costs less than a missing one. Groups match on exact counts (n == count,
      and colours all correct) rather than on GenEval's >=.
    * exclude clauses do not enter the reward; no clauses at all gives 0.
    """
    terms: list[float] = []
    groups: list[list[Detection] | None] = []
    for clause in metadata.get("include", []):
        cls, count = clause["class"], int(clause["count"])
        found = list(objects.get(cls, []))
        terms.append(1.0 - abs(count - len(found)) / count)
        held = len(found) == count
        if not held:
            if "color" in clause or "position" in clause:
                terms.append(0.0)
        else:
            if "color" in clause:
                n_color = _require_colors(colors_of)(cls, found).count(clause["color"])
                terms.append(1.0 - abs(count - n_color) / count)
                held = n_color == count
            if "position" in clause and held:
                relation, target = _target_group(clause, groups)
                if groups[target] is None:
                    held = False
                    terms.append(0.0)
                else:
                    if _first_position_failure(found, groups[target], relation, config.position_threshold) is not None:
                        held = False
                        terms.append(0.0)
                    terms.append(1.0)  # appended whether or not the relation held (upstream behaviour)
        groups.append(found if held else None)
    return sum(terms) / len(terms) if terms else 0.0


class _MemoColors:
    """Classify colours once per (class, objects) per image: `evaluate` and `partial_credit` ask the same thing."""

    def __init__(self, classify: Callable[[Any, Sequence[Detection], str], list[str]], image: Any):
        self._classify, self._image = classify, image
        self._cache: dict[tuple[str, tuple[int, ...]], list[str]] = {}

    def __call__(self, cls: str, objs: Sequence[Detection]) -> list[str]:
        key = (cls, tuple(id(o) for o in objs))
        if key not in self._cache:
            self._cache[key] = list(self._classify(self._image, objs, cls))
        return self._cache[key]


def evaluate_image(
    metadata: Mapping[str, Any],
    detections: Iterable[Detection],
    *,
    image: Any = None,
    color_classifier: Any = None,
    filename: str | None = None,
    config: RuleConfig = DEFAULT_RULES,
    class_order: Sequence[str] | None = None,
    with_partial_credit: bool = False,
) -> dict[str, Any]:
    """One official results.jsonl row for one image's raw detections.

    `color_classifier` has `classify(image, detections, classname) -> list[str]` (see backends.ColorClassifier);
    it is only called when a colour clause is reached. The row is {filename, tag, prompt, correct, reason,
    metadata (the row as a JSON string), details (JSON {class: [[x1, y1, x2, y2, score], ...]} of every selected
    object)}, plus "partial_credit" when asked.
    """
    objects = select_objects(detections, metadata["tag"], config, class_order)
    colors_of = _MemoColors(color_classifier.classify, image) if color_classifier is not None else None
    correct, reason = evaluate(metadata, objects, colors_of, config)
    row: dict[str, Any] = {
        "filename": filename,
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(dict(metadata)),
        "details": json.dumps({cls: [d.row_box() for d in objs] for cls, objs in objects.items()}),
    }
    if with_partial_credit:
        row["partial_credit"] = partial_credit(metadata, objects, colors_of, config)
    return row


# ----------------------------------------------------------------------------------------------- summary


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def _prompt_key(row: Mapping[str, Any]) -> str:
    # The official summary groups prompts by the metadata JSON string; accept an already-parsed dict too.
    meta = row["metadata"]
    return meta if isinstance(meta, str) else json.dumps(meta)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The official summary of result rows.

    Returns {"overall": mean of the per-task accuracies (unweighted, over the tasks present), "tasks": {tag:
    accuracy} (the six GenEval tags in their order, then any other tag), "image_mean": fraction of correct
    images, "prompt_any_correct": fraction of prompts (grouped by metadata) with at least one correct image,
    "n_images", "n_prompts"}. Empty input gives NaN accuracies.
    """
    by_tag: dict[str, list[float]] = defaultdict(list)
    by_prompt: dict[str, bool] = {}
    for row in rows:
        ok = bool(row["correct"])
        by_tag[row["tag"]].append(float(ok))
        key = _prompt_key(row)
        by_prompt[key] = by_prompt.get(key, False) or ok
    order = [t for t in TAGS if t in by_tag] + [t for t in by_tag if t not in TAGS]
    tasks = {tag: _mean(by_tag[tag]) for tag in order}
    return {
        "overall": _mean(list(tasks.values())),
        "tasks": tasks,
        "image_mean": _mean([float(bool(r["correct"])) for r in rows]),
        "prompt_any_correct": _mean([float(v) for v in by_prompt.values()]),
        "n_images": len(rows),
        "n_prompts": len(by_prompt),
    }
