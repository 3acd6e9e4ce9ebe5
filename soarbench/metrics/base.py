"""The one contract every metric implements.

A metric scores a batch of generated images against their prompts (and, for GenEval-style benchmarks, their
metadata rows) and returns one record per image; `summarize` turns the records of a whole prompt set into flat
named numbers. Scores are stored RAW; `scale` says what the raw number means so that a table can put it beside
a paper's.

Two ways in:

    records = metric.score(pil_images, prompts, metadata)          # evaluation: 8-bit images, one record each
    values = metric.score_tensor(pixels, prompts, metadata)        # training: (B,) float32 on pixels' device

`pixels` is what a decoder returns, a (B, 3, H, W) float tensor in [-1, 1]. A metric with `differentiable = True`
(ClipScore, PickScore, HPSv2.1, Aesthetic) preprocesses it in torch and keeps the autograd graph through its
image encoder, so a reward can be backpropagated into the generator; it matches `score()` up to a tolerance
its docstring states. Every other metric converts the tensor to 8-bit images exactly as evaluation does
(soarbench.metrics.pixels.to_pil), runs `score()` and returns its `reward_field` ("score", or GenEval's
"partial_credit") detached.

Every metric is built with `protocol="official"` (the metric's reference implementation) or `"paper"` (what the
published papers' evaluation code actually ran, where that differs); describe() records which.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from soarbench.errors import did_you_mean

PROTOCOLS = ("official", "paper")


def check_protocol(metric: str, protocol: Any) -> str:
    """The protocol name, or a one-line UserError that suggests the nearest valid one."""
    if protocol not in PROTOCOLS:
        raise did_you_mean(f"{metric} protocol", str(protocol), PROTOCOLS)
    return protocol


@dataclass
class MetricInfo:
    name: str
    version: str
    scale: str  # e.g. "accuracy in [0, 1]", "cosine similarity in [-1, 1]"
    higher_is_better: bool = True
    needs: list[str] = field(default_factory=list)  # weight files / extras, for `soarbench metrics list`


class Metric:
    info: MetricInfo
    differentiable: bool = False  # True: score_tensor keeps the autograd graph back to the pixels
    reward_field: str = "score"  # the record field score_tensor returns (the training reward)
    protocol: str = "official"

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """One record per image; each has at least {"score": float}."""
        raise NotImplementedError

    def score_tensor(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> torch.Tensor:
        """(B,) float32 on the images' device: the `reward_field` of score() on the 8-bit images evaluation would
        save, detached (this default is not differentiable; differentiable metrics override it)."""
        from soarbench.metrics.pixels import check_pixels, to_pil

        check_pixels(images)
        records = self.score(to_pil(images), list(prompts), metadata)
        values = []
        for record in records:
            if self.reward_field not in record:
                raise RuntimeError(f"metric '{self.info.name}' returned a record without '{self.reward_field}', "
                                   "its reward field")
            values.append(float(record[self.reward_field]))
        return torch.tensor(values, dtype=torch.float32, device=images.device)

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Flat name -> value over a whole prompt set. Default: the mean of "score" under the metric's name."""
        values = [float(r["score"]) for r in records]
        return {self.info.name: sum(values) / len(values) if values else float("nan")}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.info.name,
            "version": self.info.version,
            "scale": self.info.scale,
            "higher_is_better": self.info.higher_is_better,
            "protocol": self.protocol,
            "differentiable": self.differentiable,
        }
