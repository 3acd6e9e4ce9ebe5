"""Benchmarks: a prompt set, the metrics that score it, and the sampling protocol it is evaluated with.

Lazy entries, so naming a benchmark imports only what it needs. The papers' protocol for the real benchmarks is
512 px, 40 Euler steps, CFG 4.5, one image per line of the prompt file; the shapes world uses its own size.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from soarbench.registry import LazyRegistry


@dataclass
class Benchmark:
    name: str
    prompts: list[str]
    metadata: list[dict] | None  # GenEval-style rows, one per prompt, or None
    metrics: dict[str, dict[str, Any]]  # metric name -> options
    height: int = 512
    width: int = 512
    num_steps: int = 40
    guidance: float = 4.5
    images_per_prompt: int = 1
    source: dict[str, Any] = field(default_factory=dict)


def shapes_benchmark(seed: int | None = None, n_per_tag: int = 20, image_size: int = 32,
                     images_per_prompt: int = 1) -> Benchmark:
    """The shapes world's held-out test split, scored by the GenEval rules engine with the exact detector."""
    from soarbench.worlds import shapes

    seed = shapes.TEST_SEED if seed is None else seed
    rows = shapes.shapes_metadata("test", seed=seed, n_per_tag=n_per_tag)
    return Benchmark(name="shapes", prompts=[r["prompt"] for r in rows], metadata=rows,
                     metrics={"geneval": {"backend": "shapes"}}, height=image_size, width=image_size,
                     images_per_prompt=images_per_prompt,
                     source={"world": "shapes", "split": "test", "seed": seed, "n_per_tag": n_per_tag})


BENCHMARKS = LazyRegistry("benchmark")
BENCHMARKS.add("shapes", "soarbench.benchmarks:shapes_benchmark")


def build_benchmark(name: str, **options: Any) -> Benchmark:
    factory = BENCHMARKS.load(name)
    try:
        return factory(**options)
    except TypeError as e:
        from soarbench.errors import UserError

        raise UserError(f"benchmark '{name}': bad option ({e})") from None
