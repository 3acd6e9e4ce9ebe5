"""GenEval's decision rules on hand-made detections."""
from __future__ import annotations

import json
import math

import pytest

from soarbench.geneval import grammar
from soarbench.geneval.rules import (
    Detection,
    RuleConfig,
    evaluate_image,
    partial_credit,
    relative_position,
    select_objects,
    summarize,
)

OFFICIAL_ROW_KEYS = ["filename", "tag", "prompt", "correct", "reason", "metadata", "details"]


def det(cls: str, x: float, y: float, score: float = 0.99, side: float = 10.0) -> Detection:
    """A square detection of `side` px whose top-left corner is (x, y)."""
    return Detection(cls, score, (x, y, x + side, y + side))


class StubColors:
    """A colour classifier reading colours from a {box: colour} table; records what it was asked."""

    def __init__(self, table: dict):
        self.table, self.calls = table, []

    def classify(self, image, objects, classname):
        self.calls.append((classname, len(objects)))
        return [self.table[o.box] for o in objects]


def judge(meta, detections, colors=None, **kw):
    return evaluate_image(meta, detections, color_classifier=colors, with_partial_credit=True, **kw)


# ----------------------------------------------------------------------------------------------- position


@pytest.mark.parametrize(
    "offset, expected",
    [((-30, 0), {"left of"}), ((30, 0), {"right of"}), ((0, -30), {"above"}), ((0, 30), {"below"})],
)
def test_each_relation_with_y_pointing_down(offset, expected):
    b = (20, 20, 30, 30)
    a = (20 + offset[0], 20 + offset[1], 30 + offset[0], 30 + offset[1])
    assert relative_position(a, b) == expected


def test_diagonal_holds_both_relations_and_steep_offsets_only_one():
    b = (0, 0, 2, 2)
    assert relative_position((40, 40, 42, 42), b) == {"right of", "below"}
    # At 70 degrees from the x axis the horizontal share (cos 70 ~ 0.34) is under one half.
    dx, dy = 40 * math.cos(math.radians(70)), 40 * math.sin(math.radians(70))
    assert relative_position((dx, -dy, dx + 2, -dy + 2), b) == {"above"}


def test_coincident_boxes_relate_in_no_way():
    assert relative_position((5, 5, 15, 15), (5, 5, 15, 15)) == set()


def test_margin_boundary_along_x():
    # Both boxes 10 px wide: the margin shrinks the x offset by 0.1 * (10 + 10) = 2 px, and the relation needs
    # (offset - 2) / offset > 0.5, i.e. a centre offset of more than 4 px.
    b = (0, 0, 10, 10)
    assert relative_position((4.5, 0, 14.5, 10), b) == {"right of"}  # passes with the margin
    assert relative_position((4.0, 0, 14.0, 10), b) == set()  # exactly 0.5: fails
    # Fails only because of the margin: without it a 3 px offset is plainly "right of".
    assert relative_position((3, 0, 13, 10), b) == set()
    assert relative_position((3, 0, 13, 10), b, margin=0.0) == {"right of"}


def test_margin_removes_the_weak_axis_of_a_diagonal():
    # offset (10, 6) between 5-wide, 20-tall boxes: without a margin it is also "below" (6 / 11.66 = 0.51);
    # the y shrink of 0.1 * 40 = 4 px leaves only "right of". The expected relation holds thanks to the margin
    # scaling the weak axis away, and an "A below B" prompt fails only because of it.
    a, b = (10, 6, 15, 26), (0, 0, 5, 20)
    assert relative_position(a, b, margin=0.0) == {"right of", "below"}
    assert relative_position(a, b) == {"right of"}
    meta = grammar.position("cat", "below", "dog")
    detections = [Detection("dog", 0.9, b), Detection("cat", 0.9, a)]
    assert judge(meta, detections)["correct"] is False
    assert judge(meta, detections, config=RuleConfig(position_threshold=0.0))["correct"] is True


def test_margin_shrink_to_zero_means_no_relation():
    # Centres 1.5 px apart, boxes 10 px: both shrunk components are 0 -> no relation, not a division by ~0.
    assert relative_position((1.5, 1.0, 11.5, 11.0), (0, 0, 10, 10)) == set()


