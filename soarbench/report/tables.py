"""The report's tables: built from the collected evaluations, rendered as CSV and Markdown (HTML is in html.py).

A row is a checkpoint: every evaluation of one group (the seeds of one method) at one step on one benchmark.
With one seed a cell is that run's value; with two or more it is the mean over seeds with a bootstrap interval.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from soarbench import __version__
from soarbench.report.collect import BASE_METHOD, EvalSummary, ReportData, per_prompt_scores
from soarbench.report.controls import check_controls
from soarbench.report.entries import View
from soarbench.report.stats import (
    DEFAULT_ALPHA,
    DEFAULT_SEED,
    N_RESAMPLES,
    PairedTest,
    bootstrap_ci,
    mde_paired,
    mde_two_groups,
    paired_bootstrap,
)

REFERENCE_GROUP = "sft"  # the final table tests every other group against this one
GENEVAL_METRIC = "geneval"
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Groups sort by method in this order (others after, by name), so tables and legends read base -> sft -> ...
METHOD_ORDER = (BASE_METHOD, "sft", "soar", "flow_grpo")

SCORE, COUNT, SECONDS, DIFF, P_VALUE = "score", "count", "seconds", "diff", "p"
UNIT_SCALE_DECIMALS = 3  # for scores in [0, 1]
OTHER_DECIMALS = 2

_UNIT_SCALE = re.compile(r"\[\s*0(?:\.0*)?\s*,\s*1(?:\.0*)?\s*\]")  # "accuracy in [0, 1]", "[0.0, 1.0]"
_CONFIDENCE = f"{1 - DEFAULT_ALPHA:.0%}"

STATS_NOTES = (
    f"Seeds: where a checkpoint has two or more seeds (training runs of one group), a score cell is the mean over "
    f"seeds and a {_CONFIDENCE} percentile bootstrap interval of that mean ({N_RESAMPLES:,} resamples of the "
    f"seeds, RNG seed {DEFAULT_SEED}). From 2 or 3 seeds that interval is exactly [min, max]: read it as the "
    "spread across seeds, not as a precise interval.",
    f"Paired test vs '{REFERENCE_GROUP}' (final table): each group's per-prompt scores of the main metric are "
    "averaged over its seeds, prompt by prompt; the differences d = group - "
    f"{REFERENCE_GROUP} are resampled with replacement ({N_RESAMPLES:,} times, RNG seed {DEFAULT_SEED}). "
    f"Δ is mean(d) and its interval the {DEFAULT_ALPHA / 2:.1%} and {1 - DEFAULT_ALPHA / 2:.1%} percentiles of "
    "the resampled means. The two-sided p-value centres those means on zero (the null hypothesis) and counts "
    "how many are at least as far from zero as the observed mean: p = (1 + count) / (1 + resamples), so its "
    f"floor is {1 / (1 + N_RESAMPLES):.4f}. Prompts are the random unit; seed-to-seed variation shows in the "
    "seed interval instead. The test runs only where both groups have per-prompt scores on the same prompt set.",
    "Budget columns are means over seeds of the compute counters spent up to the checkpoint.",
)


# ---------------------------------------------------------------------------------------------------------------
# Cells and checkpoints


@dataclass(frozen=True)
class Cell:
    """A number in a table, with its interval when there is one."""

    value: float
    lo: float | None = None
    hi: float | None = None

    @property
    def has_interval(self) -> bool:
        return self.lo is not None and self.hi is not None


def seed_stat(values: Iterable[float]) -> Cell | None:
    """The value (one seed) or the mean with its bootstrap interval (two or more); None without a finite value."""
    # Sorted so that the bootstrap draws, and so the interval, do not depend on the order runs were found in.
    finite = tuple(sorted(float(v) for v in values if math.isfinite(v)))
    return _seed_stat(finite) if finite else None


@lru_cache(maxsize=4096)  # tables and curves ask for the same cells
def _seed_stat(values: tuple[float, ...]) -> Cell:
    if len(values) == 1:
        return Cell(values[0])
    ci = bootstrap_ci(values)
    return Cell(ci.mean, ci.lo, ci.hi)


def mean_cell(values: Iterable[float]) -> Cell | None:
    """The plain mean, for counters whose spread across seeds is not a finding (budget spent)."""
    finite = [v for v in values if math.isfinite(v)]
    return Cell(sum(finite) / len(finite)) if finite else None


@dataclass(frozen=True)
class Checkpoint:
    """Every evaluation of one group at one step (or one budget point) on one benchmark: one seed each."""

    group: str
    method: str  # the group's method (see ReportData.group_methods)
    step: int | None  # the largest step among the seeds
    evals: tuple[EvalSummary, ...]
    first_step: int | None = None  # the smallest, when seeds reached the budget point at different steps

    @property
    def is_reference(self) -> bool:
        """A model that was not trained here (the base model, or one evaluated on its own): a level, not a curve."""
        return self.method == BASE_METHOD or self.step is None

    @property
    def label(self) -> str:
        """"group@step"; a base or stand-alone model is just its group name (step 0 or none says nothing). A method
        reconstructed from its paper (no public code; its recorded version says so) is labelled as such."""
        if self.step is None or (self.method == BASE_METHOD and self.step == 0):
            return self.group
        steps = f"{self.first_step}-{self.step}" if self.first_step not in (None, self.step) else f"{self.step}"
        return f"{self.group}@{steps}" + (" (reconstructed)" if self.reconstructed else "")

    @property
    def reconstructed(self) -> bool:
        return any("reconstructed" in e.method_version for e in self.evals)

    @property
    def n_seeds(self) -> int:
        return len(self.evals)

    def score(self, key: str) -> Cell | None:
        return seed_stat(e.scores.get(key, math.nan) for e in self.evals)

    def budget(self, counter: str) -> Cell | None:
        return mean_cell(e.budget.get(counter, math.nan) for e in self.evals)


def group_sort_key(group: str, method: str) -> tuple[int, str]:
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, group


def checkpoints(evals: Iterable[EvalSummary], group_methods: Mapping[str, str]) -> list[Checkpoint]:
    """Evaluations grouped by (group, step), ordered by group (see METHOD_ORDER) then step.

    Training evaluates at fixed fractions of the budget; a method whose steps cost different amounts from seed to
    seed (Flow-GRPO drops tied groups and spends the saving on more epochs) reaches them at different steps. So
    when every seed of a group has the same number of evaluations, the i-th evaluation of each seed is grouped
    with the i-th of the others (same budget point) and the checkpoint spans their steps.
    """
    evals = list(evals)
    ordinal = _budget_points(evals)
    grouped: dict[tuple, list[EvalSummary]] = {}
    for e in evals:
        key = (e.group, "point", ordinal[id(e)]) if id(e) in ordinal else (e.group, "step", e.step)
        grouped.setdefault(key, []).append(e)
    cps = []
    for members in grouped.values():
        steps = [m.step for m in members if m.step is not None]
        step = max(steps) if steps else None
        cps.append(Checkpoint(members[0].group, group_methods.get(members[0].group, members[0].method), step,
                              tuple(members), min(steps) if steps else None))
    return sorted(cps, key=lambda cp: (group_sort_key(cp.group, cp.method), _step_order(cp.step)))


def _budget_points(evals: Sequence[EvalSummary]) -> dict[int, int]:
    """id(eval) -> its ordinal among its run's trained evaluations, for groups whose seeds all have the same
    number of them and disagree on steps (otherwise grouping by step already aligns them)."""
    runs: dict[tuple[str, str, str], list[EvalSummary]] = {}
    for e in evals:
        if e.step is not None and e.step > 0 and e.method != BASE_METHOD:
            runs.setdefault((e.group, e.benchmark, e.run_name), []).append(e)
    by_group: dict[tuple[str, str], list[list[EvalSummary]]] = {}
    for (group, bench, _), members in runs.items():
        by_group.setdefault((group, bench), []).append(sorted(members, key=lambda m: m.step))
    out: dict[int, int] = {}
    for seeds in by_group.values():
        counts = {len(s) for s in seeds}
        same_steps = len({tuple(m.step for m in s) for s in seeds}) == 1
        if len(seeds) < 2 or len(counts) != 1 or same_steps:
            continue
        for s in seeds:
            for i, m in enumerate(s):
                out[id(m)] = i
    return out


def _step_order(step: int | None) -> int:
    return -1 if step is None else step


def final_checkpoints(cps: Sequence[Checkpoint], key: str) -> list[Checkpoint]:
    """Each group's checkpoint at its largest step with a `key` score (from the seeds that reached that step).

    A last evaluation whose main score is null (it failed) does not hide the group's last real result.
    """
    scored_groups = {cp.group for cp in cps if cp.score(key) is not None}
    last: dict[str, Checkpoint] = {}
    for cp in cps:
        if cp.group in scored_groups and cp.score(key) is None:
            continue
        if cp.group not in last or _step_order(cp.step) > _step_order(last[cp.group].step):
            last[cp.group] = cp
    return [cp for cp in cps if last[cp.group] is cp]


# ---------------------------------------------------------------------------------------------------------------
# Columns


@dataclass(frozen=True)
class Column:
    """A table column: `key` names it in CSV and in a row's cells, `title` in Markdown and HTML."""

    key: str
    title: str
    kind: str  # SCORE, COUNT, SECONDS, DIFF or P_VALUE
    decimals: int = OTHER_DECIMALS


