"""`soarbench report`: turn run, eval and experiment folders into the paper's table, tables and figures.

    from soarbench.report import write_report
    paths = write_report([Path("runs/exp1")], Path("reports/exp1"))                 # every format
    paths = write_report([Path("runs/exp1")], Path("reports/exp1"), formats=["csv", "tex"])

Outputs in `out_dir`, by format:
- csv: paper_table.csv (the SOAR paper's main table: measured rows, then the published block), comparisons.csv
  (every comparison with its minimum detectable difference), main_table.csv (every checkpoint of every
  benchmark), final_table.csv (each group's last checkpoint, with the paired test against the "sft" group, then each
  budget view's final table, its rows named in the "view" column);
- md: report.md (all tables and notes, and image links to figures/ when html is written too);
  tex: paper_table.tex (booktabs; needs booktabs and multirow);
- html: index.html, one self-contained page with every table and figure (PNG data URIs), and figures/NAME.png
  and figures/NAME.svg for each figure (figures.py lists them).
Tables are built with pandas and figures with matplotlib (Agg). Every file is written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from soarbench.errors import UserError, did_you_mean
from soarbench.io import atomic_write_text
from soarbench.report.collect import ReportData, collect
from soarbench.report.markdown import markdown_report
from soarbench.report.tables import build_tables, tables_csv

__all__ = ["DEFAULT_TITLE", "FORMATS", "OUTPUT_FILES", "ReportData", "collect", "parse_formats", "write_report"]

DEFAULT_TITLE = "soarbench report"
FORMATS = ("html", "csv", "md", "tex")
FIGURES_DIR = "figures"

# write_report's return keys -> file names in the output folder, and the format that writes each
OUTPUT_FILES = {
    "paper_table_csv": "paper_table.csv",
    "comparisons_csv": "comparisons.csv",
    "main_table_csv": "main_table.csv",
    "final_table_csv": "final_table.csv",
    "markdown": "report.md",
    "latex": "paper_table.tex",
    "html": "index.html",
}
FORMAT_OF = {"paper_table_csv": "csv", "comparisons_csv": "csv", "main_table_csv": "csv", "final_table_csv": "csv",
             "markdown": "md", "latex": "tex", "html": "html"}


def parse_formats(text: str) -> list[str]:
    """"html,csv" -> ["html", "csv"]; an unknown name is a UserError listing the valid ones."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError(f"--format '{text}': expected a comma-separated list of {', '.join(FORMATS)}")
    for name in names:
        if name not in FORMATS:
            raise UserError(f"--format: {did_you_mean('format', name, FORMATS)}")
    return list(dict.fromkeys(names))


def write_report(run_dirs: Iterable[Path | str], out_dir: Path | str, title: str = DEFAULT_TITLE,
                 formats: Sequence[str] = FORMATS) -> dict[str, Path]:
    """Collect every evaluation and training log under `run_dirs` and write the report into `out_dir`.

    Raises UserError when an argument holds nothing to report or a file in it is malformed; nothing is written
    then. Returns the paths of the files written, keyed as in OUTPUT_FILES (the figures go to out_dir/figures/).
    """
    from soarbench.report.html import render_html
    from soarbench.report.paper import build_paper_table
    from soarbench.report.paper_render import comparisons_frame, paper_csv, paper_latex

    formats = parse_formats(",".join(formats))
    data = collect(run_dirs)
    benchmarks = build_tables(data)
    paper = build_paper_table(data)
    out = Path(out_dir)
    figures, pngs = _figures(data, out) if "html" in formats else ([], {})
    makers = {
        "paper_table_csv": lambda: paper_csv(paper),
        "comparisons_csv": lambda: comparisons_frame(paper).to_csv(index=False, float_format="%.12g",
                                                                   lineterminator="\n"),
        "main_table_csv": lambda: tables_csv([b.main for b in benchmarks]),
        "final_table_csv": lambda: tables_csv([t for b in benchmarks for t in (b.final, *b.views)],
                                              view_column=True),
        "markdown": lambda: markdown_report(title, data, benchmarks, paper,
                                            [(f"{FIGURES_DIR}/{f.name}.png", f.title) for f in figures]),
        "latex": lambda: paper_latex(paper),
        "html": lambda: render_html(title, data, benchmarks, paper, figures, pngs),
    }
    contents = {key: make() for key, make in makers.items() if FORMAT_OF[key] in formats}
    paths = {key: out / OUTPUT_FILES[key] for key in contents}
    for key, text in contents.items():
        atomic_write_text(paths[key], text)
    return paths


def _figures(data: ReportData, out: Path) -> tuple[list, dict[str, bytes]]:
    """Draw every figure once: its PNG and SVG into out/figures/; returns the figures and their PNG bytes."""
    from soarbench.report.figures import build_figures

    figures = build_figures(data)
    pngs = {}
    for figure in figures:
        png, _ = figure.save(out / FIGURES_DIR)
        pngs[figure.name] = png.read_bytes()
    return figures, pngs


# `soarbench.report(...)` is the API function (soarbench/api.py); this module, once imported, must not shadow it
__import__("soarbench.api").api.callable_module(__name__)
