"""GenEval's prompt grammar and the official generator, checked byte for byte against the published file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from soarbench.errors import UserError
from soarbench.geneval import grammar

PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
OFFICIAL_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"

needs_shared = pytest.mark.skipif(not PROMPTS.is_dir(), reason="../shared/data/prompts is not present")


def coco_names() -> list[str]:
    return [line.strip() for line in (PROMPTS / "geneval_object_names.txt").read_text().splitlines() if line.strip()]


@needs_shared
def test_official_metadata_is_reproduced_byte_for_byte():
    text = grammar.dumps_metadata(grammar.generate_metadata(coco_names(), seed=43, n=100))
    official = (PROMPTS / "geneval_evaluation_metadata.jsonl").read_bytes()
    assert hashlib.sha256(official).hexdigest() == OFFICIAL_SHA256
    assert text.encode("utf-8") == official


@needs_shared
def test_official_suite_has_the_published_task_sizes():
    rows = grammar.generate_metadata(coco_names())
    sizes = {tag: sum(r["tag"] == tag for r in rows) for tag in grammar.TAGS}
    assert sizes == {
        "single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100,
    }
    assert len(rows) == 553


@needs_shared
def test_official_file_loads_and_round_trips():
    path = PROMPTS / "geneval_evaluation_metadata.jsonl"
    rows = grammar.load_metadata(path)
    assert grammar.dumps_metadata(rows) == path.read_text()


def test_words():
    assert grammar.with_article("apple") == "an apple"
    assert grammar.with_article("orange") == "an orange"
    assert grammar.with_article("umbrella") == "an umbrella"
    assert grammar.with_article("bench") == "a bench"
    assert grammar.plural("bus") == "buses"
    assert grammar.plural("cross") == "crosses"
    assert grammar.plural("knife") == "knifes"  # GenEval's rule, not English
    assert grammar.plural("circle") == "circles"
    assert grammar.number_word(0) == "zero" and grammar.number_word(10) == "ten"
    with pytest.raises(ValueError):
        grammar.number_word(11)


def test_builders_use_geneval_key_order_and_wording():
    assert json.dumps(grammar.counting("clock", 2)) == (
        '{"tag": "counting", "include": [{"class": "clock", "count": 2}], '
        '"exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}'
    )
    assert json.dumps(grammar.position("dog", "right of", "teddy bear")) == (
        '{"tag": "position", "include": [{"class": "teddy bear", "count": 1}, '
        '{"class": "dog", "count": 1, "position": ["right of", 0]}], '
        '"prompt": "a photo of a dog right of a teddy bear"}'
    )
    assert grammar.color_attr("wine glass", "purple", "apple", "orange")["prompt"] == (
        "a photo of a purple wine glass and an orange apple"
    )
    assert grammar.colors("car", "orange")["prompt"] == "a photo of an orange car"
    assert grammar.two_object("cat", "elephant")["prompt"] == "a photo of a cat and an elephant"
    assert grammar.single_object("oven") == {
        "tag": "single_object", "include": [{"class": "oven", "count": 1}], "prompt": "a photo of an oven",
    }
    with pytest.raises(ValueError):
        grammar.position("cat", "behind", "dog")


def test_person_is_never_coloured_but_is_still_drawn_elsewhere():
    classes = ["person", "cat", "dog", "car"]
    rows = grammar.generate_metadata(classes, seed=1, n=300)
    coloured = {c["class"] for r in rows if r["tag"] in ("colors", "color_attr") for c in r["include"]}
    assert coloured == {"cat", "dog", "car"}
    assert any(c["class"] == "person" for r in rows if r["tag"] == "two_object" for c in r["include"])


def test_without_person_every_class_can_be_coloured():
    classes = ["circle", "square", "triangle", "cross", "diamond"]
    rows = grammar.generate_metadata(classes, seed=3, n=200)
    for tag in ("colors", "color_attr"):
        assert {c["class"] for r in rows if r["tag"] == tag for c in r["include"]} == set(classes)
    assert sorted(r["include"][0]["class"] for r in rows if r["tag"] == "single_object") == sorted(classes)


def test_generation_is_deterministic_and_rng_overrides_seed():
    classes = ["a", "b", "c", "d"]
    assert grammar.generate_metadata(classes, seed=5) == grammar.generate_metadata(classes, seed=5)
    assert grammar.generate_metadata(classes, seed=5) != grammar.generate_metadata(classes, seed=6)
    with_rng = grammar.generate_metadata(classes, seed=999, rng=np.random.default_rng(5))
    assert with_rng == grammar.generate_metadata(classes, seed=5)


def test_dedup_keeps_first_occurrence_and_ignores_key_order():
    a = grammar.two_object("cat", "dog")
    reordered = {"prompt": a["prompt"], "include": a["include"], "tag": a["tag"]}
    b = grammar.two_object("dog", "cat")
    assert grammar.dedup([a, b, reordered, b]) == [a, b]
    assert grammar.canonical_key(a) == grammar.canonical_key(reordered)


def test_generated_rows_are_unique_and_well_formed():
    rows = grammar.generate_metadata(["p", "q", "r"], seed=0, n=50)
    keys = [grammar.canonical_key(r) for r in rows]
    assert len(keys) == len(set(keys))
    for row in rows:
        assert list(row)[:2] == ["tag", "include"] and list(row)[-1] == "prompt"
        if row["tag"] == "position":
            assert row["include"][1]["position"][1] == 0


def test_load_metadata_names_the_bad_line(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(grammar.dumps_metadata([grammar.single_object("cat")]) + '{"tag": "colors", "prompt": "x"}\n')
    with pytest.raises(UserError, match=r"meta\.jsonl:2: missing field 'include'"):
        grammar.load_metadata(path)
    path.write_text('{"tag": "colors", "include": [{"class": "cat"}], "prompt": "x"}\n')
    with pytest.raises(UserError, match=r":1: every clause needs"):
        grammar.load_metadata(path)
