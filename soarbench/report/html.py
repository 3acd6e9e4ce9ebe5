"""index.html: one self-contained page (inline CSS and SVG; nothing fetched) with the tables and the curves.

Curves per benchmark: the main metric and each GenEval task, once against the training step and once against
the compute spent; each group is one line (the mean over seeds, with a shaded bootstrap band from two seeds on)
and the base model a dashed horizontal line. Then the training loss of every run, one chart each (methods'
losses are different quantities on different scales, so they are not overlaid).
"""
from __future__ import annotations

import math
from html import escape
from typing import Callable, Mapping, Sequence

import numpy as np

from soarbench.report.collect import BASE_METHOD, EvalSummary, ReportData, TrainLog
from soarbench.report.svg import Chart, HLine, Series, render_chart
from soarbench.report.tables import (
    GENEVAL_METRIC,
    GENEVAL_TASKS,
    STATS_NOTES,
    BenchmarkTables,
    Cell,
    Checkpoint,
    Table,
    cell_parts,
    checkpoints,
    group_sort_key,
    main_metric,
    provenance_items,
)

# Okabe-Ito colours (distinguishable with colour-blindness), without the yellow that vanishes on white.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
BASE_COLOR = "#6b6b6b"

# The compute axis prefers the budget counter that weighs every pass by its cost, when all runs record it.
BUDGET_AXES = (
    ("fwd_bwd_equiv", "compute spent (forward+backward equivalents)"),
    ("fwd_bwd", "compute spent (forward+backward passes)"),
)

LOSS_SMOOTHING_POINTS_PER_SPAN = 20  # EMA span = points / 20: light smoothing, 1 (none) below 40 points
LOSS_MAX_SPAN = 50
ROBUST_RANGE_MIN_POINTS = 200  # from this many points, the y range leaves out the 1% extremes at each end
RAW_LOSS_OPACITY = 0.3


def render_html(title: str, data: ReportData, benchmarks: Sequence[BenchmarkTables]) -> str:
    """The whole page."""
    colors = group_colors(data)
    sections = [_provenance_section(data)]
    if data.warnings:  # first, where they cannot be missed: they say what not to trust below
        items = "".join(f"<li>{escape(w)}</li>" for w in data.warnings)
        sections.append(f'<div class="warnings"><strong>Warnings</strong><ul>{items}</ul></div>')
    for index, bench in enumerate(benchmarks):
        evals = data.evals_for(bench.benchmark)
        charts = score_charts(evals, data.group_methods, colors, id_prefix=f"b{index}")
        sections.append(_benchmark_section(bench, charts, anchor=f"bench-{index}"))
    losses = loss_charts(data.train_logs, colors)
    if losses:
        sections.append(_section("Training loss", "training-loss", [_chart_grid(losses)]))
    if not benchmarks and not losses:
        sections.append("<p>No evaluations or training logs found.</p>")
    sections.append(_notes_section())
    return _PAGE.format(title=escape(title), css=_CSS, body="\n".join(sections))


# ---------------------------------------------------------------------------------------------------------------
# Colours


def group_colors(data: ReportData) -> dict[str, str]:
    """One colour per group, the same in every chart; base models in grey."""
    colors: dict[str, str] = {}
    n_trained = 0
    for group, method in sorted(data.group_methods.items(), key=lambda gm: group_sort_key(*gm)):
        if method == BASE_METHOD:
            colors[group] = BASE_COLOR
        else:
            colors[group] = PALETTE[n_trained % len(PALETTE)]
            n_trained += 1
    return colors


# ---------------------------------------------------------------------------------------------------------------
# Score curves


def curve_keys(evals: Sequence[EvalSummary]) -> list[str]:
    """The score keys that get curves: the benchmark's main metric, then each GenEval task present."""
    present = {k for e in evals for k in e.scores}
    main = main_metric(evals)
    tasks = [f"{GENEVAL_METRIC}/{t}" for t in GENEVAL_TASKS]
    return [main] + [k for k in tasks if k in present and k != main]


