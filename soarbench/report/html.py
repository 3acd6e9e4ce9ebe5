"""index.html: one self-contained page with every table and figure of the report; nothing is fetched.

Figures (figures.py, drawn with matplotlib) are embedded as PNG data URIs; their PNG and SVG files also sit in the
report's figures/ folder. Order: warnings, the paper table (measured and published blocks), the comparisons with
their minimum detectable differences, then per benchmark its tables and figures, then the reward-hacking panels,
image grids and training signals, then provenance and notes on the statistics.
"""
from __future__ import annotations

import base64
from html import escape
from typing import Sequence

from soarbench.report.collect import ReportData
from soarbench.report.figures import ReportFigure
from soarbench.report.paper import PaperTable
from soarbench.report.paper_render import comparisons_html, paper_html
from soarbench.report.tables import STATS_NOTES, BenchmarkTables, Table, cell_parts, provenance_items

WIDE_FIGURE_PX = 660  # half of the page's 1,352 px column, less the gap
WIDE = ' class="wide"'
# Figure kinds shown inside a benchmark's section (the others get sections of their own)
BENCHMARK_KINDS = ("curves", "geneval_tasks", "distribution")
OWN_SECTIONS = (("reward_hacking", "Reward hacking: every metric while training on a reward"),
                ("grid", "Image grids"), ("signals", "Training signals"))


def render_html(title: str, data: ReportData, benchmarks: Sequence[BenchmarkTables], paper: PaperTable,
                figures: Sequence[ReportFigure], pngs: dict[str, bytes] | None = None) -> str:
    """The whole page. `pngs` (figure name -> PNG bytes) avoids drawing a figure twice when already saved."""
    pngs = pngs if pngs is not None else {f.name: f.png() for f in figures}
    sections = []
    if data.warnings:  # first, where they cannot be missed: they say what not to trust below
        items = "".join(f"<li>{escape(w)}</li>" for w in data.warnings)
        sections.append(f'<div class="warnings"><strong>Warnings</strong><ul>{items}</ul></div>')
    sections.append(_paper_section(paper))
    for index, bench in enumerate(benchmarks):
        mine = [f for f in figures if f.kind in BENCHMARK_KINDS and f.benchmark == bench.benchmark]
        sections.append(_benchmark_section(bench, mine, pngs, anchor=f"bench-{index}"))
    if data.probes:
        sections.append(_probe_section(data.probes))
    for kind, heading in OWN_SECTIONS:
        mine = [f for f in figures if f.kind == kind]
        if mine:
            sections.append(_section(heading, kind, [_figure_grid(mine, pngs)]))
    if not benchmarks and not figures:
        sections.append("<p>No evaluations or training logs found.</p>")
    sections.append(_provenance_section(data))
    sections.append(_notes_section())
    return _PAGE.format(title=escape(title), css=_CSS, body="\n".join(sections))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------------------------------------
# Page parts


def _section(title: str, anchor: str, parts: Sequence[str]) -> str:
    return f'<section id="{anchor}">\n<h2>{escape(title)}</h2>\n' + "\n".join(parts) + "\n</section>"


def _provenance_section(data: ReportData) -> str:
    rows = "".join(f"<dt>{escape(label)}</dt><dd>{escape(text)}</dd>" for label, text in provenance_items(data))
    return f'<section id="provenance" class="provenance">\n<h2>Provenance</h2>\n<dl>{rows}</dl>\n</section>'


def _paper_section(paper: PaperTable) -> str:
    notes = "".join(f'<p class="muted">{escape(n)}</p>' for n in paper.notes)
    parts = [paper_html(paper), notes]
    if paper.comparisons:
        parts += ["<h3>Comparisons (Δ = model − vs; MDE at 80% power, two-sided α = 0.05)</h3>",
                  comparisons_html(paper)]
    return _section("Main table (as in the SOAR paper)", "paper", parts)


def _benchmark_section(bench: BenchmarkTables, figures: Sequence[ReportFigure], pngs, anchor: str) -> str:
    parts = []
    if bench.description:
        parts.append(f'<p class="muted">{escape(bench.description)}; main metric: {escape(bench.main_metric)}.</p>')
    if bench.controls:
        parts.append(_controls_block(bench.controls))
    parts.append(_table_block(bench.final))
    parts += [_table_block(view) for view in bench.views]
    if bench.tasks is not None:
        parts.append(_table_block(bench.tasks))
    if figures:
        parts.append("<h3>Figures</h3>")
        parts.append(_figure_grid(figures, pngs))
    parts.append(_table_block(bench.main, stacked=True))
    return _section(f"Benchmark: {bench.benchmark}", anchor, parts)


def _probe_section(probes) -> str:
    """The exposure-bias probe (report/probes.py): its tables, then its notes."""
    from soarbench.report.probes import probe_notes, probe_tables

    parts = []
    for title, header, rows in probe_tables(probes):
        head = "".join(f"<th>{escape(c)}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        parts.append(f'<h3>{escape(title)}</h3><div class="table-wrap"><table class="data"><tr>{head}</tr>{body}'
                     "</table></div>")
    parts.append("<ul>" + "".join(f"<li>{escape(n)}</li>" for n in probe_notes(probes)) + "</ul>")
    return _section("Exposure-bias probe", "probe", parts)