BUDGET_COUNTERS = (("fwd_bwd", "fwd+bwd", COUNT), ("images", "images", COUNT), ("data_images", "data images", COUNT),
                   ("wall_s", "wall s", SECONDS))


def main_metric(evals: Sequence[EvalSummary]) -> str:
    """The benchmark's headline score: the first metric a summary declares, else its first top-level score."""
    for e in evals:
        for name in e.metrics:
            if name in e.scores:
                return name
    keys = _score_keys_in_order(evals)
    return next((k for k in keys if "/" not in k), keys[0])


def score_columns(evals: Sequence[EvalSummary], main: str) -> list[Column]:
    """Every score key present: the main metric first, each top-level metric followed by its "metric/..." keys."""
    keys = _score_keys_in_order(evals)
    top = [main] + [k for k in keys if "/" not in k and k != main]
    ordered = []
    for metric in top:
        ordered.append(metric)
        ordered += [k for k in keys if k.startswith(metric + "/")]
    ordered += [k for k in keys if k not in ordered]  # sub-keys of a metric that has no top-level score
    return [Column(k, k, SCORE, _score_decimals(k, evals)) for k in ordered]


def budget_columns(evals: Sequence[EvalSummary]) -> list[Column]:
    """The experiment's matched budget unit first (the resolved config's budget.unit), then the raw counters."""
    present = {counter for e in evals for counter in e.budget}
    decimals = {COUNT: 0, SECONDS: OTHER_DECIMALS}
    columns = [Column(key, title, kind, decimals[kind]) for key, title, kind in BUDGET_COUNTERS if key in present]
    unit = next((u for e in evals if (u := e.budget_unit)), None)
    if unit in present and unit not in {c.key for c in columns}:
        columns.insert(0, Column(unit, f"budget ({unit})", COUNT, 0))
    return columns


