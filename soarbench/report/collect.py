"""Find and load what the report reads: eval summaries (summary.json) and training logs (train_log.jsonl).

Any argument may be an eval folder, a training run folder, an experiment folder holding several runs, or one
of those files itself; each is searched recursively. Every file is validated on load, and a malformed one is a
UserError naming the file and the field, so a report is never silently built from half-read data.
"""
from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from soarbench.errors import UserError
from soarbench.io import json_error, read_jsonl

SUMMARY_FILE = "summary.json"
TRAIN_LOG_FILE = "train_log.jsonl"
RUN_FILE = "run.json"
SUMMARY_SCHEMA_PREFIX = "soarbench.eval/"
BASE_METHOD = "base"
OFFICIAL_PROTOCOL = "official"
# Method recorded for a training log whose folder has no run.json; _fallback_warnings reports such logs.
UNKNOWN_METHOD = "unknown"


@dataclass(frozen=True)
class EvalSummary:
    """One model checkpoint scored on one benchmark (one summary.json).

    `method` is what the summary says; a training run's own step-0 evaluation says "base" (no training yet)
    while its group is the run's, so a group's method is resolved over all its files (ReportData.group_methods).
    """

    path: Path
    run_name: str
    group: str
    method: str
    seed: int | None
    step: int | None  # None: a model evaluated on its own (`soarbench eval`), outside any training run
    benchmark: str
    prompt_set_sha256: str | None
    n_prompts: int | None
    images_per_prompt: int | None
    scores: Mapping[str, float]  # NaN where the summary has null
    metrics: Mapping[str, Mapping[str, Any]]  # metric name -> {"scale", "higher_is_better", ...}
    per_prompt: Mapping[str, tuple[float, ...]]
    budget: Mapping[str, float]  # model.budget_spent; empty when the summary has none
    provenance: Mapping[str, Any]
    model_path: str | None = None
    sampling: Mapping[str, Any] = field(default_factory=dict)
    method_version: str = ""  # the training method's recorded version ("... reconstructed ..." for some)
    # per_prompt key -> one stratum label per prompt, where the key's overall is a mean of strata means
    # (GenEval: the task of each prompt, read from the official results.jsonl beside the summary)
    strata: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    n_images: int | None = None  # images scored, where the summary says (per-task counts make it not n x k)

    @property
    def eval_dir(self) -> Path:
        """The folder of summary.json, samples.jsonl and images/."""
        return self.path.parent

    @property
    def budget_unit(self) -> str | None:
        """The budget unit of the run's resolved config (budget.unit), when the summary records it."""
        unit = _Fields(self.provenance, self.path).get("resolved_config.budget.unit")
        return unit if isinstance(unit, str) and unit else None

    def protocol(self, metric: str) -> str:
        """The metric's protocol ("official" or "paper"); a summary that does not say ran the official one."""
        value = self.metrics.get(metric, {}).get("protocol") if isinstance(self.metrics.get(metric), Mapping) else None
        return value if isinstance(value, str) and value else OFFICIAL_PROTOCOL


@dataclass(frozen=True)
class TrainLog:
    """The loss curve of one training run, one point per optimizer step, sorted by step."""

    path: Path
    run_name: str
    group: str
    method: str
    seed: int | None
    steps: tuple[int, ...]
    losses: tuple[float, ...]  # NaN where the log has null or a non-finite loss
    # every other numeric field of the log lines (loss_main, loss_aux, reward_mean, kl, clipfrac, grad_norm, lr, ...),
    # aligned with `steps`, NaN where a line lacks it
    signals: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    run: RunInfo | None = None  # run.json and config.toml beside the log; None without run.json


@dataclass(frozen=True)
class RunInfo:
    """What a training run's folder says about it beyond its identity: run.json's budget and config.toml."""

    budget_unit: str | None  # the experiment's matched unit (run.json budget.unit)
    budget_amount: float | None
    rewards: Mapping[str, float]  # method.rewards of config.toml: the metrics the method was trained on
    config_path: Path | None
    config_sha256: str | None


