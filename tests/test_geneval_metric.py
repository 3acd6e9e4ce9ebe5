"""GenEvalMetric: the Metric contract over the shapes backend."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from soarbench.errors import UserError
from soarbench.geneval import grammar
from soarbench.geneval.metric import GenEvalMetric
from soarbench.metrics.registry import build_metric
from soarbench.worlds.shapes import render_metadata, shapes_metadata

ROW_FIELDS = ["tag", "prompt", "correct", "reason", "metadata", "details"]


def renders(rows, seed=0):
    return [Image.fromarray(render_metadata(r, np.random.default_rng((seed, i))).image) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def metric():
    return build_metric("geneval")


def test_registry_builds_it_with_a_versioned_info(metric):
    assert isinstance(metric, GenEvalMetric)
    assert metric.info.name == "geneval"
    assert metric.info.version == "geneval-rules-af4902f/shapes-exact-2"
    assert metric.info.scale == "accuracy in [0, 1]" and metric.info.higher_is_better
    assert metric.describe()["version"] == metric.info.version


def test_ground_truth_renders_score_one(metric):
    rows = shapes_metadata("test", n_per_tag=4)
    records = metric.score(renders(rows), [r["prompt"] for r in rows], rows)
    assert len(records) == len(rows)
    for record, row in zip(records, rows):
        assert list(record)[: len(ROW_FIELDS)] == ROW_FIELDS
        assert record["score"] == 1.0 and record["partial_credit"] == 1.0 and record["correct"] is True
        assert record["metadata"] == json.dumps(row) and record["prompt"] == row["prompt"]
        assert "filename" not in record
    summary = metric.summarize(records)
    assert summary["geneval"] == 1.0 and summary["geneval/image_mean"] == 1.0
    assert summary["geneval/prompt_any_correct"] == 1.0
    assert {k for k in summary if k.count("/") == 1} >= {f"geneval/{t}" for t in grammar.TAGS}


def test_wrong_images_fail_and_summary_is_per_task(metric):
    counting = grammar.counting("circle", 3)
    position = grammar.position("square", "left of", "triangle")
    swapped = grammar.position("square", "right of", "triangle")
    rows = [counting, counting, position, position]
    images = renders([counting, grammar.counting("circle", 4), position, swapped])
    records = metric.score(images, [r["prompt"] for r in rows], rows)
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0, 0.0]
    assert records[1]["reason"] == "expected circle<4, found 4"
    assert records[1]["partial_credit"] == pytest.approx(1 - 1 / 3)
    assert records[3]["reason"].startswith("expected square left of target, found right of")
    summary = metric.summarize(records)
    assert summary == {
        "geneval": 0.5,
        "geneval/counting": 0.5,
        "geneval/position": 0.5,
        "geneval/image_mean": 0.5,
        "geneval/paper_avg": 0.5,  # the papers' image-level average (tasks of equal size here)
        "geneval/prompt_any_correct": 1.0,
        "geneval/partial_credit": pytest.approx((1 + 2 / 3 + 1 + 0.75) / 4),
    }


def test_unknown_backend_and_options_suggest_the_nearest():
    with pytest.raises(UserError, match="unknown GenEval backend 'shape'.*did you mean 'shapes'"):
        GenEvalMetric(backend="shape")
    with pytest.raises(UserError, match="unknown GenEval option 'treshold'.*did you mean 'threshold'"):
        GenEvalMetric(treshold=0.5)


def test_options_reach_rules_and_backend():
    metric = GenEvalMetric(threshold="0.5", max_objects=4, min_area=0.02)
    assert metric.rules.threshold == 0.5 and metric.rules.max_objects == 4
    assert metric.backend.detector.min_area == 0.02
    with pytest.raises(UserError, match="must be a float"):
        GenEvalMetric(counting_threshold="high")


def test_inputs_are_validated(metric):
    row = grammar.single_object("circle")
    image = renders([row])
    with pytest.raises(UserError, match="metadata"):
        metric.score(image, [row["prompt"]])
    with pytest.raises(UserError, match="1 images, 2 prompts"):
        metric.score(image, [row["prompt"]] * 2, [row])
    with pytest.raises(UserError, match="does not match its metadata prompt"):
        metric.score(image, ["a photo of a square"], [row])
    assert metric.score(image, ["A photo of a circle "], [row])[0]["score"] == 1.0
    assert math.isnan(metric.summarize([])["geneval"])