def _score_keys_in_order(evals: Iterable[EvalSummary]) -> list[str]:
    return list(dict.fromkeys(k for e in evals for k in e.scores))


def _score_decimals(key: str, evals: Sequence[EvalSummary]) -> int:
    """3 decimals for a metric on a [0, 1] scale, 2 otherwise; sub-keys share their metric's scale."""
    metric = key.split("/", 1)[0]
    for e in evals:
        scale = e.metrics.get(metric, {}).get("scale")
        if isinstance(scale, str):
            return UNIT_SCALE_DECIMALS if _UNIT_SCALE.search(scale) else OTHER_DECIMALS
    # No summary states the scale: judge by the values themselves.
    values = [e.scores[key] for e in evals if key in e.scores and math.isfinite(e.scores[key])]
    return UNIT_SCALE_DECIMALS if values and all(0 <= v <= 1 for v in values) else OTHER_DECIMALS


# ---------------------------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Row:
    label: str
    group: str
    method: str
    step: int | None
    n_seeds: int
    cells: Mapping[str, Cell | None]


@dataclass(frozen=True)
class Table:
    benchmark: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    view: str = ""  # the budget view (report/entries.py) whose final table this is; "" for the main tables

    @property
    def has_seed_intervals(self) -> bool:
        return any(
            (cell := row.cells.get(col.key)) is not None and cell.has_interval
            for row in self.rows
            for col in self.columns
            if col.kind == SCORE
        )


