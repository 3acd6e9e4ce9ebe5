"""The meter: what a run actually spends, counted where it is spent.

The model adapter counts every transformer forward (with or without gradient, per sample), every VAE decode and
every completed rollout; reward functions count their calls. The loop reads the local counts after each
optimizer step, sums them over ranks and adds them to the run's Counters. A method never reports its own passes,
so its plan (`Method.plan`) is checked against what really ran (tests/test_method_contract.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from soarbench.cost import COUNTED


class Meter:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTED, 0)
        self.prompts: set[str] = set()
        self.enabled = True

    def add(self, name: str, n: int) -> None:
        if self.enabled:
            self.counts[name] += int(n)

    def add_prompts(self, prompts: Iterable[str]) -> None:
        if self.enabled:
            self.prompts.update(prompts)

    def take(self) -> tuple[dict[str, int], set[str]]:
        """The counts since the last take, and the prompts seen; both reset."""
        counts, prompts = self.counts, self.prompts
        self.counts, self.prompts = dict.fromkeys(COUNTED, 0), set()
        return counts, prompts

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation and other bookkeeping are not training spend."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was


NULL_METER = Meter()
NULL_METER.enabled = False
