"""The `soarbench` command line. Every subcommand's help ends with worked examples.

User errors (bad files, unknown names, missing models) print one line and exit 2, without a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from soarbench.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  pretty_exceptions_show_locals=False,
                  help="soarbench: post-train rectified-flow text-to-image models (SFT, SOAR, Flow-GRPO, DiffusionNFT, "
                       "DanceGRPO, Direct-Align / SRPO and two reconstructed methods: `soarbench methods list`) under "
                       "one matched budget, and score them as the papers do.\n\n"
                       "Examples:\n\n"
                       "  soarbench methods show soar\n\n"
                       "  soarbench run benchmarks/shapes/experiment.toml --out runs/shapes\n\n"
                       "  soarbench train --config benchmarks/shapes/soar.toml --out runs/soar\n\n"
                       "  soarbench eval --model benchmarks/shapes/base --benchmark shapes --out evals/base\n\n"
                       "  soarbench report runs/shapes --out reports/shapes")
methods_app = typer.Typer(no_args_is_help=True, help="The training methods and their options.\n\nExamples:\n\n"
                                                        "  soarbench methods list\n\n  soarbench methods show soar")
metrics_app = typer.Typer(no_args_is_help=True, help="The metric registry.\n\nExample:\n\n  soarbench metrics list")
data_app = typer.Typer(no_args_is_help=True, help="Prompt sets and training data.\n\nExamples:\n\n"
                                                  "  soarbench data fetch all\n\n"
                                                  "  soarbench data shapes --out data/shapes --n-images 4000")
ckpts_app = typer.Typer(no_args_is_help=True, help="Reward and metric model weights (reward_ckpts/).\n\nExamples:\n\n"
                                                   "  soarbench ckpts download aesthetic-mlp\n\n  soarbench ckpts verify")
app.add_typer(methods_app, name="methods")
app.add_typer(metrics_app, name="metrics")
app.add_typer(ckpts_app, name="ckpts")
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        from soarbench import __version__

        typer.echo(f"soarbench {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit.")) -> None:
    pass  # no docstring: the help above is the app's


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _log(message: str) -> None:
    _console().print(message, markup=False, highlight=False, soft_wrap=True)


class Progress:
    """The progress callback the harness and evaluation drive: progress(done, total, **values).

    On a terminal: a rich bar (values such as loss shown beside it). Elsewhere (CI, nohup, a pipe): one plain
    line every `every` calls, every `interval_s` seconds and at the end, e.g. "step 120/700 loss 0.0123
    grad_norm 0.41 | 2.1 step/s, ETA 0:04:46", so a log file shows how far a run got and how long it has left
    (every = 0 and interval_s = 0: no plain lines). `values` are whatever the caller has (the training loop passes
    loss=..., etc.)."""

    def __init__(self, description: str, every: int = 1, unit: str | None = None, tty: bool | None = None,
                 interval_s: float = 0.0, clock=None):
        import time

        self.description, self.every, self.unit = description, max(int(every), 0), unit or description
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval_s, self.clock = float(interval_s), clock or time.monotonic
        self.progress, self.task = None, None
        self._start = self._last_line = None  # (time, done) of the first call; time of the last plain line
        self._printed = False

    @staticmethod
    def format_values(values: dict) -> str:
        parts = []
        for key, value in values.items():
            if value is None:
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return " ".join(parts)

    def _pace(self, now: float, done: int, total: Optional[int]) -> str:
        """'| R unit/s, ETA H:MM:SS' measured since the first call ('' until there is a rate to tell)."""
        start_t, start_done = self._start
        if now <= start_t or done <= start_done:
            return ""
        rate = (done - start_done) / (now - start_t)
        unit = self.unit.split()[-1]
        text = f"| {rate:.3g} {unit}/s"
        if total is not None and done < total:
            left = int(round((total - done) / rate))
            text += f", ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        return text

    def __call__(self, done: int, total: Optional[int], **values) -> None:
        if self.tty:
            self._bar(done, total, values)
            return
        now = self.clock()
        if self._start is None:
            # the clock starts at the first report, so the rate counts the units done since then
            self._start, self._last_line = (now, done), now
        last = total is not None and done >= total
        due = (self.every and done % self.every == 0) or (self.interval_s and now - self._last_line >= self.interval_s)
        # the closing line: always with `every`; with `interval_s` alone only once a line said the job was going
        if due or (last and (self.every or self._printed)):
            self._last_line, self._printed = now, True
            where = f"{done}/{total}" if total is not None else f"{done}"
            _log(" ".join(p for p in (self.unit, where, self.format_values(values), self._pace(now, done, total))
                          if p))

    def _bar(self, done: int, total: Optional[int], values: dict) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
            TimeRemainingColumn

        if self.task is None:
            self.progress = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeRemainingColumn(), console=_console(), transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=total)
        text = " ".join(p for p in (self.description, self.format_values(values)) if p)
        self.progress.update(self.task, completed=done, total=total, description=escape(text))
        if total is not None and done >= total:
            self.progress.stop()


_Bar = Progress  # the old name


def _check_out(out: Path, flag: str = "--out") -> None:
    """--out must be a folder this process can create or write in: checked before any model loads."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out}: is an existing file; expected a folder (new, or one to resume in)")
    parent = out
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {out}: {parent} is a file, so the folder cannot be created")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot write in {parent} ({e.strerror or e})") from None


