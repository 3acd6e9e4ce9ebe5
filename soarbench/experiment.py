"""`soarbench run EXPERIMENT.toml --out DIR`: every method of an experiment, then eval, then the report.

An experiment file holds a [common] config shared by every run, one [runs.NAME] table per method (merged over
[common]; `seeds = [0, 1, 2]` repeats it), and an [experiment] table (name, report folder, whether to evaluate
the base model). Runs land in DIR/NAME-sSEED/, the base model's eval in DIR/base/, and the report in the
[experiment] report folder (default DIR/report). A finished run is skipped when the command is repeated; an
unfinished one resumes from its last checkpoint; a run folder trained with another config is refused, naming
the differing keys (refuse_changed_run).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from soarbench import config as C
from soarbench.errors import UserError


def plan_runs(exp: dict) -> list[tuple[str, dict]]:
    common = C.section(exp, "common")
    runs = C.section(exp, "runs")
    if not runs:
        raise UserError("experiment: no [runs.NAME] tables")
    plan = []
    for group, over in runs.items():
        if not isinstance(over, dict):
            raise UserError(f"experiment: runs.{group} must be a table")
        over = dict(over)
        seeds = over.pop("seeds", [C.deep_merge({"train": {"seed": 0}}, common)["train"]["seed"]])
        for seed in seeds:
            name = f"{group}-s{seed}"
            cfg = C.deep_merge(common, over)
            cfg = C.deep_merge(cfg, {"train": {"seed": int(seed)}, "run": {"name": name, "group": group}})
            plan.append((name, cfg))
    return plan


def finished(run_dir: Path) -> bool:
    """A run is finished once training wrote done.json (its budget spent, last checkpoint evaluated)."""
    return (run_dir / "done.json").is_file()


# Options that change no result: a finished run trained with other values of these is still the run asked for.
RESULT_NEUTRAL = ("train.device", "train.threads", "train.checkpoint_every", "log.", "eval.batch_size")


def refuse_changed_run(run_dir: Path, cfg: dict) -> None:
    """A run folder is keyed to its resolved config (its config.toml): a finished run is skipped only when it was
    trained with the config asked now, and an unfinished one resumes only under --resume's rules; otherwise one
    line names every differing key, before any work."""
    from soarbench.harness.train import _diff, _refuse_changed_config

    path = run_dir / "config.toml"
    if not path.is_file():
        return
    if not finished(run_dir):
        _refuse_changed_config(run_dir, cfg)
        return
    asked = json.loads(json.dumps(cfg, default=str))
    changed = {key: pair for key, pair in _diff(C.load_config(path, file_paths=False), asked).items()
               if not any(key == k or key.startswith(k) for k in RESULT_NEUTRAL)}
    if changed:
        keys = ", ".join(f"{key}={_shown(before)} (now {_shown(after)})" for key, (before, after) in changed.items())
        raise UserError(f"{run_dir}: finished with {keys}; use a new --out or remove the folder")


def _shown(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # budget.amount = 4 is read as 4.0
    return "(unset)" if value is None else C._show(value)


def run_experiment(path: Path, out_dir: Path, overrides: list[str], log: Callable[[str], None],
                   progress_factory: Callable[[str], Any] | None = None) -> Path:
    from soarbench.harness.data import generation_plan
    from soarbench.harness.train import train
    from soarbench.report import write_report

    exp = C.apply_overrides(C.load_config(path), overrides)
    meta = C.section(exp, "experiment")
    plan = plan_runs(exp)
    _check_controls(meta, plan, path)
    _check_views(meta, plan, path)
    probe = probe_options(meta.get("probe"), plan, path)  # checked before the first run starts
    for name, cfg in plan:  # every run's config checked before the first one starts
        try:
            resolved = C.validate_train_config(cfg)
            generation_plan(resolved["data"])  # refuses to generate over the user's data before anything is written
        except UserError as e:
            raise UserError(f"{path} run '{name}': {e}") from None
        refuse_changed_run(out_dir / name, resolved)
    if probe:
        try:
            generation_plan({"jsonl": probe["jsonl"], "generate": probe["generate"]})
        except UserError as e:
            raise UserError(f"{path} [experiment.probe]: {e}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    from soarbench.io import atomic_write_text

    atomic_write_text(out_dir / "experiment.toml", C.dumps_toml(exp))
    if meta.get("evaluate_base", True):
        evaluate_base(plan[0][1], out_dir / "base", log, extra_benchmarks=_all_extra_benchmarks(plan),
                      extra_num_steps=sorted({k for _, cfg in plan for k in cfg.get("eval", {}).get("extra_num_steps")
                                              or []}))
    for name, cfg in plan:
        run_dir = out_dir / name
        if finished(run_dir):
            log(f"[{name}] already finished, skipped")
            continue
        log(f"[{name}] training")
        progress = progress_factory(name) if progress_factory else None
        train(cfg, run_dir, resume=(run_dir / "train_log.jsonl").exists(), log=lambda m, n=name: log(f"[{n}] {m}"),
              progress=progress)
    run_probes(probe, plan, out_dir, log)
    report_dir = Path(meta.get("report", out_dir / "report"))
    paths = write_report([out_dir], report_dir, title=meta.get("title", f"soarbench: {meta.get('name', path.stem)}"))
    log(f"report: {paths.get('html', report_dir / 'index.html')}")
    return report_dir


PROBE_KEYS = ("jsonl", "generate", "n", "sigmas", "guidance", "num_steps", "seed")


def probe_options(probe: dict | None, plan: list[tuple[str, dict]], path: Path) -> dict | None:
    """[experiment.probe]: the exposure-bias probe (soarbench/probes/exposure.py) of the base model and of each
    group's final checkpoint (its first seed) on held-out pairs, written to OUT/probes/GROUP/probe.json:

        [experiment.probe]
        jsonl = ".cache/shapes/heldout/train.jsonl"     # held-out images (made once when `generate` is given)
        generate = { world = "shapes", n_images = 256, seed = 2, image_size = 32 }
        n = 64                                         # pairs
        sigmas = [1.0, 0.8, 0.6, 0.4, 0.2]             # starting sigmas
    The sampler (guidance, steps) is the evaluation's unless given here. Returns the checked options, or None.
    """
    if probe is None:
        return None
    from soarbench.errors import did_you_mean
    from soarbench.probes.exposure import check_sigmas

    where = f"{path} [experiment.probe]"
    if not isinstance(probe, dict) or "jsonl" not in probe:
        raise UserError(f"{where}: needs jsonl = the held-out pairs' JSONL (and optionally generate, n, sigmas)")
    for key in probe:
        if key not in PROBE_KEYS:
            raise UserError(f"{where}: {did_you_mean('key', key, PROBE_KEYS)}")
    ecfg = plan[0][1].get("eval", {})
    try:
        return {"jsonl": str(probe["jsonl"]), "generate": probe.get("generate"), "n": int(probe.get("n", 64)),
                "sigmas": check_sigmas(probe.get("sigmas", (1.0, 0.8, 0.6, 0.4, 0.2))),
                "guidance": float(probe.get("guidance", ecfg.get("guidance", 4.5))),
                "num_steps": int(probe.get("num_steps", ecfg.get("num_steps", 40))),
                "seed": int(probe.get("seed", 0))}
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{where}: {e}") from None


def run_probes(options: dict | None, plan: list[tuple[str, dict]], out_dir: Path, log) -> None:
    """Probe the base model and each group's final checkpoint (first seed) once; see probe_options."""
    if not options:
        return
    from soarbench.harness.checkpoint import latest_checkpoint
    from soarbench.harness.data import ensure_generated
    from soarbench.probes.exposure import run_probe

    options = dict(options)
    jsonl, generate = options.pop("jsonl"), options.pop("generate")
    ensure_generated({"jsonl": jsonl, "generate": generate})
    models = {"base": Path(plan[0][1]["model"]["path"])}
    msl = plan[0][1]["model"].get("max_sequence_length")  # the base as the runs load it (checkpoints record it)
    for name, cfg in plan:
        models.setdefault(cfg["run"]["group"], latest_checkpoint(out_dir / name, warn=log))
    for label, model in models.items():
        target = out_dir / "probes" / label
        if (target / "probe.json").is_file():
            log(f"[probe {label}] already done, skipped")
        elif model is None:
            log(f"[probe {label}] no checkpoint, skipped")
        else:
            first = run_probe(model, jsonl, target, max_sequence_length=msl if label == "base" else None,
                              **options)["rows"][0]
            log(f"[probe {label}] MSE to z0 from sigma {first['sigma']:g}: {first['mse_mean']:.4f}")