@pytest.mark.parametrize("relation", grammar.RELATIONS)
def test_position_prompt_passes_and_fails(relation):
    meta = grammar.position("cat", relation, "dog")
    dx, dy = {"left of": (-30, 0), "right of": (30, 0), "above": (0, -30), "below": (0, 30)}[relation]
    good = [det("dog", 40, 40), det("cat", 40 + dx, 40 + dy)]
    bad = [det("dog", 40, 40), det("cat", 40 - dx, 40 - dy)]
    assert judge(meta, good)["correct"] is True
    row = judge(meta, bad)
    assert row["correct"] is False
    assert row["reason"].startswith(f"expected cat {relation} target, found ")


def test_every_top_object_must_hold_against_every_target():
    meta = {
        "tag": "position",
        "include": [{"class": "dog", "count": 2}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
        "prompt": "a photo of a cat left of two dogs",
    }
    cat = det("cat", 0, 40)
    assert judge(meta, [det("dog", 40, 40), det("dog", 70, 40), cat])["correct"] is True
    # the second dog is left of the cat: the cat is not left of *every* dog
    assert judge(meta, [det("dog", 40, 40), det("dog", -40, 40, score=0.8), cat])["correct"] is False
    # ... but a third, less confident dog is not part of the target group (only the top-2 are)
    assert judge(meta, [det("dog", 40, 40), det("dog", 70, 40), det("dog", -40, 40, score=0.5), cat])["correct"]


def test_position_needs_its_target_clause_to_hold():
    meta = grammar.position("cat", "left of", "dog")
    row = judge(meta, [det("cat", 0, 0)])
    assert row["correct"] is False
    assert row["reason"] == "expected dog>=1, found 0\nno target for cat to be left of"


# ----------------------------------------------------------------------------------------------- selection


def test_threshold_is_strict_and_counting_raises_it_for_every_class():
    detections = [det("cat", 0, 0, score=0.3), det("cat", 20, 0, score=0.31), det("dog", 40, 0, score=0.5)]
    objects = select_objects(detections, "two_object")
    assert [d.score for d in objects["cat"]] == [0.31] and len(objects["dog"]) == 1
    assert select_objects(detections, "counting") == {}


def test_counting_threshold_0_9_vs_0_3():
    meta = grammar.counting("cat", 2)
    assert judge(meta, [det("cat", 0, 0, 0.95), det("cat", 20, 0, 0.92)])["correct"] is True
    row = judge(meta, [det("cat", 0, 0, 0.95), det("cat", 20, 0, 0.85)])
    assert row["correct"] is False and row["reason"] == "expected cat>=2, found 1"
    # the same 0.85 detection counts under the default 0.3 threshold of every other task
    assert judge(grammar.two_object("cat", "dog"), [det("cat", 0, 0, 0.85), det("dog", 20, 0, 0.85)])["correct"]
    # a third cat fails the exclude clause only when it passes the 0.9 bar
    assert judge(meta, [det("cat", 0, 0, 0.95), det("cat", 20, 0, 0.92), det("cat", 40, 0, 0.5)])["correct"]
    row = judge(meta, [det("cat", 0, 0, 0.95), det("cat", 20, 0, 0.92), det("cat", 40, 0, 0.91)])
    assert row["correct"] is False and row["reason"] == "expected cat<3, found 3"


def test_at_most_16_objects_per_class_best_first():
    detections = [det("cat", 12 * i, 0, score=0.4 + 0.01 * i) for i in range(20)]
    objects = select_objects(detections, "single_object")
    assert len(objects["cat"]) == 16
    assert [d.score for d in objects["cat"]] == sorted((d.score for d in detections), reverse=True)[:16]
    # so an exclude clause of 17 can never fire, however many are detected
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}],
            "exclude": [{"class": "cat", "count": 17}], "prompt": "a photo of a cat"}
    row = judge(meta, detections)
    assert row["correct"] is True and len(json.loads(row["details"])["cat"]) == 16
    assert judge(meta, detections, config=RuleConfig(max_objects=17))["correct"] is False


