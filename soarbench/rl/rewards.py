"""The training reward: a weighted sum of registered metrics' raw per-image scores (Flow-GRPO's multi-score).

    reward_fn = RewardFunction.from_config({"geneval": 1.0}, metric_options={"geneval": {"backend": "shapes"}})
    rewards, parts = reward_fn(images, prompts, metadata)      # (B,) fp32 and {"geneval": (B,) fp32}
    future = reward_fn.score_async(pixels, prompts, metadata)  # the same, on one worker thread
    ...                                                        # (e.g. the next rollout runs meanwhile)
    rewards, parts = future.result()

    reward_n = sum_k w_k s_k(n)

with raw, unnormalised scores s_k: the record field named in REWARD_FIELDS (GenEval's dense "partial_credit",
which Flow-GRPO trains on, rather than its 0/1 "score"), and "score" for every other metric. Advantages are
normalised per group afterwards, so no reward needs rescaling here.

Images are PIL images or decoded pixels, a (B, 3, H, W) float tensor in [-1, 1] (SD3Adapter.decode). Pixels go
through each metric's tensor path (Metric.score_tensor): the result is on the pixels' device, and when every
metric is `differentiable` (ClipScore, PickScore, HPSv2.1, Aesthetic) and grad is enabled, the reward keeps the
autograd graph back to the pixels (Direct-Align / SRPO-style training). Non-differentiable metrics (GenEval, OCR,
ImageReward) score the 8-bit images evaluation would save and return detached values.

Counting, per reward model and per image (the reward columns of the matched-budget accounting):
  calls[name]       forwards without a graph (no grad, a detached input, or a non-differentiable metric)
  grad_calls[name]  forwards that build a graph to the pixels (grad enabled, input requires grad, metric
                    differentiable)
and, when `meter` is set (any object with add(name: str, n: int)), every scored batch of every metric calls
meter.add("reward_calls", B) or meter.add("reward_fwd_bwd", B) accordingly.
"""
from __future__ import annotations

import concurrent.futures
import math
import threading
from numbers import Real
from typing import Any, Mapping, Sequence

import torch

from soarbench.errors import UserError
from soarbench.metrics.base import Metric
from soarbench.metrics.registry import METRICS, build_metric

# The record field each metric contributes as its training reward; "score" when not listed. Metric.reward_field
# says the same for each metric class (a test holds them equal).
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


class RewardFunction:
    """Scores images with several metrics and returns their weighted sum as the reward."""

    def __init__(self, metrics: Mapping[str, Metric], weights: Mapping[str, float]):
        if not metrics or set(metrics) != set(weights):
            raise ValueError(f"need one weight per metric, got metrics {sorted(metrics)} and weights {sorted(weights)}")
        self.metrics = dict(metrics)
        self.weights = {name: float(weights[name]) for name in self.metrics}
        self.calls = {name: 0 for name in self.metrics}  # images scored without a graph, per reward model
        self.grad_calls = {name: 0 for name in self.metrics}  # images scored with a graph to the pixels
        self.meter = None  # optional budget meter: meter.add("reward_calls" | "reward_fwd_bwd", n)
        self._lock = threading.Lock()  # counters are updated from the async worker too
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

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
    def differentiable(self) -> bool:
        """True when every metric's tensor path keeps the graph to the pixels."""
        return all(getattr(metric, "differentiable", False) for metric in self.metrics.values())

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_grad_calls(self) -> int:
        return sum(self.grad_calls.values())

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(rewards (B,) fp32, {metric name: its raw per-image reward (B,) fp32}) for B images (PIL or pixels)."""
        if torch.is_tensor(images):
            return self._score_pixels(images, list(prompts), metadata)
        images = list(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        total = torch.zeros(len(images), dtype=torch.float32)
        parts = {}
        for name, metric in self.metrics.items():
            records = metric.score(images, prompts, metadata)
            self.count(name, len(images), with_grad=False)
            parts[name] = torch.tensor([self._value(name, record) for record in records], dtype=torch.float32)
            total += self.weights[name] * parts[name]
        return total, parts

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str], metadata
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(prompts) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(prompts)} prompts")
        total = torch.zeros(len(pixels), dtype=torch.float32, device=pixels.device)
        parts = {}
        for name, metric in self.metrics.items():
            with_grad = (torch.is_grad_enabled() and pixels.requires_grad
                         and getattr(metric, "differentiable", False))
            values = metric.score_tensor(pixels, prompts, metadata)
            if values.shape != (len(pixels),):
                raise RuntimeError(f"metric '{name}' returned {tuple(values.shape)} rewards for {len(pixels)} images")
            self.count(name, len(pixels), with_grad)
            parts[name] = values.to(device=pixels.device, dtype=torch.float32)
            total = total + self.weights[name] * parts[name]
        return total, parts

    def count(self, name: str, n: int, with_grad: bool) -> None:
        """Count n images scored by metric `name` (a method that calls a metric's own embeddings, as SRPO's
        relative reward does, counts its passes here too)."""
        with self._lock:
            (self.grad_calls if with_grad else self.calls)[name] += n
        if self.meter is not None:
            self.meter.add("reward_fwd_bwd" if with_grad else "reward_calls", n)

    def score_async(self, images, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                    ) -> concurrent.futures.Future:
        """Score on a single worker thread (calls run in submission order); the Future's result is what
        __call__ returns. Pixels are detached and moved to the CPU first unless the reward is differentiable,
        so the caller's GPU buffer is free for the next rollout. The caller's grad mode applies in the worker."""
        if torch.is_tensor(images) and not self.differentiable:
            images = images.detach().cpu()
        elif not torch.is_tensor(images):
            images = list(images)
        prompts = list(prompts)
        metadata = None if metadata is None else list(metadata)
        grad_enabled = torch.is_grad_enabled()  # grad mode is thread-local: carry the caller's over
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

        def run():
            with torch.set_grad_enabled(grad_enabled):
                return self(images, prompts, metadata)

        return self._executor.submit(run)

    def close(self) -> None:
        """Stop the async worker (after the calls already submitted); a later score_async starts a new one."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _value(self, name: str, record: Mapping[str, Any]) -> float:
        field = self._field(name)
        if field not in record:
            raise RuntimeError(f"metric '{name}' returned a record without '{field}', its reward field")
        return float(record[field])

    def _field(self, name: str) -> str:
        return getattr(self.metrics[name], "reward_field", REWARD_FIELDS.get(name, "score"))

    def describe(self) -> dict[str, Any]:
        """What the reward was, for provenance: per metric its weight, reward field and version."""
        return {name: {"weight": self.weights[name], "field": self._field(name), **metric.describe()}
                for name, metric in self.metrics.items()}