@dataclass(frozen=True)
class Provenance:
    """What produced the evaluations, merged over all summaries: every distinct value is kept."""

    git_shas: tuple[str, ...] = ()
    git_dirty: bool | None = None  # True when any evaluation ran from a dirty tree; None when none says
    packages: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> distinct versions


@dataclass(frozen=True)
class ReportData:
    """Everything found under the report's arguments, plus warnings worth showing the reader."""

    evals: tuple[EvalSummary, ...]
    train_logs: tuple[TrainLog, ...]
    group_methods: Mapping[str, str]  # group -> its training method, or "base" for a group of base models only
    provenance: Provenance
    warnings: tuple[str, ...] = ()
    controls: Mapping[str, str] = field(default_factory=dict)  # control kind -> group (report/controls.py)
    probes: tuple = ()  # report/probes.Probe: exposure-bias probes found under the arguments
    views: tuple = ()  # report/entries.View: final tables under another matching of budgets

    def benchmarks(self) -> list[str]:
        """Benchmark names in order of first appearance."""
        return list(dict.fromkeys(e.benchmark for e in self.evals))

    def evals_for(self, benchmark: str) -> list[EvalSummary]:
        return [e for e in self.evals if e.benchmark == benchmark]

    def budget_unit(self) -> str | None:
        """The experiment's matched budget unit: run.json's budget.unit, else the summaries' resolved config."""
        units = [log.run.budget_unit for log in self.train_logs if log.run and log.run.budget_unit]
        units += [u for e in self.evals if (u := e.budget_unit)]
        return units[0] if units else None

    def rewards_of(self, group: str) -> dict[str, float]:
        """The metrics a group's method was trained on: config.toml method.rewards of its runs, else the
        summaries' resolved config (when only eval folders were passed)."""
        out: dict[str, float] = {}
        for log in self.train_logs:
            if log.group == group and log.run is not None:
                out.update(log.run.rewards)
        if not out:
            for e in self.evals:
                rewards = _Fields(e.provenance, e.path).get("resolved_config.method.rewards")
                if e.group == group and isinstance(rewards, Mapping):
                    out.update({str(k): float(v) for k, v in rewards.items() if _is_number(v)})
        return out


def collect(paths: Iterable[Path | str]) -> ReportData:
    """Discover, load and cross-check every summary.json and train_log.jsonl under `paths`."""
    from soarbench.report.entries import read_controls, read_views
    from soarbench.report.probes import read_probes

    paths = list(paths)
    summary_paths, log_paths = discover(paths)
    evals = tuple(load_summary(p) for p in summary_paths)
    logs = tuple(load_train_log(p) for p in log_paths)
    _check_unique_evals(evals)
    warnings = _prompt_set_warnings(evals) + _fallback_warnings(logs)
    return ReportData(
        evals=evals,
        train_logs=logs,
        group_methods=resolve_group_methods(evals, logs),
        provenance=merge_provenance(evals),
        warnings=tuple(warnings),
        controls=read_controls(paths),
        probes=read_probes(paths),
        views=read_views(paths),
    )


# ---------------------------------------------------------------------------------------------------------------
# Discovery


def discover(paths: Iterable[Path | str]) -> tuple[list[Path], list[Path]]:
    """Every summary.json and train_log.jsonl under `paths`, each file once, in a deterministic order."""
    summaries: dict[Path, Path] = {}
    logs: dict[Path, Path] = {}
    for raw in paths:
        path = Path(raw)
        found_summaries, found_logs = _discover_one(path)
        if not found_summaries and not found_logs:
            raise UserError(
                f"{path}: no {SUMMARY_FILE} or {TRAIN_LOG_FILE} found (expected a run, eval or experiment folder)"
            )
        # Keyed by resolved path: an experiment folder passed together with one of its runs is read once.
        for p in found_summaries:
            summaries.setdefault(p.resolve(), p)
        for p in found_logs:
            logs.setdefault(p.resolve(), p)
    return list(summaries.values()), list(logs.values())


