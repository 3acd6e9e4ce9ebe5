"""Fault injection for crash tests: SOARBENCH_FAULT="POINT:N" kills the process (SIGKILL, no cleanup) the N-th
time it reaches POINT. Points: "step" (after an optimizer step, before its log line), "checkpoint" (inside a
checkpoint write, after the weights and before the trainer state), "eval_batch" (after a batch of an evaluation
was written). Unset, it costs one dictionary lookup."""
from __future__ import annotations

import os
import signal
from collections import Counter

_reached: Counter = Counter()


def fault(point: str) -> None:
    spec = os.environ.get("SOARBENCH_FAULT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _reached[point] += 1
    if _reached[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