@dataclass(frozen=True)
class BenchmarkTables:
    """All tables of one benchmark."""

    benchmark: str
    description: str
    main_metric: str
    main: Table
    final: Table
    tasks: Table | None
    controls: tuple = ()  # controls.ControlResult, one per control the experiment names
    views: tuple = ()  # Table: a final table per budget view (report/entries.py), after `final`


def build_tables(data: ReportData) -> list[BenchmarkTables]:
    return [build_benchmark_tables(name, data.evals_for(name), data.group_methods,
                                   _controls_on(data, name), data.views)
            for name in data.benchmarks()]


def _controls_on(data: ReportData, benchmark: str) -> dict[str, str]:
    """The controls to check on one benchmark: those whose group was evaluated there, and those evaluated nowhere
    (reported as not run); a control evaluated on other benchmarks only (the negative control beside a positive
    one that is also scored in-distribution) is not a missing result here."""
    evaluated = {b: {e.group for e in data.evals_for(b)} for b in data.benchmarks()}
    return {kind: group for kind, group in data.controls.items()
            if group in evaluated[benchmark] or not any(group in groups for groups in evaluated.values())}


def build_benchmark_tables(
    benchmark: str, evals: Sequence[EvalSummary], group_methods: Mapping[str, str],
    controls: Mapping[str, str] | None = None,
    views: Sequence[View] = (),
) -> BenchmarkTables:
    main = main_metric(evals)
    scores = score_columns(evals, main)
    budget = budget_columns(evals)
    cps = checkpoints(evals, group_methods)
    finals = final_checkpoints(cps, main)
    top_level = [c for c in scores if "/" not in c.key]
    view_only = {v.reference for v in views}  # runs budgeted for a view, not for the main comparison
    return BenchmarkTables(
        benchmark=benchmark,
        description=_benchmark_description(evals),
        main_metric=main,
        main=_table(benchmark, "All checkpoints", cps, scores + budget),
        final=_final_table(benchmark, [cp for cp in finals if cp.group not in view_only], main, top_level, budget,
                           controls or {}),
        tasks=_task_table(benchmark, finals, scores),
        controls=tuple(check_controls(controls, finals, _base_checkpoint(finals), main, benchmark)) if controls else (),
        views=tuple(_view_table(benchmark, view, finals, main, top_level, budget) for view in views
                    if any(cp.group in view.members for cp in finals)),  # not on benchmarks it was not scored on
    )


