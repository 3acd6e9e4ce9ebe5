"""soarbench from Python (a notebook, a script): the command line's train, eval and report, as functions.

    import soarbench

    run = soarbench.train("benchmarks/shapes/sft.toml", "runs/sft", overrides=["budget.amount=4000"], evaluate=False)
    result = soarbench.evaluate(run.last_checkpoint, benchmark="shapes", out="evals/sft", steps=10)
    result.scores                      # {"geneval": 0.36, ...}, as summary.json has them
    paths = soarbench.report([run.out, result.out], "reports/mine")
    paths["html"]                      # Path("reports/mine/index.html")

Each runs exactly what its command runs (the same checks, one-line UserErrors, locks and files); they return
paths and result objects instead of printing. Progress and notes go to stderr as on the command line (`log=`
takes them instead). This module imports nothing heavy itself: torch and diffusers load when a function runs.
"""
from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


@dataclass
class TrainResult:
    """A finished training run: its folder, checkpoints (oldest first) and the scores of each evaluation."""

    out: Path
    checkpoints: list[Path]
    evals: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # step -> benchmark -> scores
    run: dict[str, Any] = field(default_factory=dict)  # run.json: method, budget, global batch, ...

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None


@dataclass
class EvalResult:
    """An evaluation: its folder, the scores (the headline first) and the whole summary.json."""

    out: Path
    scores: dict[str, float]
    summary: dict[str, Any]


def train(config: str | Path | Mapping[str, Any], out: str | Path, *, method: str | None = None,
          overrides: Sequence[str] = (), evaluate: bool = True, resume: bool = False, log=None,
          progress=None) -> TrainResult:
    """Train one method under the config's budget, as `soarbench train`.

    config: a TOML file (`extends` followed) or a dict of sections ({"model": {...}, "method": {...}, ...});
    overrides: `--set` values ("budget.amount=4000"); evaluate=False: as --no-eval; resume: as --resume.
    log(message) and progress(done, total, **values) default to the command line's (stderr)."""
    from soarbench import cli

    try:
        folder = cli.run_training(config, Path(out), method=method, overrides=list(overrides), resume=resume,
                                  no_eval=not evaluate, log=log, progress=progress)
    finally:
        cli._release_locks()
    return _train_result(Path(folder))


def dry_run(config: str | Path | Mapping[str, Any], *, method: str | None = None,
            overrides: Sequence[str] = (), evaluate: bool = True) -> str:
    """The resolved config and budget plan `soarbench train --dry-run` prints (nothing loaded or written)."""
    from soarbench import cli

    return cli.run_training(config, Path("<out>"), method=method, overrides=list(overrides), dry_run=True,
                            no_eval=not evaluate)


def evaluate(model: str | Path | None = None, *, benchmark: str, out: str | Path, images: str | Path | None = None,
             prompts: str | Path | None = None, metrics: Iterable[str] | None = None, seed: int | None = None,
             steps: int | None = None, guidance: float | None = None, batch_size: int = 64,
             max_sequence_length: int | None = None, device: str = "auto", precision: str = "auto",
             options: Mapping[str, Any] | None = None, steer: str | None = None, max_pixels: int | None = None,
             log=None) -> EvalResult | None:
    """Generate a benchmark's images from `model` and score them, or score existing `images`, as `soarbench eval`.

    options: benchmark options ({"n_per_tag": 1}, as --option). Returns None on a process other than the main one
    (under accelerate / torchrun)."""
    from soarbench import cli

    try:
        summary = cli.run_eval(model=model, images=images, prompts=prompts, benchmark=benchmark, out=Path(out),
                               metrics=",".join(metrics) if metrics else None, seed=seed, steps=steps,
                               guidance=guidance, batch_size=batch_size, max_sequence_length=max_sequence_length,
                               device=device, precision=precision, steer=steer, options=dict(options or {}),
                               max_pixels=max_pixels, log=log)
    finally:
        cli._release_locks()
    if summary is None:
        return None
    return EvalResult(Path(out), dict(summary["scores"]), summary)


def report(run_dirs: str | Path | Iterable[str | Path], out: str | Path, *, title: str = "soarbench report",
           formats: str | Iterable[str] = "html,csv,md,tex") -> dict[str, Path]:
    """The report of run, eval or experiment folders, as `soarbench report`: {"html": .../index.html, "csv": ...}."""
    from soarbench.report import parse_formats, write_report

    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    formats = formats if isinstance(formats, str) else ",".join(formats)
    paths = write_report([Path(d) for d in dirs], Path(out), title=title, formats=parse_formats(formats))
    return {kind: Path(path) for kind, path in paths.items()}


def _train_result(folder: Path) -> TrainResult:
    checkpoints = sorted(p for p in (folder / "checkpoints").glob("step_*") if (p / "COMPLETE.json").is_file())
    evals: dict[int, dict[str, dict[str, float]]] = {}
    for summary in sorted(folder.glob("evals/step_*/*/summary.json")):
        step = int(summary.parent.parent.name.removeprefix("step_"))
        evals.setdefault(step, {})[summary.parent.name] = json.loads(summary.read_text(encoding="utf-8"))["scores"]
    run_file = folder / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    return TrainResult(folder, checkpoints, evals, run)


class _CallableModule(types.ModuleType):
    """soarbench.evaluate and soarbench.report are also modules of the package: once imported they shadow the
    functions of the same name on `soarbench`, so calling them calls the function."""

    def __call__(self, *args, **kwargs):
        return globals()[self.__name__.rpartition(".")[2]](*args, **kwargs)


def callable_module(name: str) -> None:
    """Make module `name` (soarbench.evaluate, soarbench.report) callable as this module's function of its name."""
    import sys

    sys.modules[name].__class__ = _CallableModule
