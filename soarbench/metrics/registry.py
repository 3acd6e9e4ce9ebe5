"""Every metric soarbench knows, as lazy entries: heavy imports happen only when a metric is built."""
from __future__ import annotations

from typing import Any

from soarbench.metrics.base import Metric
from soarbench.registry import LazyRegistry

METRICS = LazyRegistry("metric")
METRICS.add("geneval", "soarbench.metrics.geneval:GenEvalMetric", needs=["a detector backend (shapes: built in)"])


def build_metric(name: str, **options: Any) -> Metric:
    return METRICS.load(name)(**options)