def test_selection_follows_class_order_and_keeps_ties_in_detector_order():
    detections = [det("dog", 0, 0, 0.5), det("cat", 20, 0, 0.7), det("cat", 40, 0, 0.7)]
    objects = select_objects(detections, "two_object", class_order=["cat", "dog"])
    assert list(objects) == ["cat", "dog"]
    assert [d.box[0] for d in objects["cat"]] == [20, 40]


def test_exclude_clause_fails_at_its_count():
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}],
            "exclude": [{"class": "dog", "count": 1}], "prompt": "a photo of a cat"}
    assert judge(meta, [det("cat", 0, 0)])["correct"] is True
    row = judge(meta, [det("cat", 0, 0), det("dog", 20, 0)])
    assert row["correct"] is False and row["reason"] == "expected dog<1, found 1"


# ----------------------------------------------------------------------------------------------- colour


def test_colour_is_judged_on_the_top_count_objects_only():
    cats = [det("cat", 0, 0, 0.9), det("cat", 20, 0, 0.8)]
    colors = StubColors({cats[0].box: "red", cats[1].box: "blue"})
    assert judge(grammar.colors("cat", "red"), cats, colors)["correct"] is True
    assert colors.calls == [("cat", 1)]
    assert judge(grammar.colors("cat", "blue"), cats, colors)["correct"] is False


def test_colours_are_classified_once_per_image():
    cat = det("cat", 0, 0)
    colors = StubColors({cat.box: "red"})
    row = judge(grammar.colors("cat", "red"), [cat], colors)
    assert row["correct"] is True and row["partial_credit"] == 1.0
    assert colors.calls == [("cat", 1)]  # evaluate and partial credit both needed it


def test_colour_majority_needs_count_matching_crops():
    meta = {"tag": "colors", "include": [{"class": "cat", "count": 2, "color": "red"}], "prompt": "two red cats"}
    cats = [det("cat", 0, 0, 0.9), det("cat", 20, 0, 0.8), det("cat", 40, 0, 0.7)]
    mixed = StubColors({cats[0].box: "red", cats[1].box: "blue", cats[2].box: "red"})
    row = judge(meta, cats, mixed)
    assert row["correct"] is False
    assert row["reason"] == "expected red cat>=2, found 1 red; and 1 red, 1 blue"
    both = StubColors({cats[0].box: "red", cats[1].box: "red", cats[2].box: "blue"})
    assert judge(meta, cats, both)["correct"] is True


def test_colour_attribution_checks_each_clause():
    meta = grammar.color_attr("cat", "red", "dog", "blue")
    cat, dog = det("cat", 0, 0), det("dog", 20, 0)
    assert judge(meta, [cat, dog], StubColors({cat.box: "red", dog.box: "blue"}))["correct"] is True
    row = judge(meta, [cat, dog], StubColors({cat.box: "red", dog.box: "red"}))
    assert row["correct"] is False and row["reason"] == "expected blue dog>=1, found 0 blue; and 1 red"


def test_colour_clause_without_classifier_is_a_programming_error():
    with pytest.raises(ValueError, match="colour classifier"):
        evaluate_image(grammar.colors("cat", "red"), [det("cat", 0, 0)])


# ----------------------------------------------------------------------------------------------- row format


def test_row_is_the_official_results_format():
    meta = grammar.two_object("cat", "dog")
    row = evaluate_image(meta, [det("dog", 20, 0, 0.5), det("cat", 0, 0, 0.75)], filename="00000/samples/0000.png",
                         class_order=["cat", "dog"])
    assert list(row) == OFFICIAL_ROW_KEYS
    assert row["metadata"] == json.dumps(meta)
    assert json.loads(row["details"]) == {"cat": [[0, 0, 10, 10, 0.75]], "dog": [[20, 0, 30, 10, 0.5]]}
    assert row["correct"] is True and row["reason"] == ""
    assert "partial_credit" not in row


# ----------------------------------------------------------------------------------------------- partial credit


