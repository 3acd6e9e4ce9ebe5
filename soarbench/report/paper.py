"""The SOAR paper's main table, reproduced from measured runs and set beside the published numbers.

    from soarbench.report.collect import collect
    from soarbench.report.paper import build_paper_table
    table = build_paper_table(collect([Path("runs/exp1")]))

Columns: GenEval, OCR, PickScore, ClipScore, HPSv2.1, Aesthetic, ImgRwd, as measured (a metric no summary has is
blank). Each header carries the direction of the metric (higher_is_better), the protocol its scores ran under
("official", or "paper" when an evaluation followed the papers' own protocol; a summary without the key ran the
official one), the benchmark it was read from when that is not the paper's (DrawBench for the preference
metrics), and for OCR the engine. A measured row is each group's last checkpoint: the mean over its seeds with a
95% bootstrap interval from two seeds on. The best measured value of each column is bold.

Published rows (published.toml) form a block of their own, holding only the values that stand beside a measured
column of the same benchmark (the paper's for that metric) and protocol; a row left without one is not shown. One
is compared with a measured row only when both are of the same method and the measured column ran on that
benchmark under the published row's protocol; every other pairing is listed
as not compared, with the reason. Each comparison states its minimum detectable difference (80% power, two-sided
alpha 0.05): from the seeds' spread with two or more seeds, else from the per-prompt scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from soarbench.report.collect import BASE_METHOD, EvalSummary, ReportData, per_prompt_scores
from soarbench.metrics.registry import metric_display
from soarbench.report.published import PAPER_METRICS, PublishedRow, load_published
from soarbench.report.stats import mde_paired, mde_two_groups
from soarbench.report.tables import (
    REFERENCE_GROUP,
    Cell,
    Checkpoint,
    checkpoints,
    final_checkpoints,
    group_sort_key,
    paired_tests,
)

# Each metric's title, decimals and the benchmark the papers read it on are its registry entry's display facts
# (soarbench.metrics.registry.metric_display); a metric measured elsewhere says where in its header.
# Raw budget counters shown beside the matched unit, when the summaries record them.
RAW_COUNTERS = ("optimizer_steps", "images", "fwd_bwd", "no_grad_fwd", "reward_calls")
MEASURED, PUBLISHED = "measured", "published"
MIXED = "mixed"


@dataclass(frozen=True)
class PaperColumn:
    metric: str
    title: str
    higher_is_better: bool = True
    protocol: str | None = None  # None: not measured; "mixed" when summaries disagree
    benchmark: str | None = None  # where the measured values come from
    engine: str | None = None  # OCR's engine and version

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"

    @property
    def qualifiers(self) -> list[str]:
        """What the header says under the title: protocol, then benchmark (when not the paper's), then engine."""
        parts = [self.protocol or "not measured"]
        if self.benchmark and self.benchmark != _paper_benchmark(self.metric):
            parts.append(f"on {self.benchmark}")
        if self.engine:
            parts.append(self.engine)
        return parts

    @property
    def header(self) -> str:
        """E.g. "GenEval ↑ (official)", "OCR ↑ (official, rapidocr-3.10.0)"."""
        return f"{self.title} {self.arrow} ({', '.join(self.qualifiers)})"

    @property
    def decimals(self) -> int:
        return metric_display(self.metric).decimals


@dataclass(frozen=True)
class PaperRow:
    block: str  # MEASURED or PUBLISHED
    label: str
    group: str
    method: str
    cells: Mapping[str, Cell | None]
    protocols: Mapping[str, str]  # metric -> protocol of this row's value
    n_seeds: int = 0
    step: int | None = None
    iters: str = ""
    citation: str = ""
    note: str = ""
    budget: Cell | None = None  # spent in the experiment's matched unit
    counters: Mapping[str, Cell | None] = field(default_factory=dict)
    per_seed: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # metric -> one value per seed
    per_prompt: Mapping[str, np.ndarray] = field(default_factory=dict)  # metric -> seeds' mean per prompt
    strata: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # metric -> prompts' strata (GenEval tasks)


@dataclass(frozen=True)
class Comparison:
    """One comparison the report prints: `label` minus `against` on `metric`."""

    metric: str
    label: str
    against: str
    kind: str  # "paired" (per prompt, measured vs measured) or "published"
    compared: bool
    diff: float = math.nan
    lo: float = math.nan
    hi: float = math.nan
    p_value: float = math.nan
    mde_prompts: float = math.nan  # from the per-prompt paired differences (or per-prompt scores vs published)
    mde_seeds: float = math.nan  # from the per-seed spread
    reason: str = ""


@dataclass(frozen=True)
class PaperTable:
    columns: tuple[PaperColumn, ...]
    measured: tuple[PaperRow, ...]
    published: tuple[PaperRow, ...]
    best: Mapping[tuple[str, str], frozenset[str]]  # (block, metric) -> labels holding the best value
    comparisons: tuple[Comparison, ...]
    budget_unit: str | None
    counters: tuple[str, ...]
    notes: tuple[str, ...]

    def is_best(self, row: PaperRow, metric: str) -> bool:
        return row.label in self.best.get((row.block, metric), frozenset())


def build_paper_table(data: ReportData, published: Sequence[PublishedRow] | None = None,
                      reference_group: str = REFERENCE_GROUP) -> PaperTable:
    published = load_published() if published is None else published
    finals = {metric: _finals(data, metric) for metric in PAPER_METRICS}
    columns = tuple(_column(metric, finals[metric]) for metric in PAPER_METRICS)
    unit = data.budget_unit()
    measured = _measured_rows(data, finals, columns, unit)
    counters = tuple(c for c in RAW_COUNTERS if any(r.counters.get(c) is not None for r in measured))
    every_pub = tuple(_published_row(p) for p in published)
    pub_rows = _beside_measured(every_pub, columns)
    best = {**_best(measured, columns, MEASURED), **_best(pub_rows, columns, PUBLISHED)}
    reference = _reference(measured, reference_group)
    comparisons = (*_paired_comparisons(finals, columns, reference, measured),
                   *_published_comparisons(measured, every_pub, columns))
    return PaperTable(columns, measured, pub_rows, best, tuple(comparisons), unit, counters,
                      tuple(_notes(columns, pub_rows, comparisons, every_pub)))


def _paper_benchmark(metric: str) -> str:
    return metric_display(metric).paper_benchmark


def _why_not_beside(column: PaperColumn, protocol: str) -> str | None:
    """Why a published value (under `protocol`) does not belong in this measured column, or None when it does:
    it must have been measured on the paper's benchmark for the metric and under the same protocol."""
    if column.benchmark is None:
        return "not measured"
    if column.benchmark != _paper_benchmark(column.metric):
        return f"measured on {column.benchmark}, published on {_paper_benchmark(column.metric)}"
    if column.protocol != protocol:
        return f"measured under protocol '{column.protocol}', published under '{protocol}'"
    return None


def _beside_measured(published: Sequence[PaperRow], columns: Sequence[PaperColumn]) -> tuple[PaperRow, ...]:
    """The published rows cut to the columns whose measured values they can stand beside (same benchmark, same
    protocol); a row left without a value is dropped. A shapes-world GenEval never sits beside SD3.5's."""
    out = []
    for row in published:
        cells = {m: c for m, c in row.cells.items()
                 if (col := next((k for k in columns if k.metric == m), None)) is not None
                 and _why_not_beside(col, row.protocols[m]) is None}
        if cells:
            out.append(PaperRow(block=row.block, label=row.label, group=row.group, method=row.method, cells=cells,
                                protocols={m: row.protocols[m] for m in cells}, iters=row.iters,
                                citation=row.citation, note=row.note))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------
# Measured rows


def _finals(data: ReportData, metric: str) -> tuple[str | None, list[Checkpoint]]:
    """(benchmark, each group's last checkpoint with a `metric` score) from the benchmark the paper reads it on,
    else the first benchmark that measured it."""
    benches = [b for b in data.benchmarks() if any(metric in e.scores for e in data.evals_for(b))]
    if not benches:
        return None, []
    preferred = _paper_benchmark(metric)
    bench = preferred if preferred in benches else benches[0]
    evals = [e for e in data.evals_for(bench) if metric in e.scores]
    cps = checkpoints(evals, data.group_methods)
    return bench, final_checkpoints(cps, metric)


def _column(metric: str, finals: tuple[str | None, list[Checkpoint]]) -> PaperColumn:
    bench, cps = finals
    evals = [e for cp in cps for e in cp.evals]
    if not evals:
        return PaperColumn(metric, metric_display(metric).title)
    higher = next((h for e in evals if isinstance(h := _info(e, metric).get("higher_is_better"), bool)), True)
    return PaperColumn(metric, metric_display(metric).title, higher, _protocol(evals, metric), bench,
                       _engine(evals) if metric == "ocr" else None)


def _info(e: EvalSummary, metric: str) -> Mapping:
    """The summary's metrics.METRIC block, or {} when it has none (or not an object)."""
    info = e.metrics.get(metric)
    return info if isinstance(info, Mapping) else {}


def _protocol(evals: Sequence[EvalSummary], metric: str) -> str:
    """The one protocol of these evaluations, or "mixed"."""
    protocols = {e.protocol(metric) for e in evals}
    return protocols.pop() if len(protocols) == 1 else MIXED


def _engine(evals: Sequence[EvalSummary]) -> str | None:
    """OCR's engine: the summary's engine and engine_version, else the engine part of the metric's version."""
    names = set()
    for e in evals:
        info = _info(e, "ocr")
        if info.get("engine"):
            names.add(f"{info['engine']}-{info['engine_version']}" if info.get("engine_version") else info["engine"])
        elif isinstance(info.get("version"), str) and info["version"].count("/") >= 1:
            names.add(info["version"].split("/")[1])
    return " / ".join(sorted(names)) or None


def _measured_rows(data: ReportData, finals: Mapping[str, tuple[str | None, list[Checkpoint]]],
                   columns: Sequence[PaperColumn], unit: str | None) -> tuple[PaperRow, ...]:
    by_group: dict[str, dict[str, Checkpoint]] = {}
    for metric, (_, cps) in finals.items():
        for cp in cps:
            by_group.setdefault(cp.group, {})[metric] = cp
    rows = []
    for group in sorted(by_group, key=lambda g: group_sort_key(g, data.group_methods.get(g, ""))):
        cps = by_group[group]
        first = cps[next(c.metric for c in columns if c.metric in cps)]
        prompts = {m: pp for m, cp in cps.items() if (pp := per_prompt_scores(cp, m)) is not None}
        rows.append(PaperRow(
            block=MEASURED, label=first.label, group=group, method=first.method,
            cells={c.metric: cps[c.metric].score(c.metric) if c.metric in cps else None for c in columns},
            protocols={m: _protocol(cp.evals, m) for m, cp in cps.items()},
            n_seeds=max(cp.n_seeds for cp in cps.values()), step=first.step,
            budget=first.budget(unit) if unit else None,
            counters={name: first.budget(name) for name in RAW_COUNTERS},
            per_seed={m: tuple(v for e in cp.evals if math.isfinite(v := e.scores.get(m, math.nan)))
                      for m, cp in cps.items()},
            per_prompt={m: pp.scores for m, pp in prompts.items()},
            strata={m: pp.strata for m, pp in prompts.items() if pp.strata is not None},
        ))
    return tuple(rows)


def _published_row(p: PublishedRow) -> PaperRow:
    return PaperRow(block=PUBLISHED, label=p.model, group=p.model, method=p.method,
                    cells={m: Cell(v) for m, v in p.scores.items()}, protocols={m: p.protocol for m in p.scores},
                    iters=p.iters, citation=p.citation, note=p.note)


def _best(rows: Sequence[PaperRow], columns: Sequence[PaperColumn], block: str) -> dict:
    best = {}
    for column in columns:
        values = {r.label: cell.value for r in rows if (cell := r.cells.get(column.metric)) is not None
                  and math.isfinite(cell.value)}
        if len(values) < 2:  # one value is no contest
            continue
        # compared as printed, so that two cells that read the same are both bold
        shown = {label: round(v, column.decimals) for label, v in values.items()}
        target = max(shown.values()) if column.higher_is_better else min(shown.values())
        best[(block, column.metric)] = frozenset(label for label, v in shown.items() if v == target)
    return best


# ---------------------------------------------------------------------------------------------------------------
# Comparisons


def _reference(measured: Sequence[PaperRow], reference_group: str) -> str | None:
    groups = {r.group for r in measured}
    if reference_group in groups:
        return reference_group
    return BASE_METHOD if BASE_METHOD in groups else None


def _paired_comparisons(finals, columns, reference: str | None, measured) -> list[Comparison]:
    """Every group against the reference group on each measured metric: paired over prompts, MDE beside it."""
    if reference is None:
        return []
    rows = {r.group: r for r in measured}
    out = []
    for column in columns:
        _, cps = finals[column.metric]
        tests, _ = paired_tests(cps, column.metric, reference)
        ref_row = rows[reference]
        for group, test in tests.items():
            row = rows[group]
            diffs = row.per_prompt[column.metric] - ref_row.per_prompt[column.metric]
            ref_seeds = ref_row.per_seed.get(column.metric, ())
            out.append(Comparison(
                column.metric, row.label, ref_row.label, "paired", True, test.diff, test.lo, test.hi,
                test.p_value, mde_paired(diffs, strata=row.strata.get(column.metric)),
                mde_two_groups(row.per_seed.get(column.metric, ()), ref_seeds) if ref_seeds else math.nan,
            ))
    return out


def _published_comparisons(measured, published, columns) -> list[Comparison]:
    """A measured row against the published rows of its method, metric by metric, only under the same protocol."""
    out = []
    for row in measured:
        for pub in published:
            if pub.method != row.method or pub.method == "other":
                continue
            for column in columns:
                cell, pub_cell = row.cells.get(column.metric), pub.cells.get(column.metric)
                if cell is None or pub_cell is None:
                    continue
                mine, theirs = row.protocols.get(column.metric, ""), pub.protocols[column.metric]
                if column.benchmark != _paper_benchmark(column.metric):
                    continue  # another benchmark altogether: not even listed (the table's notes say why)
                if mine != theirs:
                    out.append(Comparison(column.metric, row.label, pub.label, PUBLISHED, False, reason=(
                        f"not compared: measured under protocol '{mine}', published under '{theirs}'")))
                    continue
                seeds = row.per_seed.get(column.metric, ())
                prompts = row.per_prompt.get(column.metric)
                out.append(Comparison(
                    column.metric, row.label, pub.label, PUBLISHED, True, diff=cell.value - pub_cell.value,
                    mde_prompts=mde_paired(prompts, strata=row.strata.get(column.metric))
                    if prompts is not None else math.nan,
                    mde_seeds=mde_two_groups(seeds, None) if len(seeds) >= 2 else math.nan,
                ))
    return out


def _notes(columns, published, comparisons, every_published=()) -> list[str]:
    notes = [
        "Measured rows: each group's last checkpoint; with two or more seeds the mean over seeds and a 95% bootstrap "
        "interval. Bold: the best value of a column within its block (measured and published are ranked apart).",
        "Published rows are the papers' numbers, not measured here; they ran under the 'paper' protocol. A published "
        "row is compared only with a measured row of the same method whose column ran under the same protocol; "
        "measured columns under another protocol ('official') are listed as not compared.",
        "MDE: the minimum detectable difference of a comparison at 80% power, two-sided alpha 0.05 (normal "
        "approximation): 2.80 x sd / sqrt(n), from the per-prompt paired differences (prompts) or the seeds' spread "
        "(seeds, sqrt(s_a^2/n_a + s_b^2/n_b)). A difference smaller than its MDE is not evidence either way.",
    ]
    hidden = {}
    for row in every_published:
        for metric in row.cells:
            column = next((k for k in columns if k.metric == metric), None)
            if column is not None and column.benchmark is not None and (
                    why := _why_not_beside(column, row.protocols[metric])):
                hidden.setdefault(column.title, why)
    if hidden:
        which = "; ".join(f"{title} ({why})" for title, why in hidden.items())
        lead = "Published values are shown only beside measured values of the same benchmark and protocol; " + (
            "none qualifies here" if not published else "left out here")
        notes.append(f"{lead}: {which}.")
    for citation in dict.fromkeys(p.citation for p in published):
        rows = [p for p in published if p.citation == citation]
        note = f" ({rows[0].note})" if rows[0].note else ""
        notes.append(f"Published: {', '.join(p.label for p in rows)}: {citation}{note}.")
    if any(c.protocol == MIXED for c in columns):
        notes.append("A column marked 'mixed' holds values measured under different protocols.")
    return notes