def _discover_one(path: Path) -> tuple[list[Path], list[Path]]:
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name == SUMMARY_FILE:
            return [path], []
        if path.name == TRAIN_LOG_FILE:
            return [], [path]
        return [], []
    summaries = sorted(p for p in path.rglob(SUMMARY_FILE) if p.is_file())
    logs = sorted(p for p in path.rglob(TRAIN_LOG_FILE) if p.is_file())
    return summaries, logs


# ---------------------------------------------------------------------------------------------------------------
# summary.json


def load_summary(path: Path) -> EvalSummary:
    """Parse and validate one summary.json; any missing or ill-typed field is a UserError naming it."""
    doc = _load_json_object(path)
    fields = _Fields(doc, path)
    schema = fields.string("schema")
    if not schema.startswith(SUMMARY_SCHEMA_PREFIX):
        raise UserError(f"{path}: field 'schema' is '{schema}', expected '{SUMMARY_SCHEMA_PREFIX}N'")
    scores = fields.number_map("scores")
    if not scores:
        raise UserError(f"{path}: field 'scores' is empty")
    run_name, group = _model_identity(fields)
    if fields.get("model.step") is _MISSING:
        raise UserError(f"{path}: missing field 'model.step'")
    return EvalSummary(
        path=path,
        run_name=run_name,
        group=group,
        method=fields.string("model.method"),
        seed=fields.integer("model.seed", optional=True),
        step=fields.integer("model.step", optional=True, minimum=0),
        benchmark=fields.string("benchmark.name"),
        prompt_set_sha256=fields.string("benchmark.prompt_set_sha256", optional=True),
        n_prompts=fields.integer("benchmark.n_prompts", optional=True),
        images_per_prompt=fields.integer("benchmark.images_per_prompt", optional=True),
        scores=scores,
        metrics=fields.mapping("metrics", optional=True),
        per_prompt=fields.number_lists("per_prompt", optional=True),
        budget=fields.number_map("model.budget_spent", optional=True),
        provenance=fields.mapping("provenance", optional=True),
        model_path=fields.string("model.path", optional=True) if fields.get("model.path") is not None else None,
        sampling=fields.mapping("sampling", optional=True) if fields.get("sampling") is not None else {},
        method_version=_method_version(fields),
        strata=_geneval_tasks(path, fields.number_lists("per_prompt", optional=True)),
        n_images=fields.integer("benchmark.n_images", optional=True),
    )


GENEVAL_RESULTS = "results.jsonl"


def _geneval_tasks(summary: Path, per_prompt: Mapping[str, tuple[float, ...]]) -> dict[str, tuple[str, ...]]:
    """GenEval's overall is the mean of its task means: each prompt's task, from the results.jsonl written beside
    the summary (official rows: filename images/PPPPP_K.png and tag). Empty when there is none to read."""
    n = len(per_prompt.get("geneval", ()))
    results = summary.parent / GENEVAL_RESULTS
    if not n or not results.is_file():
        return {}
    tags: dict[int, str] = {}
    for lineno, row in read_jsonl(results, required=("filename", "tag")):
        name = Path(str(row["filename"])).stem
        index = name.split("_")[0]
        if not index.isdigit() or not isinstance(row["tag"], str):
            raise UserError(f"{results}:{lineno}: expected filename images/PPPPP_K.png and a string tag")
        if tags.setdefault(int(index), row["tag"]) != row["tag"]:
            raise UserError(f"{results}:{lineno}: prompt {int(index)} has two tags")
    if sorted(tags) != list(range(n)):
        raise UserError(f"{results}: tags for {len(tags)} prompts, but {summary} has per-prompt scores for {n}")
    return {"geneval": tuple(tags[i] for i in range(n))}


def _method_version(fields: "_Fields") -> str:
    value = fields.get("model.method_version")
    if value is _MISSING or value is None:
        return ""  # summaries written before the field existed
    if not isinstance(value, str):
        raise fields.fail("model.method_version", "a string", value)
    return value


