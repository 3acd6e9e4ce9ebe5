"""The one contract every metric implements.

A metric scores a batch of generated images against their prompts (and, for GenEval-style benchmarks, their
metadata rows) and returns one record per image; `summarize` turns the records of a whole prompt set into flat
named numbers. Scores are stored RAW; `scale` says what the raw number means so that a table can put it beside
a paper's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from PIL import Image


@dataclass
class MetricInfo:
    name: str
    version: str
    scale: str  # e.g. "accuracy in [0, 1]", "cosine similarity in [-1, 1]"
    higher_is_better: bool = True
    needs: list[str] = field(default_factory=list)  # weight files / extras, for `soarbench metrics list`


class Metric:
    info: MetricInfo

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """One record per image; each has at least {"score": float}."""
        raise NotImplementedError

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
        }