def _controls_block(results) -> str:
    """The experiment's controls (report/controls.py): a failed one is shown in red, first in the section."""
    head = "".join(f"<th>{t}</th>" for t in ("control", "group", "check", "finding", "verdict"))
    rows = "".join(
        f'<tr><td class="label">{escape(r.kind)}</td><td>{escape(r.group)}</td><td>{escape(r.check)}</td>'
        f'<td>{escape(r.finding)}</td><td class="verdict-{escape(r.verdict.split()[0].lower())}">{escape(r.verdict)}'
        "</td></tr>" for r in results)
    return (f'<h3>Controls</h3><div class="table-wrap"><table class="data controls"><tr>{head}</tr>{rows}'
            "</table></div>")


def _table_block(table: Table, stacked: bool = False) -> str:
    """A table in a box that scrolls sideways when wider than the page; `stacked` puts each interval under its
    value (narrower columns, for the table of every checkpoint). Headers may break after a '/'."""
    head = "".join(f"<th>{escape(t).replace('/', '/<wbr>')}</th>"
                   for t in ("model", "seeds", *(c.title for c in table.columns)))
    body = []
    for row in table.rows:
        cells = [f'<td class="label">{escape(row.label)}</td>', f"<td>{row.n_seeds}</td>"]
        for column in table.columns:
            value, interval = cell_parts(row.cells.get(column.key), column)
            ci = f' <span class="ci">{escape(interval)}</span>' if interval else ""
            cells.append(f"<td>{escape(value)}{ci}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f'<p class="muted">{escape(note)}</p>' for note in table.notes)
    kind = "data stacked" if stacked else "data"
    return (f"<h3>{escape(table.title)}</h3>\n<div class=\"table-wrap\"><table class=\"{kind}\">"
            f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>{notes}")


def _figure_grid(figures: Sequence[ReportFigure], pngs) -> str:
    # a figure wider than half the page spans the whole page, so that it is shown near its own size and its text
    # stays as large as it was drawn; narrower ones sit two abreast
    items = "\n".join(
        f'<figure id="fig-{escape(f.name)}"{WIDE if f.width_px > WIDE_FIGURE_PX else ""}>'
        f'<img src="{data_uri(pngs[f.name])}" alt="{escape(f.title)}" width="{f.width_px}">'
        f"<figcaption>{escape(f.caption)} <span class=\"muted\">(figures/{escape(f.name)}.png, .svg)</span>"
        "</figcaption></figure>"
        for f in figures
    )
    return f'<div class="figures">\n{items}\n</div>'


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
.provenance dd { margin: 0; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px;
                 word-break: break-all; }
.table-wrap { overflow-x: auto; max-width: 100%; }  /* a wide table scrolls in its own box, not the page */
table.data { border-collapse: collapse; font-variant-numeric: tabular-nums; background: #fff; }
table.data th, table.data td { padding: 4px 10px; border-bottom: 1px solid #e6e6e6; text-align: right;
                               white-space: nowrap; }
table.data th { background: #f0f0f0; font-weight: 600; }
table.data thead th { white-space: normal; min-width: 48px; vertical-align: bottom; }
table.data.stacked .ci { display: block; font-size: 11px; }
table.data th:first-child, table.data td.label { text-align: left; }
table.controls td, table.controls th { white-space: normal; text-align: left; min-width: 90px; }  /* long findings wrap */
td.verdict-failed { color: #b00020; font-weight: bold; }
td.verdict-passed { color: #1b5e20; }
table.paper tr.block th { text-align: left; background: #e8eef6; font-style: italic; }
table.paper tr.block-published th { background: #f6efe4; }
table.paper tr.row-published td { color: #5a4a32; }
table.comparisons tr.not-compared td { color: #888; }
table.comparisons td:nth-child(-n+3), table.comparisons td:last-child { text-align: left; }
table.paper { font-size: 13px; }
table.paper th, table.paper td { padding: 4px 7px; vertical-align: top; }
table.paper thead th { vertical-align: bottom; }
table.paper td.label { white-space: normal; min-width: 130px; }
table.paper td:last-child { white-space: normal; min-width: 150px; max-width: 190px; text-align: left; }
table.paper .ci { display: block; font-size: 11px; }  /* interval under its value: narrower columns */
.proto { font-weight: 400; font-size: 11px; color: #555; }
.ci { color: #777; font-size: 12px; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 16px; }
figure.wide { grid-column: 1 / -1; }
figure { min-width: 0; margin: 0; padding: 8px; background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; }
figure img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 12px; color: #444; margin-top: 4px; }
.warnings { background: #fff4e5; border-left: 4px solid #e69f00; padding: 8px 12px; }
""".strip()
