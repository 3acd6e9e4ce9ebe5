"""The training reward: a weighted sum of registered metrics' raw per-image scores (Flow-GRPO's multi-score).

    reward_fn = RewardFunction.from_config({"geneval": 1.0}, metric_options={"geneval": {"backend": "shapes"}})
    rewards, parts = reward_fn(images, prompts, metadata)      # (B,) fp32 and {"geneval": (B,) fp32}

    reward_n = sum_k w_k s_k(n)

with raw, unnormalised scores s_k: the record field named in REWARD_FIELDS (GenEval's dense "partial_credit",
which Flow-GRPO trains on, rather than its 0/1 "score"), and "score" for every other metric. Advantages are
normalised per group afterwards, so no reward needs rescaling here. `calls` counts, per reward model, the images
it scored: the reward-call column of the matched-budget accounting.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Mapping, Sequence

import torch

from soarbench.errors import UserError
from soarbench.metrics.base import Metric
from soarbench.metrics.registry import METRICS, build_metric

# The record field each metric contributes as its training reward; "score" when not listed.
REWARD_FIELDS = {"geneval": "partial_credit"}


def reward_field(name: str) -> str:
    return REWARD_FIELDS.get(name, "score")


def parse_weights(weights: Mapping[str, Any]) -> dict[str, float]:
    """{metric name: weight} from a config table: known names, finite numeric weights, at least one entry."""
    if not isinstance(weights, Mapping) or not weights:
        raise UserError("rewards must be a table of metric name = weight, e.g. {geneval = 1.0}")
    parsed = {}
    for name, value in weights.items():
        METRICS.check(name)  # an unknown name: the registry's error, with a did-you-mean
        # bool is a Real in Python, but `geneval = true` is a config mistake, not a weight of 1.
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise UserError(f"reward weight for '{name}' must be a finite number, got {value!r}")
        parsed[name] = float(value)
    return parsed


def _images(images) -> list:
    if torch.is_tensor(images):  # decoded pixels (B, 3, H, W) in [-1, 1], as SD3Adapter.decode returns them
        from soarbench.evaluate import to_pil

        return to_pil(images)
    return list(images)


class RewardFunction:
    """Scores images with several metrics and returns their weighted sum as the reward."""

    def __init__(self, metrics: Mapping[str, Metric], weights: Mapping[str, float]):
        if not metrics or set(metrics) != set(weights):
            raise ValueError(f"need one weight per metric, got metrics {sorted(metrics)} and weights {sorted(weights)}")
        self.metrics = dict(metrics)
        self.weights = {name: float(weights[name]) for name in self.metrics}
        self.calls = {name: 0 for name in self.metrics}  # images scored, per reward model

    @classmethod
    def from_config(cls, weights: Mapping[str, Any],
                    metric_options: Mapping[str, Mapping[str, Any]] | None = None) -> "RewardFunction":
        """Build every named metric through the registry; `metric_options[name]` is passed to its constructor."""
        parsed = parse_weights(weights)
        options = dict(metric_options or {})
        for name in options:
            if name not in parsed:
                raise UserError(f"options given for metric '{name}', which is not among the rewards "
                                f"({', '.join(parsed)})")
        return cls({name: build_metric(name, **dict(options.get(name) or {})) for name in parsed}, parsed)

    @property
    def names(self) -> list[str]:
        return list(self.metrics)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(rewards (B,) fp32, {metric name: its raw per-image reward (B,) fp32}) for B images (PIL or pixels)."""
        images = _images(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        total = torch.zeros(len(images), dtype=torch.float32)
        parts = {}
        for name, metric in self.metrics.items():
            records = metric.score(images, prompts, metadata)
            self.calls[name] += len(images)
            parts[name] = torch.tensor([self._value(name, record) for record in records], dtype=torch.float32)
            total += self.weights[name] * parts[name]
        return total, parts

    @staticmethod
    def _value(name: str, record: Mapping[str, Any]) -> float:
        field = reward_field(name)
        if field not in record:
            raise RuntimeError(f"metric '{name}' returned a record without '{field}', its reward field")
        return float(record[field])

    def describe(self) -> dict[str, Any]:
        """What the reward was, for provenance: per metric its weight, reward field and version."""
        return {name: {"weight": self.weights[name], "field": reward_field(name), **metric.describe()}
                for name, metric in self.metrics.items()}
