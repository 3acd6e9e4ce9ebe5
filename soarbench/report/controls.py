"""The controls of a comparison: checks that say whether its other numbers can be trusted.

An experiment names its control groups in its [experiment] table:

    [experiment]
    controls = { negative = "sft_lr0", positive = "flow_grpo" }

- negative: a run that cannot change the model (learning rate 0). Its final evaluation must reproduce the base
  model's evaluation image for image, byte for byte; anything else means the harness itself moves the numbers
  (a sampler, a seed or a checkpoint round trip that is not deterministic), and no difference can be trusted.
- positive: a run whose direction is known in advance (Flow-GRPO trained on the very metric being reported). Its
  final checkpoint must beat the base on the main metric with a paired-bootstrap 95% interval above 0 (prompts
  paired, seeds averaged); the minimum detectable difference (80% power) is printed beside it, so "not shown"
  can be read as "too small to see" or as "no effect".

`soarbench run` writes the experiment file into its output folder, where `soarbench report` finds it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from soarbench.report.collect import per_prompt_scores
from soarbench.report.stats import mde_paired, paired_bootstrap


@dataclass(frozen=True)
class ControlResult:
    kind: str  # "negative" | "positive"
    group: str
    benchmark: str
    check: str  # what was checked, in words
    finding: str  # what was found, with the numbers
    passed: bool | None  # None: the check could not run (the finding says why)

    @property
    def verdict(self) -> str:
        return {True: "passed", False: "FAILED", None: "not run"}[self.passed]


def check_controls(controls: Mapping[str, str], finals: Sequence, base, main_metric: str,
                   benchmark: str) -> list[ControlResult]:
    """Run each named control against the base checkpoint `base` on one benchmark.

    `finals` are the report's final checkpoints (tables.Checkpoint); `base` is the base model's one (or None).
    """
    by_group = {cp.group: cp for cp in finals}
    results = []
    for kind, group in controls.items():
        cp = by_group.get(group)
        check = NEGATIVE_CHECK if kind == "negative" else POSITIVE_CHECK.format(metric=main_metric)
        if cp is None or base is None:
            missing = f"group '{group}'" if cp is None else "the base model"
            results.append(ControlResult(kind, group, benchmark, check, f"no evaluation of {missing} found",
                                         None))
            continue
        if kind == "negative":
            same, total = identical_images(cp.evals, base.evals[0])
            finding = f"{same}/{total} images byte-identical to the base's over {cp.n_seeds} seed(s) ({cp.label})"
            results.append(ControlResult(kind, group, benchmark, check, finding, total > 0 and same == total))
            continue
        ours, theirs = per_prompt_scores(cp, main_metric), per_prompt_scores(base, main_metric)
        if ours is None or theirs is None or ours.scores.shape != theirs.scores.shape:
            results.append(ControlResult(kind, group, benchmark, check,
                                         "no per-prompt scores on the same prompts for both", None))
            continue
        test = paired_bootstrap(ours.scores, theirs.scores, strata=ours.strata)
        mde = mde_paired(ours.scores - theirs.scores, strata=ours.strata)
        finding = (f"{cp.label} ({cp.n_seeds} seeds) minus base: {test.diff:+.3f} [{test.lo:+.3f}, {test.hi:+.3f}], "
                   f"p {test.p_value:.3f}, over {test.n} prompts; minimum detectable difference {mde:.3f}")
        results.append(ControlResult(kind, group, benchmark, check, finding, bool(test.lo > 0)))
    return results


NEGATIVE_CHECK = "learning rate 0: the final evaluation reproduces the base's images byte for byte"
POSITIVE_CHECK = "trained on the reported metric: {metric} above the base, 95% paired-bootstrap interval above 0"


def identical_images(evals: Sequence, base) -> tuple[int, int]:
    """(images equal to the base's, images compared) over every evaluation in `evals`, matched by sample id."""
    reference = _image_digests(base.eval_dir)
    same = total = 0
    for e in evals:
        digests = _image_digests(e.eval_dir)
        for sample_id, digest in digests.items():
            total += 1
            same += reference.get(sample_id) == digest
    return same, total


def _image_digests(eval_dir: Path) -> dict[str, str]:
    path = eval_dir / "samples.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        image = eval_dir / row["file"]
        out[row["id"]] = hashlib.sha256(image.read_bytes()).hexdigest() if image.is_file() else ""
    return out


def controls_markdown(results: Sequence[ControlResult]) -> list[str]:
    lines = ["| control | group | benchmark | check | finding | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.kind} | {r.group} | {r.benchmark} | {r.check} | {r.finding} | {r.verdict} |" for r in results]
    return lines