def _require_group(plan: list[tuple[str, dict]], group: str, where: str) -> None:
    """A control or view must name a [runs.NAME] group of this experiment."""
    from soarbench.errors import did_you_mean

    groups = sorted({cfg["run"]["group"] for _, cfg in plan})
    if group not in groups:
        raise UserError(f"{where}: {did_you_mean('group', group, groups)}")


def _check_controls(meta: dict, plan: list[tuple[str, dict]], path: Path) -> None:
    """[experiment] controls must name groups of this experiment (report/controls.py says what each checks)."""
    from soarbench.report.entries import validate_controls

    for kind, group in validate_controls(meta.get("controls"), f"{path} [experiment]").items():
        _require_group(plan, group, f"{path} [experiment]: controls.{kind}")
        if kind == "negative":
            lr = next(cfg for _, cfg in plan if cfg["run"]["group"] == group).get("train", {}).get("lr")
            if lr != 0:
                raise UserError(f"{path} [experiment]: the negative control '{group}' must train with "
                                f"train.lr = 0, got {lr}")


def _check_views(meta: dict, plan: list[tuple[str, dict]], path: Path) -> None:
    """[experiment.views.*] must name groups of this experiment (report/entries.py)."""
    from soarbench.report.entries import validate_views

    for view in validate_views(meta.get("views"), f"{path} [experiment]"):
        for group in view.members:
            _require_group(plan, group, f"{path} [experiment] views.{view.name}")


