"""GenEval's prompt grammar and the official metadata generator (djghosh13/geneval af4902f, prompts/create_prompts.py).

A GenEval metadata row is a JSON object whose keys come in a fixed order::

    {"tag": ..., "include": [{"class": ..., "count": ..., ("color" | "position"): ...}, ...],
     ("exclude": [...],) "prompt": ...}

The builders below produce exactly those rows for any class list, so the shapes world (five geometric classes)
and the official COCO benchmark (80 classes) share one grammar. `generate_metadata` replays the official
procedure draw for draw: with the 80 COCO names and seed 43 its `dumps_metadata` output is byte-identical to
GenEval's `prompts/evaluation_metadata.jsonl` (a test checks this), so the order of every numpy call here is
load-bearing.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from soarbench.errors import UserError
from soarbench.io import read_jsonl

# The six tasks in the order the official generator runs them (and the order tables report them in).
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Official defaults: counts are drawn from [2, MAX_COUNT] inclusive; no "<colour> person" prompts exist.
MAX_COUNT = 4
NO_COLOR_CLASS = "person"

Row = dict[str, Any]


# ----------------------------------------------------------------------------------------------- words


def with_article(word: str) -> str:
    """"an apple", "a bench": GenEval looks only at the first letter (so it also writes "an orange car")."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    """GenEval's plural: +"es" after a final "s", else +"s" ("buses"; naive elsewhere: "knife" -> "knifes")."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def number_word(count: int) -> str:
    if not 0 <= count < len(NUMBER_WORDS):
        raise ValueError(f"GenEval spells counts 0..{len(NUMBER_WORDS) - 1} only, got {count}")
    return NUMBER_WORDS[count]


# ----------------------------------------------------------------------------------------------- builders
# Each returns a fresh row with GenEval's key order; clause dicts keep "class", "count", then "color"/"position".


def single_object(cls: str) -> Row:
    return {
        "tag": "single_object",
        "include": [{"class": cls, "count": 1}],
        "prompt": f"a photo of {with_article(cls)}",
    }


def two_object(cls_a: str, cls_b: str) -> Row:
    return {
        "tag": "two_object",
        "include": [{"class": cls_a, "count": 1}, {"class": cls_b, "count": 1}],
        "prompt": f"a photo of {with_article(cls_a)} and {with_article(cls_b)}",
    }


def counting(cls: str, count: int) -> Row:
    """"two clocks": at least `count` found, and fewer than `count + 1` (the exclude clause)."""
    return {
        "tag": "counting",
        "include": [{"class": cls, "count": count}],
        "exclude": [{"class": cls, "count": count + 1}],
        "prompt": f"a photo of {number_word(count)} {plural(cls)}",
    }


def colors(cls: str, color: str) -> Row:
    return {
        "tag": "colors",
        "include": [{"class": cls, "count": 1, "color": color}],
        "prompt": f"a photo of {with_article(color)} {cls}",
    }