@pytest.mark.parametrize(
    "meta, detections, expected",
    [
        (grammar.single_object("cat"), [det("cat", 0, 0)], 1.0),
        (grammar.single_object("cat"), [], 0.0),
        # not clipped: three cats for "a cat" is 1 - 2/1
        (grammar.single_object("cat"), [det("cat", 0, 0), det("cat", 20, 0), det("cat", 40, 0)], -1.0),
        (grammar.two_object("cat", "dog"), [det("cat", 0, 0)], 0.5),
        # counts use every selected object, not the top-count ones: 3 of 2 -> 1 - 1/2
        (grammar.counting("cat", 2), [det("cat", 0, 0), det("cat", 20, 0), det("cat", 40, 0)], 0.5),
        # position: B term, A term, relation term
        (grammar.position("cat", "left of", "dog"), [det("dog", 40, 0), det("cat", 0, 0)], 1.0),
        # missing target: [0 (dog), 1 (cat), 0 (no target)]
        (grammar.position("cat", "left of", "dog"), [det("cat", 0, 0)], 1 / 3),
        # wrong side: upstream appends 0.0 and then 1.0 -> [1, 1, 0, 1]
        (grammar.position("cat", "left of", "dog"), [det("dog", 0, 0), det("cat", 40, 0)], 0.75),
        # a count mismatch on a position clause adds a 0 term: [1 (dog), 0 (2 cats), 0]
        (grammar.position("cat", "left of", "dog"), [det("dog", 40, 0), det("cat", 0, 0), det("cat", 0, 20)], 1 / 3),
    ],
)
def test_partial_credit_follows_flow_grpo(meta, detections, expected):
    assert judge(meta, detections)["partial_credit"] == pytest.approx(expected)


def test_partial_credit_colour_terms():
    cat, dog = det("cat", 0, 0), det("dog", 20, 0)
    colors = StubColors({cat.box: "red", dog.box: "green"})
    meta = grammar.color_attr("cat", "red", "dog", "blue")
    assert judge(meta, [cat, dog], colors)["partial_credit"] == pytest.approx((1 + 1 + 1 + 0) / 4)
    assert judge(meta, [cat], colors)["partial_credit"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    objects = select_objects([cat, dog], "color_attr")
    assert partial_credit(meta, objects, lambda cls, objs: colors.classify(None, objs, cls)) == pytest.approx(0.75)


# ----------------------------------------------------------------------------------------------- summary


def _row(tag: str, prompt: str, correct: bool) -> dict:
    return {"tag": tag, "prompt": prompt, "correct": correct, "metadata": json.dumps({"tag": tag, "prompt": prompt})}


def test_summarize_on_a_hand_computed_table():
    rows = [
        _row("position", "p4", False), _row("position", "p4", True),
        _row("single_object", "p1", True), _row("single_object", "p1", False),
        _row("single_object", "p2", False), _row("single_object", "p2", False),
        _row("counting", "p3", True), _row("counting", "p3", True),
        _row("position", "p5", True), _row("position", "p5", False),
    ]
    summary = summarize(rows)
    # tasks: single_object 1/4, counting 2/2, position 2/4 -> overall (0.25 + 1 + 0.5) / 3
    assert summary["tasks"] == {"single_object": 0.25, "counting": 1.0, "position": 0.5}
    assert list(summary["tasks"]) == ["single_object", "counting", "position"]  # GenEval's task order
    assert summary["overall"] == pytest.approx(1.75 / 3)
    assert summary["image_mean"] == pytest.approx(5 / 10)
    assert summary["prompt_any_correct"] == pytest.approx(4 / 5)  # p1, p3, p4, p5
    assert (summary["n_images"], summary["n_prompts"]) == (10, 5)


def test_summarize_empty_is_nan():
    summary = summarize([])
    assert math.isnan(summary["overall"]) and summary["tasks"] == {}


def test_thresholds_compare_in_float32_as_numpy_does_on_mmdetections_arrays():
    import numpy as np

    at_threshold = float(np.float32(0.3))  # 0.30000001192..., above 0.3 in float64
    just_above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    objects = select_objects([det("cat", 10, 10, score=at_threshold), det("dog", 40, 40, score=just_above)],
                             "two_object")
    assert list(objects) == ["dog"]
    # the official comparison, on a float32 array as mmdetection returns it
    scores = np.array([at_threshold, just_above], dtype=np.float32)
    assert (scores > 0.3).tolist() == [False, True]