def _view_table(benchmark: str, view: View, finals: Sequence[Checkpoint], main: str, score_cols: Sequence[Column],
                budget_cols: Sequence[Column]) -> Table:
    """A budget view's final table: the base, the view's reference and its groups, each tested against the
    reference (report/entries.py)."""
    members = [cp for cp in finals if cp.group in view.members or cp.method == BASE_METHOD]
    table = _final_table(benchmark, members, main, score_cols, budget_cols, reference_group=view.reference,
                         title=view.title)
    missing = [g for g in view.members if g not in {cp.group for cp in finals}]
    notes = (f"No evaluation found for {', '.join(missing)} of this view.",) if missing else ()
    return replace(table, notes=(*table.notes, *notes), view=view.name)


def _base_checkpoint(finals: Sequence[Checkpoint]) -> Checkpoint | None:
    """The base model's evaluation: the group named "base" if there is one, else the first base-model group."""
    bases = [cp for cp in finals if cp.method == BASE_METHOD]
    return next((cp for cp in bases if cp.group == BASE_METHOD), bases[0] if bases else None)


def _table(
    benchmark: str,
    title: str,
    cps: Sequence[Checkpoint],
    columns: Sequence[Column],
    extra: Mapping[str, Mapping[str, Cell]] | None = None,
    notes: Sequence[str] = (),
) -> Table:
    """One row per checkpoint: score and budget cells computed from its evaluations, `extra` cells by group."""
    extra = extra or {}
    rows = []
    for cp in cps:
        cells = {c.key: _checkpoint_cell(cp, c) for c in columns if c.kind in (SCORE, COUNT, SECONDS)}
        cells.update(extra.get(cp.group, {}))
        rows.append(Row(cp.label, cp.group, cp.method, cp.step, cp.n_seeds, cells))
    return Table(benchmark, title, tuple(columns), tuple(rows), tuple(notes))


def _checkpoint_cell(cp: Checkpoint, column: Column) -> Cell | None:
    return cp.score(column.key) if column.kind == SCORE else cp.budget(column.key)


def _final_table(
    benchmark: str,
    finals: Sequence[Checkpoint],
    main: str,
    score_cols: Sequence[Column],
    budget_cols: Sequence[Column],
    controls: Mapping[str, str] | None = None,
    reference_group: str = REFERENCE_GROUP,
    title: str = "Final checkpoints",
) -> Table:
    """The final checkpoints with their top-level scores and, where it can run, the paired test vs the reference
    group. A control's row is labelled as one: it answers whether the harness can see a difference, and a positive
    control may train with a budget of its own, so it is not one of the matched-budget comparisons."""
    tests, notes = paired_tests(finals, main, reference_group)
    notes = [*_control_notes(finals, controls or {}), *notes]
    if not tests:
        return _table(benchmark, title, finals, [*score_cols, *budget_cols], notes=notes)
    decimals = next(c.decimals for c in score_cols if c.key == main)
    diff_col = Column(f"{main}_diff_vs_{reference_group}", f"Δ {main} vs {reference_group}", DIFF, decimals)
    p_col = Column(f"{main}_p_vs_{reference_group}", "p", P_VALUE)
    extra = {
        group: {diff_col.key: Cell(t.diff, t.lo, t.hi), p_col.key: Cell(t.p_value)} for group, t in tests.items()
    }
    columns = [*score_cols, diff_col, p_col, *budget_cols]
    notes = [*notes, *_mde_notes(finals, main, reference_group, tests, decimals)]
    return _table(benchmark, title, finals, columns, extra=extra, notes=notes)


def _control_notes(finals: Sequence[Checkpoint], controls: Mapping[str, str]) -> list[str]:
    present = {cp.group: cp for cp in finals}
    notes = []
    for kind, group in controls.items():
        if group not in present:
            continue
        spent = [(e.budget_unit, e.budget.get(e.budget_unit)) for e in present[group].evals if e.budget_unit]
        amount = f" ({spent[0][1]:g} {spent[0][0]} spent)" if spent and spent[0][1] is not None else ""
        notes.append(f"{group} is the {kind} control{amount}: a check of the harness (see Controls), not one of the "
                     f"matched-budget comparisons.")
    return notes