_held_locks: list = []  # released when main() returns, however the command ended


def _lock_out(out: Path) -> None:
    """One writer per --out folder (train, eval, run): a live holder is refused, a dead one's lock taken over."""
    from soarbench.harness.lock import FolderLock

    _held_locks.append(FolderLock(out, log=_log).acquire())


def _release_locks() -> None:
    while _held_locks:
        _held_locks.pop().release()


def _check_range(flag: str, value, low=None, finite: bool = False) -> None:
    import math

    if value is None:
        return
    if finite and not math.isfinite(value):
        raise UserError(f"{flag} {value}: expected a finite number")
    if low is not None and value < low:
        raise UserError(f"{flag} {value}: expected {'an integer' if isinstance(value, int) else 'a number'} >= {low}")


def _check_device(device: str) -> None:
    from soarbench.config import device_problem

    problem = device_problem(device)
    if problem is not None:
        raise UserError(f"--device {device}: {problem}")


def _method_names() -> str:
    from soarbench.methods import METHODS

    return " | ".join(METHODS.names())


@app.command()
def train(
    config: Path = typer.Option(..., "--config", help="TOML config file."),
    out: Path = typer.Option(..., "--out", help="Run folder to create (or resume with --resume)."),
    method: Optional[str] = typer.Option(
        None, "--method", help=f"Override method.name: {_method_names()} (options: soarbench methods show NAME)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config value: key=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's last checkpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config (after extends and --set) and "
                                                          "the budget plan, then exit: no model or data is loaded "
                                                          "and nothing is written."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Train without evaluating: ignore the config's [eval] "
                                                          "benchmarks (no evaluation at any point, the end included)."),
):
    """Train one method under the config's budget; prints the budget arithmetic before spending anything.

    Examples:

      soarbench train --config benchmarks/shapes/soar.toml --out runs/soar

      soarbench train --config benchmarks/shapes/soar.toml --dry-run --out runs/soar

      soarbench train --config benchmarks/shapes/soar.toml --method sft --set budget.amount=20000 --out runs/sft

      soarbench train --config benchmarks/shapes/sft.toml --no-eval --out runs/sft-noeval

      torchrun --nproc_per_node 8 -m soarbench train --config sd35m.toml --set train.mixed_precision=bf16 --out runs/x
    """
    text = run_training(config, out, method=method, overrides=list(set_), resume=resume, dry_run=dry_run,
                        no_eval=no_eval)
    if dry_run:
        typer.echo(text)
        return
    _log(f"done: {out}")


def run_training(config, out: Path, *, method: Optional[str] = None, overrides: list[str] = (),
                 resume: bool = False, dry_run: bool = False, no_eval: bool = False, log=None, progress=None):
    """`soarbench train` without the printing (also soarbench.train's path). `config`: a TOML file or a dict of
    sections. Returns the dry run's text with dry_run, else the run folder."""
    from soarbench import config as C
    from soarbench.methods import METHODS

    out = Path(out)
    if isinstance(config, dict):
        cfg = C.apply_overrides(C.deep_merge({}, config), list(overrides))
    else:
        cfg = C.apply_overrides(C.load_config(config), list(overrides))
    if method is not None:
        METHODS.check(method)
        cfg.setdefault("method", {})["name"] = method
    elif "method" in cfg and "name" in cfg["method"]:
        METHODS.check(cfg["method"]["name"])
    if no_eval:
        cfg = _without_eval(cfg)
    checked = C.validate_train_config(cfg)  # every key, type and range, before anything is loaded or written
    try:  # before diffusers loads (the method's options needed torch: their check imports the method)
        _check_model_path(Path(str(checked["model"]["path"])))
    except UserError as e:
        raise UserError(f"config: model.path = {e}") from None
    if dry_run:
        return _dry_run_text(checked, f"{'the config' if isinstance(config, dict) else config} (train --out {out})")
    _check_out(out)
    _lock_out(out)
    from soarbench.harness.train import train as run_train

    if progress is None:
        progress = Progress("training", every=checked["log"]["every"], unit="step")
    return run_train(cfg, out, resume=resume, log=log or _log, progress=progress)


def _without_eval(cfg: dict) -> dict:
    """The config without evaluation: its [eval] benchmarks dropped (the other eval settings mean nothing then)."""
    cfg = dict(cfg)
    cfg.pop("eval", None)
    return cfg


class _UnbuiltMetric:
    """Stands in for a reward model while a dry run plans: the plan needs the rewards' names, not their weights."""

    differentiable = True

    def __init__(self, name: str):
        self.name = name