def position(cls_a: str, relation: str, cls_b: str) -> Row:
    """"A <relation> B". The target B comes first in `include`; A's clause points at it as group 0."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; GenEval has {RELATIONS}")
    return {
        "tag": "position",
        "include": [{"class": cls_b, "count": 1}, {"class": cls_a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of {with_article(cls_a)} {relation} {with_article(cls_b)}",
    }


def color_attr(cls_a: str, color_a: str, cls_b: str, color_b: str) -> Row:
    return {
        "tag": "color_attr",
        "include": [
            {"class": cls_a, "count": 1, "color": color_a},
            {"class": cls_b, "count": 1, "color": color_b},
        ],
        "prompt": f"a photo of {with_article(color_a)} {cls_a} and {with_article(color_b)} {cls_b}",
    }


# ----------------------------------------------------------------------------------------------- official draws
# These mirror the official generator call for call (same numpy methods, same argument shapes, same order);
# any change here changes every prompt after it.


def _draw_class_indices(rng: np.random.Generator, classes: Sequence[str], size: int | None, no_color: bool) -> Any:
    """Class indices for a sampler; with `no_color`, never the index of "person" (when the list has one).

    The official trick draws from n - 1 indices, shifts by one and rotates by person's index, so that every
    class but person is reachable with one draw. Without a person in the list a plain draw over n is used.
    """
    n = len(classes)
    if no_color and NO_COLOR_CLASS in classes:
        skip = classes.index(NO_COLOR_CLASS)
        drawn = rng.choice(n - 1, size=size, replace=False) if size is not None else rng.choice(n - 1)
        return (drawn + 1 + skip) % n
    return rng.choice(n, size=size, replace=False) if size is not None else rng.choice(n)


def sample_single_objects(rng: np.random.Generator, classes: Sequence[str]) -> list[Row]:
    """Every class once, in the order of one draw without replacement (not `rng.permutation`: other draws)."""
    return [single_object(classes[int(i)]) for i in rng.choice(len(classes), size=len(classes), replace=False)]


def sample_two_object(rng: np.random.Generator, classes: Sequence[str]) -> Row:
    idx_a, idx_b = rng.choice(len(classes), size=2, replace=False)
    return two_object(classes[int(idx_a)], classes[int(idx_b)])


def sample_counting(rng: np.random.Generator, classes: Sequence[str], max_count: int = MAX_COUNT) -> Row:
    idx = rng.choice(len(classes))
    count = int(rng.integers(2, max_count, endpoint=True))
    return counting(classes[int(idx)], count)


def sample_colors(rng: np.random.Generator, classes: Sequence[str]) -> Row:
    idx = _draw_class_indices(rng, classes, size=None, no_color=True)
    color = COLORS[int(rng.choice(len(COLORS)))]
    return colors(classes[int(idx)], color)


def sample_position(rng: np.random.Generator, classes: Sequence[str]) -> Row:
    idx_a, idx_b = rng.choice(len(classes), size=2, replace=False)
    relation = RELATIONS[int(rng.choice(len(RELATIONS)))]
    return position(classes[int(idx_a)], relation, classes[int(idx_b)])


def sample_color_attr(rng: np.random.Generator, classes: Sequence[str]) -> Row:
    idx_a, idx_b = _draw_class_indices(rng, classes, size=2, no_color=True)
    cidx_a, cidx_b = rng.choice(len(COLORS), size=2, replace=False)
    return color_attr(classes[int(idx_a)], COLORS[int(cidx_a)], classes[int(idx_b)], COLORS[int(cidx_b)])


# ----------------------------------------------------------------------------------------------- suite


def canonical_key(row: Row) -> str:
    """A dedup key equivalent to the official `yaml.safe_dump(sample)`.

    safe_dump sorts mapping keys and writes tuples as lists; for rows made only of str/int/list/dict, two rows
    share a YAML dump exactly when they share a key-sorted JSON dump, so PyYAML is not needed.
    """
    return json.dumps(row, sort_keys=True)


def dedup(rows: Sequence[Row]) -> list[Row]:
    """First occurrence of each distinct row, in order."""
    seen: set[str] = set()
    unique = []
    for row in rows:
        key = canonical_key(row)
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def generate_metadata(
    classes: Sequence[str], seed: int = 43, n: int = 100, rng: np.random.Generator | None = None
) -> list[Row]:
    """The official GenEval suite for `classes`: all single objects, then n draws of each other task, deduplicated.

    `rng` (if given) is used instead of `default_rng(seed)`. With the 80 COCO names, seed 43 and n = 100 this is
    the 553-row official file.
    """
    classes = list(classes)
    if len(classes) < 2:
        raise ValueError("GenEval's two-class tasks need at least two classes")
    rng = rng if rng is not None else np.random.default_rng(seed)
    rows = sample_single_objects(rng, classes)
    for sampler in (sample_two_object, sample_counting, sample_colors, sample_position, sample_color_attr):
        rows.extend(sampler(rng, classes) for _ in range(n))
    return dedup(rows)


def dumps_metadata(rows: Sequence[Row]) -> str:
    """The official file format: one `json.dumps(row)` (default separators) per line, each ending in a newline."""
    return "".join(json.dumps(row) + "\n" for row in rows)


def load_metadata(path: str | os.PathLike) -> list[Row]:
    """Read a GenEval metadata jsonl; a malformed row is a UserError naming file:line."""
    rows = []
    for lineno, row in read_jsonl(path, required=("tag", "include", "prompt")):
        if not isinstance(row["include"], list) or not all(isinstance(c, dict) for c in row["include"]):
            raise UserError(f"{path}:{lineno}: 'include' must be a list of objects")
        for clause in row["include"] + list(row.get("exclude", [])):
            if "class" not in clause or "count" not in clause:
                raise UserError(f"{path}:{lineno}: every clause needs 'class' and 'count'")
        rows.append(row)
    return rows