def _mde_notes(finals: Sequence[Checkpoint], key: str, reference_group: str, tests: Mapping[str, PairedTest],
               decimals: int) -> list[str]:
    """The minimum detectable difference of each paired test the final table prints (see stats.mde_paired)."""
    by_group = {cp.group: cp for cp in finals}
    reference = per_prompt_scores(by_group[reference_group], key)
    notes = []
    for group in tests:
        ours = per_prompt_scores(by_group[group], key)
        diffs = ours.scores - reference.scores
        prompts = mde_paired(diffs, strata=ours.strata)
        seeds = mde_two_groups([e.scores.get(key, math.nan) for e in by_group[group].evals],
                               [e.scores.get(key, math.nan) for e in by_group[reference_group].evals])
        text = f"MDE of {group} vs {reference_group} on {key} (80% power, two-sided alpha 0.05): "
        text += f"{prompts:.{decimals}f} from {diffs.size} per-prompt differences"
        if ours.strata is not None:
            text += f" in {len(set(ours.strata))} strata (the overall is the mean of their means)"
        text += f", {seeds:.{decimals}f} from the seeds' spread." if math.isfinite(seeds) else \
            " (seeds: fewer than 2 per side, no spread)."
        notes.append(text)
    return notes


def _task_table(benchmark: str, finals: Sequence[Checkpoint], scores: Sequence[Column]) -> Table | None:
    """GenEval accuracy per task at the final checkpoints; None for a benchmark without GenEval tasks."""
    by_key = {c.key: c for c in scores}
    tasks = [by_key[f"{GENEVAL_METRIC}/{t}"] for t in GENEVAL_TASKS if f"{GENEVAL_METRIC}/{t}" in by_key]
    if not tasks:
        return None
    columns = [Column(c.key, c.key.split("/", 1)[1], SCORE, c.decimals) for c in tasks]
    if GENEVAL_METRIC in by_key:
        columns.insert(0, Column(GENEVAL_METRIC, "overall", SCORE, by_key[GENEVAL_METRIC].decimals))
    return _table(benchmark, "GenEval accuracy per task (final checkpoints)", finals, columns)