def _dry_run_text(cfg: dict, what: str) -> str:
    """A checked config and its budget plan, as `--dry-run` prints them: the method is built with its reward
    models left unloaded, and the plan is the one training prints first (for WORLD_SIZE processes, default 1)."""
    from soarbench import config as C
    from soarbench.harness.budget import Budget
    from soarbench.harness.train import accumulation_steps
    from soarbench.methods import build_method
    from soarbench.methods.base import RunShape
    from soarbench.rl import rewards

    world = int(os.environ.get("WORLD_SIZE", "1"))
    options = dict(cfg["method"])
    name = options.pop("name")
    real = rewards.build_metric
    rewards.build_metric = lambda metric, **_: _UnbuiltMetric(metric)
    try:
        method = build_method(name, options)
    finally:
        rewards.build_metric = real
    shape = RunShape(world, accumulation_steps(cfg["train"], world), int(cfg["train"]["batch_size"]))
    budget = Budget.from_config(cfg["budget"])
    plan = budget.arithmetic(method.plan(shape), world, shape.accumulation, lambda u: method.unit_plan(shape, u))
    evals = cfg.get("eval", {}).get("benchmark")
    points = max(cfg["eval"]["points"], 1)  # whatever the points, the end is evaluated
    evals = (f"{evals}, at {points} fraction(s) of the budget (1/{points} .. 1: the end)" if evals else
             "none (no [eval] benchmark, or --no-eval)")
    return "\n".join([f"# dry run: {what}; nothing was loaded or written", "# resolved config:",
                       C.dumps_toml(cfg).rstrip(), "", "# plan:", plan, f"  evaluation: {evals}"])


@app.command("eval")
def eval_(
    model: Optional[Path] = typer.Option(None, "--model",
                                         help="A diffusers SD3 folder or a soarbench checkpoint folder."),
    images: Optional[Path] = typer.Option(
        None, "--images", help="Score this folder of existing images instead of generating (no --model): GenEval's "
                               "layout NNNNN/metadata.jsonl + NNNNN/samples/NNNN.png, or flat with --prompts."),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="With --images: a flat folder's prompts, one per line in image-name order "
                                "(digit runs compare as numbers: 2.png before 10.png)."),
    benchmark: str = typer.Option(..., "--benchmark", help="Benchmark name (see the registry)."),
    out: Path = typer.Option(..., "--out", help="Eval folder; an interrupted eval resumes here."),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma-separated metric names."),
    seed: Optional[int] = typer.Option(
        None, "--seed", help="Sampling seed (default 0): the same seed gives the same images and scores."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Euler steps (benchmark default: 40)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="CFG scale (benchmark default: 4.5)."),
    batch_size: int = typer.Option(64, "--batch-size"),
    max_sequence_length: Optional[int] = typer.Option(
        None, "--max-sequence-length", help="T5 tokens; default: the length recorded with the model, else 77."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    precision: str = typer.Option("auto", "--precision",
                                  help="Sampling precision: auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16."),
    steer: Optional[str] = typer.Option(
        None, "--steer", help="value=SCALE[,REWARD=WEIGHT...]: add SCALE x the gradient of the checkpoint's value "
                              "head (actor_critic) to every sampling step; 0 samples as without it."),
    option: List[str] = typer.Option(
        [], "--option", help="KEY=VALUE, repeatable: a benchmark option, as eval.benchmark_options in a config "
                             "(shapes: n_per_tag, images_per_prompt, min_images_per_task, seed, image_size)."),
    max_pixels: Optional[int] = typer.Option(
        None, "--max-pixels", help="With --images: refuse images above this many pixels, read from their headers "
                                   "before decoding (default 67108864 = 8192 x 8192)."),
):
    """Generate a benchmark's images with fixed seeds and score them, or score existing images (--images).

    Under `accelerate launch` or torchrun every process generates its share of the batches; the main process
    merges them (the same images and scores as one process).

    Examples:

      soarbench eval --model benchmarks/shapes/base --benchmark shapes --out evals/base

      soarbench eval --model runs/soar/checkpoints/step_000100 --benchmark shapes --steps 10 --out evals/soar10

      soarbench eval --images geneval_outputs --benchmark geneval --out evals/theirs

      soarbench eval --images ocr_images --prompts ocr_prompts.txt --benchmark ocr --out evals/ocr

      soarbench eval --model runs/ac/checkpoints/step_000040 --benchmark shapes --steer value=2.0 --out evals/ac-steer

      soarbench eval --model benchmarks/shapes/base --benchmark shapes --option min_images_per_task=64 --out evals/b
    """
    summary = run_eval(model=model, images=images, prompts=prompts, benchmark=benchmark, out=out, metrics=metrics,
                       seed=seed, steps=steps, guidance=guidance, batch_size=batch_size,
                       max_sequence_length=max_sequence_length, device=device, precision=precision, steer=steer,
                       options=option, max_pixels=max_pixels)
    if summary is None:
        return  # not the main process: the main one writes and prints the summary
    for key, value in summary["scores"].items():
        typer.echo(f"{key}\t{value:.4f}")
    typer.echo(f"out\t{out}")  # the folder last: summary.json, samples.jsonl and the images are there