def _all_extra_benchmarks(plan: list[tuple[str, dict]]) -> dict[str, dict]:
    """Every run's eval.extra_benchmarks (the base is evaluated on each, so that every run has its baseline)."""
    out: dict[str, dict] = {}
    for name, cfg in plan:
        for bench, options in (cfg.get("eval", {}).get("extra_benchmarks") or {}).items():
            if out.setdefault(bench, options) != options:
                raise UserError(f"experiment: run '{name}' evaluates {bench} with other options than an earlier "
                                f"run ({options} vs {out[bench]}); the base is evaluated once per benchmark")
    return out


def evaluate_base(cfg: dict, folder: Path, log, extra_benchmarks: dict[str, dict] | None = None,
                  extra_num_steps: list[int] | None = None) -> None:
    """The base model's eval, shared by every run of the experiment (done once per benchmark and endpoint): on
    every run's extra benchmarks and every run's few-step endpoints, so that each has its baseline."""
    import torch

    from soarbench.evaluate import evaluate_config
    from soarbench.harness.budget import Counters
    from soarbench.harness.train import evaluation_adapter, model_info, resolve_config
    from soarbench.models.sd3 import weights_fingerprint

    cfg = C.deep_merge(cfg, {"run": {"name": "base", "group": "base"}})
    if extra_benchmarks:
        cfg = C.deep_merge(cfg, {"eval": {"extra_benchmarks": extra_benchmarks}})
    if extra_num_steps:
        cfg = C.deep_merge(cfg, {"eval": {"extra_num_steps": list(extra_num_steps)}})
    cfg = resolve_config(cfg)
    ecfg = cfg.get("eval", {})
    if not ecfg.get("benchmark"):
        return
    # No shortcut on an existing summary: evaluate() reuses the finished samples of a folder made with the same
    # settings and the same weights (keyed to their content), redoes them when the base changed, and refuses a
    # folder made with other settings, so a rerun never reports a stale base.
    log("[base] evaluating the base model (finished samples are reused)")
    device = "cuda" if torch.cuda.is_available() and cfg["train"]["device"] in ("auto", "cuda") else "cpu"
    adapter = evaluation_adapter(cfg, device)  # as the runs hold it: their lr-0 control reproduces it byte for byte
    info = {**model_info(cfg, "base", 0, Counters(), Path(cfg["model"]["path"])),
            "weights_sha256": weights_fingerprint(cfg["model"]["path"])}
    evaluate_config(adapter, cfg, folder / "evals" / "step_000000", info, "[base]", log=log)
