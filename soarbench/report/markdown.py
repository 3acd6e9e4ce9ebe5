"""report.md: provenance, the paper table and its comparisons, each benchmark's controls and tables, the
exposure-bias probe, the figures, the notes on the statistics and any warnings (report/html.py renders the same
content as one HTML file)."""
from __future__ import annotations

from typing import Sequence

from soarbench.report.collect import ReportData
from soarbench.report.controls import controls_markdown
from soarbench.report.paper_render import comparisons_markdown, paper_markdown
from soarbench.report.probes import probe_markdown
from soarbench.report.tables import STATS_NOTES, BenchmarkTables, md_escape, provenance_items, table_markdown


def markdown_report(title: str, data: ReportData, benchmarks: Sequence[BenchmarkTables], paper=None,
                    figures: Sequence[tuple[str, str]] = ()) -> str:
    """report.md: provenance, the paper table (paper.PaperTable) and its comparisons, then each benchmark's tables,
    the figures (relative path, title) as image links, notes on the statistics and any warnings."""
    out = [f"# {title}", "", *_md_provenance(data), ""]
    if paper is not None:
        out += ["## Main table (as in the SOAR paper)", "", paper_markdown(paper), ""]
        if paper.comparisons:
            out += ["### Comparisons (Δ = model − vs; MDE at 80% power, two-sided alpha 0.05)", "",
                    comparisons_markdown(paper), ""]
    if not benchmarks:
        out += ["No evaluations found (no summary.json).", ""]
    for bench in benchmarks:
        out += [f"## Benchmark: {bench.benchmark}", ""]
        if bench.description:
            out += [f"{bench.description}; main metric: {bench.main_metric}.", ""]
        if bench.controls:
            out += ["### Controls", "", *controls_markdown(bench.controls), ""]
        for table in (bench.final, *bench.views, bench.tasks, bench.main):
            if table is None:
                continue
            out += [f"### {table.title}", "", table_markdown(table), ""]
            out += [f"- {note}" for note in table.notes] + ([""] if table.notes else [])
    if data.probes:
        out += ["## Exposure-bias probe", "", *probe_markdown(data.probes)]
    if figures:
        out += ["## Figures", "", *(f"![{md_escape(name)}]({path})" for path, name in figures), ""]
    out += ["## Notes", "", *(f"- {note}" for note in STATS_NOTES), ""]
    if data.warnings:
        out += ["## Warnings", "", *(f"- {md_escape(w)}" for w in data.warnings), ""]
    return "\n".join(out)


def _md_provenance(data: ReportData) -> list[str]:
    return [f"- {label}: {md_escape(text)}" for label, text in provenance_items(data)]