def run_eval(*, model: Optional[Path], images: Optional[Path], prompts: Optional[Path], benchmark: str, out: Path,
             metrics: Optional[str], seed: Optional[int], steps: Optional[int], guidance: Optional[float],
             batch_size: int, max_sequence_length: Optional[int], device: str, precision: str, steer: Optional[str],
             options, max_pixels: Optional[int], log=None) -> Optional[dict]:
    """`soarbench eval` without the printing (also soarbench.evaluate's path): the summary, or None on a process
    other than the main one. `options`: --option KEY=VALUE strings, or a dict of benchmark options."""
    log = log or _log
    model = None if model is None else Path(model)
    images = None if images is None else Path(images)
    out = Path(out)
    # every input check first, with cheap imports only: torch, diffusers and the metrics load after them
    from soarbench.benchmarks import BENCHMARKS, build_benchmark
    from soarbench.metrics.registry import METRICS

    if model is not None and images is not None:
        raise UserError("--model and --images are mutually exclusive: give --model (generate, then score) or "
                        "--images (score existing images)")
    if model is None and images is None:
        raise UserError("give --model (generate, then score) or --images (score existing images)")
    if images is None:
        generation_only = {"--prompts": prompts, "--max-pixels": max_pixels}
    else:
        generation_only = {"--seed": seed, "--steps": steps, "--guidance": guidance,
                           "--max-sequence-length": max_sequence_length, "--steer": steer}
    given = [flag for flag, value in generation_only.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} cannot be used with {'--images' if images is not None else '--model'}")
    _check_range("--batch-size", batch_size, low=1)
    _check_range("--steps", steps, low=1)
    _check_range("--seed", seed, low=0)
    _check_range("--guidance", guidance, finite=True)
    _check_range("--max-sequence-length", max_sequence_length, low=0)
    _check_range("--max-pixels", max_pixels, low=1)
    if images is None:
        _check_device(device)
        _check_model_path(model)
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got '{precision}'")
    if steer is not None:
        from soarbench.models.value_head import parse_steer

        steer_setting = parse_steer(steer)
    BENCHMARKS.check(benchmark)
    bench_options = _benchmark_options(benchmark, options)
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    for name in names or []:
        METRICS.check(name)
    _check_out(out)
    _lock_out(out)
    bench = build_benchmark(benchmark, **bench_options)
    from soarbench.metrics.registry import require_weights

    require_weights(names or list(bench.metrics), bench.metrics)  # before any model loads
    # under accelerate / torchrun only the main process reports (each process would report its own share)
    progress = (Progress(f"eval {benchmark}", every=0, unit=f"eval {benchmark} images", interval_s=30)
                if int(os.environ.get("RANK", "0")) == 0 else None)
    if images is not None:
        from soarbench.evaluate import score_images

        summary = score_images(images, bench, out, prompts_file=prompts, metric_names=names, batch_size=batch_size,
                               on_progress=progress, log=log,
                               **({"max_pixels": max_pixels} if max_pixels is not None else {}))
        if not summary["benchmark"]["covers_benchmark"]:
            log(f"note: these images are not exactly benchmark '{benchmark}' ({len(bench.prompts)} prompts x "
                 f"{bench.images_per_prompt} images): the scores are not its official numbers")
    else:
        from soarbench.evaluate import EvalSpec, evaluate
        from soarbench.models.sd3 import SD3Adapter, weights_fingerprint

        from soarbench.harness.engine import Engine, resolve_device

        dev = resolve_device(device)
        if precision == "auto":
            precision = "bf16" if dev.startswith("cuda") else "fp32"
        engine = Engine(dev) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        adapter = SD3Adapter.from_pretrained(model, device=engine.device if engine else dev,
                                             max_sequence_length=max_sequence_length)
        steering = None
        if steer is not None:
            from soarbench.models.value_head import load_steering

            steering = load_steering(model, adapter, *steer_setting)
        spec = EvalSpec(seed=0 if seed is None else seed, batch_size=batch_size, num_steps=steps, guidance=guidance,
                        metric_names=names, precision=precision)
        summary = evaluate(adapter, bench, out, spec,
                           model_info={"path": str(model), "label": model.name, "method": "eval", "step": None,
                                       "weights_sha256": weights_fingerprint(model)},  # reuse keyed to content
                           on_progress=progress, engine=engine, steering=steering, log=log)
    return summary


def _check_model_path(model: Path) -> None:
    """A --model that is neither a local folder nor a Hub id, refused before torch and diffusers load."""
    from soarbench.hub import parse_hub_id

    if not model.exists() and parse_hub_id(str(model)) is None:
        raise UserError(f"{model}: model folder does not exist")


