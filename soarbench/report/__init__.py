"""`soarbench report`: turn run, eval and experiment folders into tables (CSV, Markdown) and one HTML page.

    from soarbench.report import write_report
    paths = write_report([Path("runs/exp1")], Path("reports/exp1"))

Outputs in `out_dir`: main_table.csv (every checkpoint), final_table.csv (each group's last checkpoint, with
the paired test against the "sft" group), report.md (all tables) and index.html (tables and curves, self-
contained). Every file is written atomically, so a reader never sees a half-written one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from soarbench.io import atomic_write_text
from soarbench.report.collect import ReportData, collect
from soarbench.report.html import render_html
from soarbench.report.tables import build_tables, markdown_report, tables_csv

__all__ = ["DEFAULT_TITLE", "OUTPUT_FILES", "ReportData", "collect", "write_report"]

DEFAULT_TITLE = "soarbench report"

# write_report's return keys -> file names in the output folder
OUTPUT_FILES = {
    "main_table_csv": "main_table.csv",
    "final_table_csv": "final_table.csv",
    "markdown": "report.md",
    "html": "index.html",
}


def write_report(run_dirs: Iterable[Path | str], out_dir: Path | str, title: str = DEFAULT_TITLE) -> dict[str, Path]:
    """Collect every evaluation and training log under `run_dirs` and write the report into `out_dir`.

    Raises UserError when an argument holds nothing to report or a file in it is malformed; nothing is written
    then. Returns the paths written, keyed as in OUTPUT_FILES.
    """
    data = collect(run_dirs)
    benchmarks = build_tables(data)
    contents = {
        "main_table_csv": tables_csv([b.main for b in benchmarks]),
        "final_table_csv": tables_csv([b.final for b in benchmarks]),
        "markdown": markdown_report(title, data, benchmarks),
        "html": render_html(title, data, benchmarks),
    }
    out = Path(out_dir)
    paths = {key: out / OUTPUT_FILES[key] for key in contents}
    for key, text in contents.items():
        atomic_write_text(paths[key], text)
    return paths