def score_charts(
    evals: Sequence[EvalSummary], group_methods: Mapping[str, str], colors: Mapping[str, str], id_prefix: str
) -> list[Chart]:
    """Per curve key, a chart against step and one against compute; none for a key no trained model has.

    The base model, and any model evaluated on its own, is a dashed horizontal line in each: it has no training
    step or budget to place it on the x axis.
    """
    cps = checkpoints(evals, group_methods)
    trained = [cp for cp in cps if not cp.is_reference]
    references = [cp for cp in cps if cp.is_reference]
    if not trained:
        return []
    benchmark = evals[0].benchmark
    counter, budget_label = _budget_axis(trained)
    charts: list[Chart] = []
    for key in curve_keys(evals):
        if all(cp.score(key) is None for cp in trained):
            continue
        hlines = _reference_lines(references, key, colors)
        by_step = _group_series(trained, key, lambda cp: cp.step, colors)
        by_budget = _group_series(trained, key, lambda cp: _cell_value(cp.budget(counter)), colors)
        charts.append(Chart(
            chart_id=f"{id_prefix}-c{len(charts)}", title=f"{benchmark}: {key} vs step", x_label="training step",
            y_label=key, series=by_step, hlines=hlines, x_integer=True,
        ))
        if by_budget:  # summaries without budget_spent give no compute axis
            charts.append(Chart(
                chart_id=f"{id_prefix}-c{len(charts)}", title=f"{benchmark}: {key} vs compute", x_label=budget_label,
                y_label=key, series=by_budget, hlines=hlines,
            ))
    return charts


def _budget_axis(trained: Sequence[Checkpoint]) -> tuple[str, str]:
    for counter, label in BUDGET_AXES:
        if all(counter in e.budget for cp in trained for e in cp.evals):
            return counter, label
    return BUDGET_AXES[-1]


def _reference_lines(references: Sequence[Checkpoint], key: str, colors: Mapping[str, str]) -> list[HLine]:
    lines = []
    for cp in references:
        cell = cp.score(key)
        if cell is not None:
            lines.append(HLine(cp.group, colors.get(cp.group, BASE_COLOR), cell.value))
    return lines


def _group_series(
    cps: Sequence[Checkpoint], key: str, x_of: Callable[[Checkpoint], float | None], colors: Mapping[str, str]
) -> list[Series]:
    """One series per group: its checkpoints' mean scores, with the seed interval as a band where there is one."""
    by_group: dict[str, list[Checkpoint]] = {}
    for cp in cps:
        by_group.setdefault(cp.group, []).append(cp)
    series = []
    for group, members in by_group.items():
        points = sorted(
            ((x, cell) for cp in members if (x := x_of(cp)) is not None and (cell := cp.score(key)) is not None),
            key=lambda point: point[0],
        )
        if not points:
            continue
        seeds = max(cp.n_seeds for cp in members)
        cells = [cell for _, cell in points]
        with_band = any(cell.has_interval for cell in cells)
        series.append(Series(
            name=group if seeds == 1 else f"{group} ({seeds} seeds)",
            color=colors.get(group, PALETTE[0]),
            x=[x for x, _ in points],
            y=[cell.value for cell in cells],
            lo=[_or_nan(cell.lo) for cell in cells] if with_band else None,
            hi=[_or_nan(cell.hi) for cell in cells] if with_band else None,
        ))
    return series


def _cell_value(cell: Cell | None) -> float | None:
    return None if cell is None else cell.value


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


# ---------------------------------------------------------------------------------------------------------------
# Loss curves


def loss_charts(logs: Sequence[TrainLog], colors: Mapping[str, str]) -> list[Chart]:
    """One chart per run with a finite loss, ordered like the tables (by group, then run name)."""
    charts: list[Chart] = []
    for log in sorted(logs, key=lambda lg: (group_sort_key(lg.group, lg.method), lg.run_name)):
        chart = _loss_chart(log, colors.get(log.group, PALETTE[0]), chart_id=f"loss-c{len(charts)}")
        if chart is not None:
            charts.append(chart)
    return charts


def _loss_chart(log: TrainLog, color: str, chart_id: str) -> Chart | None:
    """The raw loss as a faint line under a lightly smoothed one; just the raw loss when too short to smooth."""
    raw = np.asarray(log.losses, dtype=float)
    if not np.isfinite(raw).any():
        return None
    span = smoothing_span(raw.size)
    if span == 1:
        series = [Series("loss", color, log.steps, log.losses, markers=False)]
        y_range = None
    else:
        series = [
            Series("loss (raw)", color, log.steps, log.losses, width=1.0, opacity=RAW_LOSS_OPACITY, markers=False),
            Series(f"loss (EMA, span {span})", color, log.steps, ema(raw, span).tolist(), markers=False),
        ]
        y_range = _loss_range(raw)
    return Chart(
        chart_id=chart_id, title=f"{log.run_name} ({log.group}): training loss", x_label="optimizer step",
        y_label="loss", series=series, y_range=y_range, x_integer=True,
    )