def _benchmark_description(evals: Sequence[EvalSummary]) -> str:
    """E.g. "64 prompts x 4 images, prompt set 3f2a9c1d0b7e": taken from the first summary that says."""
    parts = []
    n_prompts = next((e.n_prompts for e in evals if e.n_prompts is not None), None)
    per_prompt = next((e.images_per_prompt for e in evals if e.images_per_prompt is not None), None)
    n_images = next((e.n_images for e in evals if e.n_images is not None), None)
    if n_prompts is not None and n_images is not None and n_images != n_prompts * (per_prompt or 0):
        parts.append(f"{n_prompts} prompts, {n_images} images")  # per-task image counts (min_images_per_task)
    elif n_prompts is not None:
        parts.append(f"{n_prompts} prompts" + (f" x {per_prompt} images" if per_prompt is not None else ""))
    sha = next((e.prompt_set_sha256 for e in evals if e.prompt_set_sha256), None)
    if sha:
        parts.append(f"prompt set sha256 {sha[:12]}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Paired test vs the reference group


def paired_tests(
    finals: Sequence[Checkpoint], key: str, reference_group: str = REFERENCE_GROUP
) -> tuple[dict[str, PairedTest], list[str]]:
    """Paired bootstrap of every group's per-prompt `key` scores against the reference group's.

    Returns the tests by group and notes explaining any that could not run.
    """
    per_prompt = {cp.group: pp for cp in finals if (pp := per_prompt_scores(cp, key)) is not None}
    if not per_prompt:
        return {}, []
    reference = per_prompt.get(reference_group)
    if reference is None or len(per_prompt) < 2:
        return {}, [
            f"No paired test: it needs per-prompt '{key}' scores for group '{reference_group}' and at least one "
            f"other group (found them for: {', '.join(per_prompt)})."
        ]
    tests, notes = {}, []
    for group, pp in per_prompt.items():
        if group == reference_group:
            continue
        if pp.scores.shape != reference.scores.shape or (
            pp.prompt_set and reference.prompt_set and pp.prompt_set != reference.prompt_set
        ):
            notes.append(f"No paired test for '{group}': it was evaluated on other prompts than '{reference_group}'.")
            continue
        tests[group] = paired_bootstrap(pp.scores, reference.scores, strata=pp.strata)
    return tests, notes


# ---------------------------------------------------------------------------------------------------------------
# Formatting


def cell_parts(cell: Cell | None, column: Column) -> tuple[str, str]:
    """(value, interval) as shown to a reader: "0.612", "[0.580, 0.640]"; the interval is "" when there is none."""
    if cell is None or not math.isfinite(cell.value):
        return "—", ""
    if column.kind == P_VALUE:
        return ("<0.001" if cell.value < 0.001 else f"{cell.value:.3f}"), ""
    if column.kind == COUNT:
        return _format_count(cell.value), ""
    sign = "+" if column.kind == DIFF else ""
    value = f"{cell.value:{sign}.{column.decimals}f}"
    if not cell.has_interval:
        return value, ""
    return value, f"[{cell.lo:{sign}.{column.decimals}f}, {cell.hi:{sign}.{column.decimals}f}]"


def format_cell(cell: Cell | None, column: Column) -> str:
    value, interval = cell_parts(cell, column)
    return f"{value} {interval}" if interval else value


def _format_count(value: float) -> str:
    # Counters are integers, but a mean over seeds need not be.
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.{OTHER_DECIMALS}f}"


# ---------------------------------------------------------------------------------------------------------------
# CSV

CSV_LEADING = ("benchmark", "label", "group", "method", "step", "n_seeds")


def tables_csv(tables: Sequence[Table], view_column: bool = False) -> str:
    """One CSV for several benchmarks' tables of one kind: the columns are the union, blank where absent. With
    `view_column` a "view" column after the leading ones names each row's budget view ("" for the main table), so
    final_table.csv holds the views' final tables beside the main one.

    Score columns are split into KEY_mean, KEY_lo, KEY_hi as soon as any row has a seed interval (single-seed
    rows then leave _lo and _hi blank); a paired difference always has KEY, KEY_lo, KEY_hi. Numbers are not
    rounded for display (see _csv_number).
    """
    columns = list({c.key: c for t in tables for c in t.columns}.values())
    split = any(t.has_seed_intervals for t in tables)
    leading_names = [*CSV_LEADING, *(["view"] if view_column else [])]
    header = [*leading_names, *(name for c in columns for name in _csv_names(c, split))]
    rows = []
    for table in tables:
        for row in table.rows:
            step = "" if row.step is None else str(row.step)
            leading = [table.benchmark, row.label, row.group, row.method, step, str(row.n_seeds)]
            leading += [table.view] if view_column else []
            rows.append([*leading, *(v for c in columns for v in _csv_values(row.cells.get(c.key), c, split))])
    # the cells are already formatted strings (_csv_number): pandas only lays out and quotes them
    return pd.DataFrame(rows, columns=header, dtype=str).to_csv(index=False, lineterminator="\n")


def _csv_names(column: Column, split: bool) -> list[str]:
    if column.kind == DIFF:
        return [column.key, f"{column.key}_lo", f"{column.key}_hi"]
    if column.kind == SCORE and split:
        return [f"{column.key}_mean", f"{column.key}_lo", f"{column.key}_hi"]
    return [column.key]


def _csv_values(cell: Cell | None, column: Column, split: bool) -> list[str]:
    if column.kind == DIFF or (column.kind == SCORE and split):
        if cell is None:
            return ["", "", ""]
        return [_csv_number(cell.value), _csv_number(cell.lo), _csv_number(cell.hi)]
    return [_csv_number(cell.value if cell is not None else None)]