_MISSING = object()  # sentinel: a field absent from the document (unlike one present with value null)


def _model_identity(fields: _Fields) -> tuple[str, str]:
    """(run_name, group). A model evaluated on its own (`soarbench eval`) has neither; its label stands for both."""
    if fields.get("model.run_name") is _MISSING and fields.get("label") is not _MISSING:
        run_name = fields.string("label")
    else:
        run_name = fields.string("model.run_name")
    group = fields.string("model.group") if fields.get("model.group") is not _MISSING else run_name
    return run_name, group


class _Fields:
    """Typed access to dotted fields of a JSON document; every failure names the file and the field."""

    def __init__(self, doc: Mapping[str, Any], path: Path):
        self.doc = doc
        self.path = path

    def get(self, dotted: str) -> Any:
        node: Any = self.doc
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def fail(self, dotted: str, expected: str, value: Any) -> UserError:
        return UserError(f"{self.path}: field '{dotted}' must be {expected}, got {json.dumps(value)[:80]}")

    def _required(self, dotted: str, optional: bool) -> Any:
        value = self.get(dotted)
        if value is _MISSING and not optional:
            raise UserError(f"{self.path}: missing field '{dotted}'")
        return None if value is _MISSING else value

    def string(self, dotted: str, optional: bool = False) -> Any:
        value = self._required(dotted, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(dotted, "a non-empty string", value)
        return value

    def integer(self, dotted: str, optional: bool = False, minimum: int | None = None) -> Any:
        value = self._required(dotted, optional)
        if value is None and optional:
            return None
        if not _is_int(value) or (minimum is not None and value < minimum):
            expected = "an integer" if minimum is None else f"an integer >= {minimum}"
            raise self.fail(dotted, expected, value)
        return int(value)

    def mapping(self, dotted: str, optional: bool = False) -> dict[str, Any]:
        value = self._required(dotted, optional)
        if value is None and optional:
            return {}
        if not isinstance(value, Mapping):
            raise self.fail(dotted, "an object", value)
        return dict(value)

    def number_map(self, dotted: str, optional: bool = False) -> dict[str, float]:
        """An object of numbers; null stands for a value that could not be computed and becomes NaN."""
        return {key: self._number(f"{dotted}.{key}", v) for key, v in self.mapping(dotted, optional).items()}

    def number_lists(self, dotted: str, optional: bool = False) -> dict[str, tuple[float, ...]]:
        out = {}
        for key, values in self.mapping(dotted, optional).items():
            if not isinstance(values, list):
                raise self.fail(f"{dotted}.{key}", "a list of numbers", values)
            out[key] = tuple(self._number(f"{dotted}.{key}[{i}]", v) for i, v in enumerate(values))
        return out

    def _number(self, dotted: str, value: Any) -> float:
        if value is None:
            return math.nan
        if not _is_number(value):
            raise self.fail(dotted, "a number or null", value)
        return float(value)


def _load_json_object(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({json_error(e)})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------
# train_log.jsonl (+ run.json beside it)


def load_train_log(path: Path) -> TrainLog:
    """Read one training log and the identity of its run from run.json in the same folder.

    A resumed run can log a step again after restarting from a checkpoint; the last line for a step wins, as it
    describes the run that continued. Without run.json the folder name stands in for run and group name.
    """
    run_name, group, method, seed = _run_identity(path.parent)
    loss_by_step: dict[int, float] = {}
    signals_by_step: dict[int, dict[str, float]] = {}
    for lineno, record in read_jsonl(path, required=("step", "loss")):
        step, loss = record["step"], record["loss"]
        if not _is_int(step) or step < 0:
            raise UserError(f"{path}:{lineno}: field 'step' must be an integer >= 0, got {json.dumps(step)}")
        if loss is not None and not _is_number(loss):
            raise UserError(f"{path}:{lineno}: field 'loss' must be a number or null, got {json.dumps(loss)[:80]}")
        loss_by_step[step] = math.nan if loss is None or not math.isfinite(loss) else float(loss)
        signals_by_step[step] = {k: float(v) for k, v in record.items()
                                 if k not in _NOT_SIGNALS and _is_number(v) and math.isfinite(v)}
    steps = tuple(sorted(loss_by_step))
    names = dict.fromkeys(k for s in steps for k in signals_by_step[s])
    return TrainLog(
        path=path,
        run_name=run_name,
        group=group,
        method=method,
        seed=seed,
        steps=steps,
        losses=tuple(loss_by_step[s] for s in steps),
        signals={name: tuple(signals_by_step[s].get(name, math.nan) for s in steps) for name in names},
        run=load_run_info(path.parent),
    )


_NOT_SIGNALS = ("step", "loss", "budget")  # loss has its own field; budget is a nested counter table
CONFIG_FILE = "config.toml"


def load_run_info(run_dir: Path) -> RunInfo | None:
    """run.json's budget unit and amount, and the rewards of config.toml's [method] (none for SFT or SOAR)."""
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return None
    fields = _Fields(_load_json_object(run_file), run_file)
    unit = fields.get("budget.unit")
    amount = fields.get("budget.amount")
    config_path = run_dir / CONFIG_FILE
    rewards: dict[str, float] = {}
    sha = None
    if config_path.is_file():
        raw = config_path.read_bytes()
        sha = hashlib.sha256(raw).hexdigest()
        try:
            config = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{config_path}: not valid TOML ({e})") from None
        method = config.get("method", {})
        found = method.get("rewards", {}) if isinstance(method, dict) else {}
        if not isinstance(found, dict):
            raise UserError(f"{config_path}: field 'method.rewards' must be a table of metric = weight")
        rewards = {str(k): float(v) for k, v in found.items() if _is_number(v)}
    return RunInfo(
        budget_unit=unit if isinstance(unit, str) and unit else None,
        budget_amount=float(amount) if _is_number(amount) else None,
        rewards=rewards,
        config_path=config_path if config_path.is_file() else None,
        config_sha256=sha,
    )


def _run_identity(run_dir: Path) -> tuple[str, str, str, int | None]:
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        return run_dir.name, run_dir.name, UNKNOWN_METHOD, None
    fields = _Fields(_load_json_object(run_file), run_file)
    return (
        fields.string("run_name"),
        fields.string("group"),
        fields.string("method"),
        fields.integer("seed", optional=True),
    )


# ---------------------------------------------------------------------------------------------------------------
# Cross-checks


def _check_unique_evals(evals: Iterable[EvalSummary]) -> None:
    """Two summaries for the same run, step and benchmark would count one seed twice: refuse them."""
    seen: dict[tuple[str, int | None, str], Path] = {}
    for e in evals:
        key = (e.run_name, e.step, e.benchmark)
        if key in seen:
            raise UserError(
                f"{e.path}: run '{e.run_name}' step {e.step} on '{e.benchmark}' is also evaluated in {seen[key]}; "
                "pass only one of them"
            )
        seen[key] = e.path


def resolve_group_methods(evals: Iterable[EvalSummary], logs: Iterable[TrainLog]) -> dict[str, str]:
    """Each group's method: the one training method of its runs, or "base" for a group of base evaluations only.

    A run's step-0 evaluation is marked "base" (nothing trained yet) but belongs to the run's group; any other
    disagreement means seeds of different methods share a group name, and their mean would mix methods.
    """
    first_seen: dict[str, tuple[str, Path]] = {}
    items = [(e.group, e.method, e.path) for e in evals] + [(log.group, log.method, log.path) for log in logs]
    for group, method, path in items:
        if method in (BASE_METHOD, UNKNOWN_METHOD):
            continue
        first = first_seen.setdefault(group, (method, path))
        if first[0] != method:
            raise UserError(
                f"{path}: group '{group}' has method '{method}' here but '{first[0]}' in {first[1]}; "
                "runs of different methods need different group names"
            )
    base_groups = {group for group, method, _ in items if method == BASE_METHOD}
    resolved = {}
    for group, _, _ in items:
        if group in first_seen:
            resolved[group] = first_seen[group][0]
        else:
            resolved[group] = BASE_METHOD if group in base_groups else UNKNOWN_METHOD
    return resolved


def _prompt_set_warnings(evals: Iterable[EvalSummary]) -> list[str]:
    by_benchmark: dict[str, dict[str, Path]] = {}
    for e in evals:
        if e.prompt_set_sha256 is not None:
            by_benchmark.setdefault(e.benchmark, {}).setdefault(e.prompt_set_sha256, e.path)
    return [
        f"benchmark '{name}' was evaluated on {len(shas)} different prompt sets "
        f"(e.g. {', '.join(str(p) for p in list(shas.values())[:2])}); its scores are not directly comparable"
        for name, shas in by_benchmark.items()
        if len(shas) > 1
    ]


def _fallback_warnings(logs: Iterable[TrainLog]) -> list[str]:
    return [
        f"{log.path}: no {RUN_FILE} beside it; using the folder name '{log.run_name}' as run and group name"
        for log in logs
        if log.method == UNKNOWN_METHOD
    ]


# ---------------------------------------------------------------------------------------------------------------
# Provenance

# Where the summaries' free-form provenance block may keep each fact; the first key present wins.
_GIT_SHA_KEYS = ("git_sha", "git.sha", "git.commit", "git_commit")
_GIT_DIRTY_KEYS = ("git_dirty", "git.dirty")
_PACKAGE_KEYS = ("packages", "versions", "package_versions")


def merge_provenance(evals: Iterable[EvalSummary]) -> Provenance:
    """Collect git sha, dirty flag and package versions from every summary that records them."""
    shas: dict[str, None] = {}
    dirty: bool | None = None
    packages: dict[str, dict[str, None]] = {}
    for e in evals:
        prov = _Fields(e.provenance, e.path)
        sha = _first_present(prov, _GIT_SHA_KEYS)
        if isinstance(sha, str) and sha:
            shas.setdefault(sha)
        flag = _first_present(prov, _GIT_DIRTY_KEYS)
        if isinstance(flag, bool):
            dirty = flag or bool(dirty)
        versions = _first_present(prov, _PACKAGE_KEYS)
        if isinstance(versions, Mapping):
            for name, version in versions.items():
                if isinstance(version, (str, int, float)) and not isinstance(version, bool):
                    packages.setdefault(str(name), {}).setdefault(str(version))
    return Provenance(
        git_shas=tuple(shas),
        git_dirty=dirty,
        packages={name: tuple(versions) for name, versions in sorted(packages.items())},
    )


def _first_present(fields: _Fields, keys: Iterable[str]) -> Any:
    for key in keys:
        value = fields.get(key)
        if value is not _MISSING:
            return value
    return None


@dataclass(frozen=True)
class PerPrompt:
    scores: np.ndarray  # mean over the checkpoint's seeds, one value per prompt
    prompt_set: str | None
    strata: tuple[str, ...] | None = None  # the overall is the mean of these strata's means (GenEval's tasks)


def per_prompt_scores(cp, key: str) -> PerPrompt | None:
    """A checkpoint's (report/tables.Checkpoint: the evaluations of one group's seeds at one step) per-prompt scores
    averaged over seeds, or None unless every seed has them, alike."""
    lists = [values for e in cp.evals if (values := e.per_prompt.get(key))]
    prompt_sets = {e.prompt_set_sha256 for e in cp.evals}
    if len(lists) != cp.n_seeds or len({len(v) for v in lists}) != 1 or len(prompt_sets) != 1:
        return None
    scores = np.asarray(lists, dtype=float).mean(axis=0)
    if not np.all(np.isfinite(scores)):
        return None
    strata = {e.strata.get(key) for e in cp.evals}
    return PerPrompt(scores, prompt_sets.pop(), strata.pop() if len(strata) == 1 else None)
