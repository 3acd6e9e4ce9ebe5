"""The training reward in the shapes world: GenEval partial credit, weights, call counting, config errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from soarbench.errors import UserError
from soarbench.geneval import grammar
from soarbench.metrics.base import Metric, MetricInfo
from soarbench.geneval.metric import GenEvalMetric
from soarbench.rl.rewards import RewardFunction
from soarbench.worlds.shapes import BACKGROUND, render_metadata, shapes_metadata


def render(row, seed=0) -> Image.Image:
    return Image.fromarray(render_metadata(row, np.random.default_rng(seed)).image)


def blank(size=32) -> Image.Image:
    return Image.new("RGB", (size, size), BACKGROUND)


def prompts_of(rows):
    return [r["prompt"] for r in rows]


@pytest.fixture(scope="module")
def geneval_reward():
    return RewardFunction.from_config({"geneval": 1.0})


def test_ground_truth_renders_get_reward_one(geneval_reward):
    rows = shapes_metadata("test", n_per_tag=1)
    before = geneval_reward.calls["geneval"]
    rewards, parts = geneval_reward([render(r, i) for i, r in enumerate(rows)], prompts_of(rows), rows)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0] * len(rows)
    assert parts["geneval"].tolist() == [1.0] * len(rows)
    assert geneval_reward.calls["geneval"] - before == len(rows)


def test_partial_credit_by_hand(geneval_reward):
    two_circles, four_circles = grammar.counting("circle", 2), grammar.counting("circle", 4)
    red_circle = grammar.colors("circle", "red")
    rows = [two_circles, four_circles, red_circle]
    images = [
        blank(),  # nothing found: the include term is 1 - |2 - 0| / 2 = 0
        render(two_circles),  # two circles for four: 1 - |4 - 2| / 4 = 0.5
        render(grammar.colors("circle", "blue")),  # right count (1), wrong colour (0): mean 0.5
    ]
    rewards, _ = geneval_reward(images, prompts_of(rows), rows)
    assert rewards.tolist() == [0.0, 0.5, 0.5]
    # the 0/1 GenEval score would give no signal on either of the last two
    scores = [r["score"] for r in GenEvalMetric().score(images, prompts_of(rows), rows)]
    assert scores == [0.0, 0.0, 0.0]


def test_decoded_pixels_are_accepted(geneval_reward):
    row = grammar.counting("square", 3)
    pixels = torch.from_numpy(np.array(render(row))).permute(2, 0, 1)[None].float() / 127.5 - 1
    rewards, _ = geneval_reward(pixels, [row["prompt"]], [row])
    assert rewards.tolist() == [1.0]


class PromptLength(Metric):
    """A stand-in second reward model: score = number of words in the prompt."""

    info = MetricInfo(name="words", version="test", scale="count")

    def score(self, images, prompts, metadata=None):
        return [{"score": float(len(p.split()))} for p in prompts]


def test_weights_scale_a_sum_of_raw_scores():
    rows = [grammar.counting("circle", 4), grammar.counting("circle", 2)]
    images = [render(grammar.counting("circle", 2)), render(rows[1])]  # partial credit 0.5 and 1.0
    scaled = RewardFunction.from_config({"geneval": 2.5})
    assert scaled(images, prompts_of(rows), rows)[0].tolist() == [1.25, 2.5]
    both = RewardFunction({"geneval": GenEvalMetric(), "words": PromptLength()}, {"geneval": 2.0, "words": -0.5})
    rewards, parts = both(images, prompts_of(rows), rows)
    assert parts["geneval"].tolist() == [0.5, 1.0] and parts["words"].tolist() == [5.0, 5.0]  # raw, unweighted
    assert rewards.tolist() == [2.0 * 0.5 - 0.5 * 5, 2.0 * 1.0 - 0.5 * 5]
    assert both.calls == {"geneval": 2, "words": 2} and both.total_calls == 4
    assert both.describe()["geneval"]["field"] == "partial_credit" and both.describe()["words"]["field"] == "score"


def test_config_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown metric 'genevel'.*did you mean 'geneval'"):
        RewardFunction.from_config({"genevel": 1.0})
    for bad in ("high", None, True, float("nan")):
        with pytest.raises(UserError, match="reward weight for 'geneval'"):
            RewardFunction.from_config({"geneval": bad})
    with pytest.raises(UserError):
        RewardFunction.from_config({})
    with pytest.raises(UserError, match="'ocr', which is not among the rewards"):
        RewardFunction.from_config({"geneval": 1.0}, metric_options={"ocr": {}})
    with pytest.raises(UserError, match="did you mean 'threshold'"):  # options reach the metric
        RewardFunction.from_config({"geneval": 1.0}, metric_options={"geneval": {"treshold": 0.5}})


def test_geneval_can_reward_the_reported_0_1_accuracy_instead_of_partial_credit():
    """A circle drawn right of the square for "a circle left of a square": partial credit by hand is the mean of
    [1 (one circle), 1 (one square), 0 (relation failed), 1 (the upstream quirk's extra term)] = 0.75, while the
    accuracy GenEval reports is 0. reward = "score" trains on the latter (a positive control's reward)."""
    row = grammar.position("circle", "left of", "square")
    right = np.asarray(render_metadata(row, np.random.default_rng(0), 32).image)
    mirrored = Image.fromarray(right[:, ::-1].copy())
    dense = RewardFunction.from_config({"geneval": 1.0})
    exact = RewardFunction.from_config({"geneval": 1.0}, {"geneval": {"reward": "score"}})
    for image, expected_dense, expected_exact in ((Image.fromarray(right), 1.0, 1.0), (mirrored, 0.75, 0.0)):
        assert float(dense([image], [row["prompt"]], [row])[0][0]) == expected_dense
        assert float(exact([image], [row["prompt"]], [row])[0][0]) == expected_exact
    assert exact.describe()["geneval"]["field"] == "score" and dense.describe()["geneval"]["field"] == "partial_credit"
    with pytest.raises(UserError, match="did you mean 'score'"):
        GenEvalMetric(reward="scor")