def smoothing_span(n_points: int) -> int:
    return max(1, min(LOSS_MAX_SPAN, n_points // LOSS_SMOOTHING_POINTS_PER_SPAN))


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with weight 2 / (span + 1), bias-corrected so that it starts at the data.

    A NaN (a step whose loss was not finite) stays NaN in the output and leaves the average untouched.
    """
    alpha = 2.0 / (span + 1)
    out = np.full(values.shape, math.nan)
    average = weight = 0.0
    for i, value in enumerate(values):
        if not math.isfinite(value):
            continue
        average = (1 - alpha) * average + alpha * value
        weight = (1 - alpha) * weight + alpha
        out[i] = average / weight
    return out


def _loss_range(raw: np.ndarray) -> tuple[float, float] | None:
    """With many steps, the y range spans the middle 98% of raw losses: a few spikes (and the EMA's echo of
    them) are clipped instead of squashing the rest of the curve flat. None (fit to all data) for short logs."""
    finite = raw[np.isfinite(raw)]
    if finite.size < ROBUST_RANGE_MIN_POINTS:
        return None
    lo, hi = np.quantile(finite, [0.01, 0.99])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------------------
# Page parts


def _section(title: str, anchor: str, parts: Sequence[str]) -> str:
    return f'<section id="{anchor}">\n<h2>{escape(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def _provenance_section(data: ReportData) -> str:
    rows = "".join(f"<dt>{escape(label)}</dt><dd>{escape(text)}</dd>" for label, text in provenance_items(data))
    return f'<section id="provenance" class="provenance">\n<dl>{rows}</dl>\n</section>'


def _benchmark_section(bench: BenchmarkTables, charts: Sequence[Chart], anchor: str) -> str:
    parts = []
    if bench.description:
        parts.append(f'<p class="muted">{escape(bench.description)}; main metric: {escape(bench.main_metric)}.</p>')
    parts.append(_table_block(bench.final))
    if bench.tasks is not None:
        parts.append(_table_block(bench.tasks))
    if charts:
        parts.append("<h3>Curves</h3>")
        parts.append(_chart_grid(charts))
    parts.append(_table_block(bench.main))
    return _section(f"Benchmark: {bench.benchmark}", anchor, parts)


def _table_block(table: Table) -> str:
    head = "".join(f"<th>{escape(t)}</th>" for t in ("model", "seeds", *(c.title for c in table.columns)))
    body = []
    for row in table.rows:
        cells = [f'<td class="label">{escape(row.label)}</td>', f"<td>{row.n_seeds}</td>"]
        for column in table.columns:
            value, interval = cell_parts(row.cells.get(column.key), column)
            ci = f' <span class="ci">{escape(interval)}</span>' if interval else ""
            cells.append(f"<td>{escape(value)}{ci}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f'<p class="muted">{escape(note)}</p>' for note in table.notes)
    return (f"<h3>{escape(table.title)}</h3>\n<div class=\"table-wrap\"><table class=\"data\">"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{notes}")


def _chart_grid(charts: Sequence[Chart]) -> str:
    figures = "\n".join(f"<figure>{render_chart(chart)}</figure>" for chart in charts)
    return f'<div class="charts">\n{figures}\n</div>'


def _notes_section() -> str:
    items = "".join(f"<li>{escape(note)}</li>" for note in STATS_NOTES)
    return _section("Notes", "notes", [f"<ul>{items}</ul>"])


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1b1b1b;
       max-width: 1400px; margin: 0 auto; padding: 24px; background: #fafafa; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 20px 0 6px; }
.muted { color: #666; margin: 4px 0; }
.provenance dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
.provenance dt { color: #666; }
.provenance dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
.table-wrap { overflow-x: auto; }
table.data { border-collapse: collapse; font-variant-numeric: tabular-nums; background: #fff; }
table.data th, table.data td { padding: 4px 10px; border-bottom: 1px solid #e6e6e6; text-align: right;
                               white-space: nowrap; }
table.data th { background: #f0f0f0; font-weight: 600; }
table.data th:first-child, table.data td.label { text-align: left; }
.ci { color: #777; font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 16px; }
figure { margin: 0; padding: 8px; background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; }
figure svg { display: block; width: 100%; height: auto; }
.warnings { background: #fff4e5; border-left: 4px solid #e69f00; padding: 8px 12px; }
""".strip()