def _benchmark_options(benchmark: str, items) -> dict:
    """--option KEY=VALUE pairs (values read as TOML), or a dict of them, checked like a config's
    eval.benchmark_options."""
    from soarbench import config as C

    options = dict(items) if isinstance(items, dict) else {}
    for item in [] if isinstance(items, dict) else items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option '{item}': expected KEY=VALUE, e.g. min_images_per_task=64")
        options[key.strip()] = C.parse_value(value.strip())
    try:
        return C.validate_benchmark_options(benchmark, options)
    except UserError as e:  # the config checker's words, said of the flag
        raise UserError(str(e).replace("config: ", "", 1).replace("eval.benchmark_options.", "--option ")) from None


@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run, eval or experiment folders."),
    out: Path = typer.Option(..., "--out", help="Report folder: paper_table.csv, report.md, index.html, ..."),
    title: str = typer.Option("soarbench report", "--title"),
    formats: str = typer.Option("html,csv,md,tex", "--format",
                                help="Comma-separated outputs: html (page + figures/), csv, md, tex."),
):
    """The SOAR paper's table beside the published numbers, the per-benchmark tables and the figures.

    Examples:

      soarbench report runs/shapes --out reports/shapes

      soarbench report runs/sft runs/soar --out reports/mine --title "SFT vs SOAR" --format csv,tex
    """
    from soarbench.report import parse_formats, write_report

    paths = write_report(list(run_dirs), out, title=title, formats=parse_formats(formats))
    for kind, path in paths.items():
        typer.echo(f"{kind}\t{path}")


@app.command()
def run(
    # rich markup would take the brackets for style tags: escaped, they print as written
    experiment: Path = typer.Argument(..., help=escape("Experiment TOML: [common], [runs.NAME], [experiment].")),
    out: Path = typer.Option(..., "--out", help="Experiment folder (runs, base eval)."),
    set_: List[str] = typer.Option([], "--set", help="Override a value of the experiment file: key=value."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every run's resolved config and budget plan, then "
                                                          "exit: no model or data is loaded and nothing is written."),
):
    """Every method of an experiment from the same base under the same budget, then eval, then the report.

    Ends with the folder, the report and a table of each run's last evaluation (stdout).

    Examples:

      soarbench run benchmarks/shapes/experiment.toml --out runs/shapes

      soarbench run benchmarks/shapes/experiment.toml --dry-run --out runs/shapes

      soarbench run benchmarks/shapes/experiment.toml --set common.budget.amount=4000 --out runs/quick
    """
    from soarbench import config as C
    from soarbench.experiment import plan_runs

    if dry_run:
        exp = C.apply_overrides(C.load_config(experiment), list(set_))
        meta = C.section(exp, "experiment")
        plan = plan_runs(exp)
        typer.echo(f"# experiment {experiment}: {len(plan)} run(s) ({', '.join(n for n, _ in plan)}); the base model "
                   f"{'is' if meta.get('evaluate_base', True) else 'is not'} evaluated first; report to "
                   f"{meta.get('report', out / 'report')}\n")
        for name, cfg in plan:
            try:
                text = _dry_run_text(C.validate_train_config(cfg), f"{experiment} run '{name}' (--out {out / name})")
            except UserError as e:
                raise UserError(f"{experiment} run '{name}': {e}") from None
            typer.echo(text + "\n")
        return
    _check_out(out)
    _lock_out(out)
    from soarbench.experiment import run_experiment

    report_dir = run_experiment(experiment, out, list(set_), log=_log,
                                progress_factory=lambda name: Progress(name, every=10, unit=f"[{name}] step"))
    for line in results_table(sorted(p for p in out.iterdir() if (p / "evals").is_dir())):
        typer.echo(line)
    typer.echo(f"report\t{report_dir}")
    typer.echo(f"out\t{out}")


def results_table(folders: list[Path]) -> list[str]:
    """Tab-separated lines: run, step, benchmark and its scores, from each folder's last evaluation
    (evals/step_N/BENCHMARK/summary.json)."""
    import json

    lines = []
    for folder in folders:
        steps = sorted((folder / "evals").glob("step_*"))
        if not steps:
            continue
        for summary_file in sorted(steps[-1].glob("*/summary.json")):
            scores = json.loads(summary_file.read_text(encoding="utf-8")).get("scores", {})
            shown = " ".join(f"{k}={v:.4f}" for k, v in list(scores.items())[:3] if isinstance(v, (int, float)))
            lines.append(f"{folder.name}\tstep {int(steps[-1].name.removeprefix('step_'))}\t"
                         f"{summary_file.parent.name}\t{shown}")
    return ["run\tstep\tbenchmark\tscores", *lines] if lines else []