def _csv_number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return ""
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    # 12 significant digits: more than any score carries, few enough to drop noise like 0.20999999999999996
    return f"{value:.12g}"


# ---------------------------------------------------------------------------------------------------------------
# Markdown


def table_markdown(table: Table) -> str:
    """A pipe table: model label, number of seeds, then the table's columns (numbers right-aligned)."""
    header = ["model", "seeds", *(c.title for c in table.columns)]
    lines = [md_row(header), md_row([":--", "--:", *("--:" for _ in table.columns)])]
    for row in table.rows:
        cells = (format_cell(row.cells.get(c.key), c) for c in table.columns)
        lines.append(md_row([row.label, str(row.n_seeds), *cells]))
    return "\n".join(lines)


def provenance_items(data: ReportData) -> list[tuple[str, str]]:
    """(label, text) lines describing what the report was built from; shared by Markdown and HTML."""
    provenance = data.provenance
    inputs = f"{_count(len(data.evals), 'evaluation')}, {_count(len(data.train_logs), 'training log')}"
    items = [("report by", f"soarbench {__version__}"), ("inputs", inputs)]
    items.append(("git sha", ", ".join(provenance.git_shas) if provenance.git_shas else "not recorded"))
    dirty = {None: "not recorded", True: "yes (uncommitted changes)", False: "no"}[provenance.git_dirty]
    items.append(("dirty tree", dirty))
    if provenance.packages:
        items.append(("packages", ", ".join(f"{name} {' / '.join(v)}" for name, v in provenance.packages.items())))
    items += _input_items(data)
    return items


def _input_items(data: ReportData) -> list[tuple[str, str]]:
    """Prompt-set hashes, configs, checkpoint hashes and budgets: what a reader needs to redo a number."""
    items = []
    for bench in data.benchmarks():
        shas = sorted({e.prompt_set_sha256 for e in data.evals_for(bench) if e.prompt_set_sha256})
        if shas:
            items.append((f"prompt set {bench}", "sha256 " + ", ".join(shas)))
    for log in sorted(data.train_logs, key=lambda lg: lg.run_name):
        run = log.run
        if run is None:
            continue
        parts = []
        if run.budget_unit:
            amount = f"{run.budget_amount:g} " if run.budget_amount is not None else ""
            parts.append(f"budget {amount}{run.budget_unit}")
        if run.config_path is not None:
            parts.append(f"config {run.config_path} (sha256 {run.config_sha256[:16]})")
        if run.rewards:
            parts.append("rewards " + ", ".join(f"{k} x {w:g}" for k, w in run.rewards.items()))
        if parts:
            items.append((f"run {log.run_name}", "; ".join(parts)))
    for path, digest in checkpoint_hashes(data).items():
        items.append(("checkpoint", f"{path}: sha256 {digest}"))
    return items


def checkpoint_hashes(data: ReportData) -> dict[str, str]:
    """sha256 over each evaluated model folder still on disk (soarbench.provenance.folder_hash; files over its size
    limit enter by size): the base model and each group's last checkpoint. Hashed when the report is built."""
    from soarbench.provenance import folder_hash

    latest: dict[str, EvalSummary] = {}
    for e in data.evals:
        if e.model_path and (e.group not in latest or (e.step or 0) > (latest[e.group].step or 0)):
            latest[e.group] = e
    out = {}
    for e in latest.values():
        folder = Path(e.model_path)
        if folder.is_dir() and e.model_path not in out:
            out[e.model_path] = folder_hash(folder)
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def md_row(cells: Sequence[str]) -> str:
    """A Markdown pipe-table row; a cell's pipes escaped, its line breaks made spaces."""
    return "| " + " | ".join(md_escape(str(c)) for c in cells) + " |"


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