@app.command()
def probe(
    model: Path = typer.Option(..., "--model", help="A diffusers SD3 folder or a soarbench checkpoint folder."),
    data: Path = typer.Option(..., "--data", help="Held-out HY-SOAR JSONL (images in its images/ folder)."),
    out: Path = typer.Option(..., "--out", help="Folder for probe.json."),
    n: int = typer.Option(64, "--n", help="Pairs: the first N usable lines of --data."),
    sigmas: str = typer.Option("1,0.8,0.6,0.4,0.2", "--sigmas", help="Starting sigmas in (0, 1], comma-separated."),
    guidance: float = typer.Option(4.5, "--guidance", help="CFG scale of the first rows; g = 1 rows always follow."),
    steps: int = typer.Option(40, "--steps", help="Euler steps of the full eval grid (restricted per start)."),
    seed: int = typer.Option(0, "--seed", help="Noise seed: the same seed gives the same numbers."),
    batch_size: int = typer.Option(64, "--batch-size"),
    geneval_backend: str = typer.Option("shapes", "--geneval-backend",
                                        help="GenEval detector for data lines with GenEval rows."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
):
    """Exposure bias: start the model's sampler ON the data's path at each sigma and measure where it lands.

    Per starting sigma and guidance: MSE to the clean latent (mean, std over pairs) and, for GenEval-style
    data, the GenEval accuracy of the decoded results (soarbench/probes/exposure.py explains why).

    Examples:

      soarbench data shapes --out data/heldout --seed 2 --n-images 256

      soarbench probe --model benchmarks/shapes/base --data data/heldout/train.jsonl --out probes/base

      soarbench probe --model runs/soar/checkpoints/step_000095 --data data/heldout/train.jsonl --n 128 --out probes/soar
    """
    _check_model_path(model)  # before torch loads
    from soarbench.probes.exposure import parse_sigmas, run_probe

    summary = run_probe(model, data, out, device=device, n=n, sigmas=parse_sigmas(sigmas), guidance=guidance,
                        num_steps=steps, seed=seed, batch_size=batch_size, geneval_backend=geneval_backend,
                        on_progress=_Bar("probe"))
    typer.echo("guidance\tsigma\tsteps\tmse_mean\tmse_std\tgeneval")
    for row in summary["rows"]:
        acc = "" if row["geneval"] is None else f"{row['geneval']:.4f}"
        typer.echo(f"{row['guidance']:g}\t{row['sigma']:g}\t{row['euler_steps']}\t{row['mse_mean']:.5f}\t"
                   f"{row['mse_std']:.5f}\t{acc}")
    typer.echo(f"probe.json\t{Path(out) / 'probe.json'}")


@methods_app.command("list")
def methods_list():
    """Each training method: its paper, whether it is reconstructed (no public code: our reading of the paper),
    its reference code and what it trains on (images of a dataset, or prompts for online RL).

    Example:

      soarbench methods list
    """
    from soarbench.methods import METHODS
    from soarbench.method_info import method_info

    typer.echo("method\tpaper\treconstructed\treference code\ttrains on")
    for name in METHODS.names():
        info = method_info(name)
        typer.echo(f"{name}\t{info['paper']}\t{'yes' if info['reconstructed'] else 'no'}\t{info['source']}\t"
                   f"{info['trains_on']}")


@methods_app.command("show")
def methods_show(name: str = typer.Argument(..., help="A method name (soarbench methods list).")):
    """A method's summary and every option of its [method] table: type, default and meaning, read from the same
    constructor signature the config check uses.

    Examples:

      soarbench methods show soar

      soarbench train --config benchmarks/shapes/soar.toml --set method.lambda_aux=0.5 --out runs/soar-half
    """
    from soarbench.methods import METHODS
    from soarbench.method_info import method_info

    METHODS.check(name)
    info = method_info(name)
    typer.echo(f"{name}: {info['summary']}")
    typer.echo(f"paper: {info['paper']}; reconstructed: {'yes' if info['reconstructed'] else 'no'}; reference code: "
               f"{info['source']}; trains on: {info['trains_on']}; version: {info['version']}; class: {info['class']}")
    typer.echo("")
    typer.echo("option\ttype\tdefault\tmeaning")
    for key, option in info["options"].items():
        default = option["default"]
        shown = default if isinstance(default, str) and default == "(required)" else _toml_value(default)
        typer.echo(f"{key}\t{option['type']}\t{shown}\t{option['meaning'] or '-'}")


def _toml_value(value) -> str:
    """A default as it is written in a config file (true, 4.5, "flow_sde", [..], {..})."""
    from soarbench import config as C

    if value is None:
        return "(none)"
    return C.dumps_toml({"x": value}).split("=", 1)[1].strip() if not isinstance(value, dict) else str(value)


@metrics_app.command("list")
def metrics_list():
    """Each metric, what it needs and whether that is present.

    Example:

      soarbench metrics list
    """
    from soarbench.metrics.registry import METRICS, availability

    for name in METRICS.names():
        needs = METRICS.meta(name).get("needs", [])
        lacking = availability(name)
        state = "ready" if not lacking else "missing: " + "; ".join(lacking)
        typer.echo(f"{name}\t{state}\tneeds: {'; '.join(needs) or 'nothing'}")


@metrics_app.command("serve-geneval")
def metrics_serve_geneval(
    python: Optional[str] = typer.Option(None, "--python",
                                         help="Python of the mmdet environment (default: this one)."),
    config: Optional[str] = typer.Option(None, "--config", help="mmdet config (default: the one shipped with mmdet)."),
    checkpoint: str = typer.Option("mask2former-mmdet", "--checkpoint", help="Manifest name or .pth path."),
    device: str = typer.Option("cuda:0", "--device"),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (default: this machine only)."),
    port: int = typer.Option(8765, "--port", help="0 = any free port."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the model to load."),
):
    """Serve GenEval's official detector (mmdet Mask2Former Swin-S) on localhost until Ctrl-C.

    Runs soarbench/geneval/detector_server.py under --python: an environment with mmdet 2.27.0.
    Setting it up: see the docstring of soarbench/geneval/mmdet_backend.py.
    The "mask2former" backend finds the server through $SOARBENCH_GENEVAL_SERVER.

    Examples:

      soarbench metrics serve-geneval --python ~/miniconda3/envs/geneval/bin/python --device cuda:0

      SOARBENCH_GENEVAL_SERVER=http://127.0.0.1:8765 soarbench eval --images out --benchmark geneval --out evals/g
    """
    import signal

    from soarbench.geneval import mmdet_backend

    # started from a background shell, SIGINT would be inherited ignored: Ctrl-C / kill -INT must stop the server
    signal.signal(signal.SIGINT, signal.default_int_handler)
    child, health = mmdet_backend.start_server(python, config, checkpoint, device, host, port, timeout=timeout)
    # From here on a Ctrl-C (or any error) must stop the child, wherever it lands.
    try:
        url, versions = health["url"], health.get("versions", {})
        typer.echo(f"GenEval detector server: {url}")
        typer.echo(f"  mmdet {versions.get('mmdet')}, mmcv {versions.get('mmcv')}, torch {versions.get('torch')}, "
                   f"checkpoint {health.get('checkpoint_label')}, device {health.get('device')}")
        typer.echo(f"  use it: export {mmdet_backend.ENV_SERVER}={url}")
        typer.echo(f"  or in a Flow-GRPO config: --set method.reward_options.geneval.backend=mask2former "
                   f"--set method.reward_options.geneval.server={url}")
        typer.echo("  Ctrl-C stops it.")
        child.wait()
    except KeyboardInterrupt:
        _log(f"detector server stopped (exit status {child.stop()})")
    finally:
        child.stop()


@ckpts_app.command("download")
def ckpts_download(name: Optional[str] = typer.Argument(None, help="Manifest entry; all when omitted.")):
    """Fetch weights from their pinned public source: resumable, hash-checked, written atomically.

    Examples:

      soarbench ckpts download clip-vit-large-patch14

      SOARBENCH_REWARD_CKPTS=/data/ckpts soarbench ckpts download
    """
    from soarbench.metrics import weights

    for entry in [name] if name else weights.names():
        typer.echo(f"{entry}\t{weights.download(entry)}")


@ckpts_app.command("verify")
def ckpts_verify(name: Optional[str] = typer.Argument(None, help="Manifest entry; all when omitted.")):
    """Rehash every weight file that is present and compare it with the manifest.

    Example:

      soarbench ckpts verify
    """
    from soarbench.metrics import weights

    checks = weights.verify([name] if name else None)
    for c in checks:
        typer.echo(f"{c.entry}\t{c.file}\t{c.status}\t{c.sha256 or ''}")
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@data_app.command("fetch")
def data_fetch(name: str = typer.Argument(..., help="A prompt set (geneval, ocr, pickscore, drawbench, ...) or all.")):
    """Download prompt sets from their pinned public sources, sha256-checked.

    Files go to $SOARBENCH_DATA when set, else ~/.cache/soarbench/prompts; a good copy already there is kept.

    Examples:

      soarbench data fetch all

      SOARBENCH_DATA=/data/prompts soarbench data fetch geneval
    """
    from soarbench import prompts

    for entry in prompts.names() if name == "all" else [prompts.get(name).name]:
        typer.echo(f"{entry}\t{prompts.fetch(entry)}")


@data_app.command("geneval-metadata")
def data_geneval_metadata(out: Path = typer.Option(..., "--out", help="File to write (evaluation_metadata.jsonl).")):
    """Regenerate GenEval's official evaluation_metadata.jsonl from its prompt grammar.

    Seed 43 over the 80 COCO names (prompt set geneval_object_names); prints the file's sha256 and whether it
    equals the published file's (exit status 1 if not).

    Example:

      soarbench data geneval-metadata --out evaluation_metadata.jsonl
    """
    from soarbench import prompts

    path, digest, matches = prompts.write_geneval_metadata(out)
    typer.echo(f"{path}\t{digest}\t{'matches' if matches else 'DIFFERS from'} the published file "
               f"({prompts.get('geneval').sha256})")
    if not matches:
        raise typer.Exit(1)


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(..., "--out", help="Folder for train.jsonl + images/ (HY-SOAR format)."),
    n_images: int = typer.Option(4000, "--n-images"),
    seed: int = typer.Option(1, "--seed"),
    image_size: int = typer.Option(32, "--image-size"),
    test_metadata: Optional[Path] = typer.Option(None, "--test-metadata", help="Also write the test split here."),
):
    """Write the shapes world's training split (and optionally its held-out test prompts).

    Example:

      soarbench data shapes --out data/shapes --n-images 4000 --test-metadata data/shapes/test.jsonl
    """
    from soarbench.worlds.shapes import write_test_metadata, write_training_split

    typer.echo(write_training_split(out, n_images=n_images, seed=seed, size=image_size))
    if test_metadata is not None:
        typer.echo(write_test_metadata(test_metadata))


@app.command("export")
def export_(
    model: str = typer.Argument(..., help="A soarbench checkpoint folder, a pipeline folder or a Hub id owner/name[@rev]."),
    out: Path = typer.Option(..., "--out", help="Folder to create: a complete diffusers pipeline."),
    dtype: str = typer.Option("fp32", "--dtype", help="How the weights are stored: fp32 | fp16 | bf16 (they load "
                                                      "in float32 unless torch_dtype is given)."),
):
    """Write a checkpoint as a whole diffusers pipeline folder (LoRA merged), loadable by
    DiffusionPipeline.from_pretrained(OUT, text_encoder_3=None, tokenizer_3=None) where there is no T5.

    Example:

      soarbench export runs/sft/checkpoints/step_000700 --out exported/sft
    """
    _check_model_path(Path(model))  # before torch loads
    from soarbench.export import export_pipeline

    typer.echo(export_pipeline(model, out, dtype=dtype))


@app.command()
def env():
    """Versions, devices and git sha, for bug reports.

    Example:

      soarbench env
    """
    import json

    from soarbench import provenance

    typer.echo(json.dumps({**provenance.git_state(), "versions": provenance.package_versions(),
                           "devices": provenance.devices()}, indent=2))


def _disk_full(error: BaseException) -> str | None:
    """The one-line story of a full disk (ENOSPC/EDQUOT anywhere in the exception chain), or None."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" while writing {error.filename}" if error.filename else ""
            return f"the disk is full{where} ({error.strerror or 'No space left on device'})"
        if "No space left on device" in str(error):  # e.g. torch.save's RuntimeError from its C++ writer
            return "the disk is full (No space left on device)"
        error = error.__cause__ or error.__context__
    return None


def _usage_error(error) -> str:
    """A command-line mistake (unknown option or command, missing value) as one line, with the usage to follow."""
    ctx = getattr(error, "ctx", None)
    line = f"error: {error.format_message()}"
    if ctx is not None:
        usage = ctx.get_usage().removeprefix("Usage:").strip()
        line += f" (usage: {usage}; see '{ctx.command_path} --help')"
    return line


# Commands that must run even when a plugin is broken: `env` is what a bug report about that plugin needs.
_WITHOUT_PLUGINS = {"env", "--version", "--help"}


def _load_plugins(args: list[str]) -> None:
    from soarbench.registry import load_plugins

    try:
        load_plugins()
    except UserError as e:
        if args and args[0] not in _WITHOUT_PLUGINS:
            raise
        print(f"warning: {e}", file=sys.stderr)


def main() -> None:
    try:
        _main()
    finally:  # an error, Ctrl-C or the end: the folder is free again (a kill -9 leaves a lock the next one takes)
        _release_locks()


def _main() -> None:
    # typer >= 0.2x raises the exceptions of its bundled click (typer._click), which do not derive from click's
    from typer.exceptions import Abort as TyperAbort, TyperException

    import click

    try:
        _load_plugins(sys.argv[1:])
        code = app(prog_name="soarbench", standalone_mode=False)  # not 'python -m soarbench': the command to type
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (TyperException, click.exceptions.ClickException) as e:  # usage errors: one line, exit 2
        if not getattr(e, "ctx", None) or e.format_message():
            print(_usage_error(e), file=sys.stderr)
        # else: no arguments at all, so the help (already printed) is the answer
        sys.exit(e.exit_code)
    except Exception as e:
        if isinstance(e, (TyperAbort, click.exceptions.Abort)):
            sys.exit(1)
        full = _disk_full(e)
        if full is not None:
            print(f"error: {full}: free some space (or choose another --out) and run the command again; files are "
                  f"written atomically, so nothing finished was damaged, and `soarbench train --resume` continues "
                  f"from the last good checkpoint", file=sys.stderr)
            sys.exit(1)
        raise
    # Without standalone mode click returns (rather than raises) the exit code of an interrupted command.
    if isinstance(code, int) and code != 0:
        if code == 130:
            print("interrupted", file=sys.stderr)
        sys.exit(code)
