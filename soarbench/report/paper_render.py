"""The paper table (paper.py) as a pandas DataFrame, and from it as CSV, Markdown, LaTeX and an HTML table.

CSV keeps the numbers unrounded (one row per measured or published row; `block` says which; `METRIC`,
`METRIC_lo`, `METRIC_hi` and `METRIC_protocol` per metric; the budget in the matched unit and the raw counters).
The display forms round each metric to its paper's decimals, bold the best value of each block, and print the
protocol in every metric's header. Markdown is written from the DataFrame directly (pandas' to_markdown needs the
optional `tabulate`); LaTeX comes from pandas' Styler (booktabs rules, one \\multirow per block).
"""
from __future__ import annotations

import math
from html import escape

import pandas as pd

from soarbench.report.paper import MEASURED, PUBLISHED, Comparison, PaperColumn, PaperRow, PaperTable
from soarbench.report.tables import Cell, md_row

BLOCK_TITLES = {MEASURED: "measured (this report)", PUBLISHED: "published (papers' numbers, 'paper' protocol)"}


# ---------------------------------------------------------------------------------------------------------------
# Numbers (CSV)


def paper_frame(table: PaperTable) -> pd.DataFrame:
    """One row per table row with unrounded numbers; NaN where a value is absent."""
    records = []
    for row in (*table.measured, *table.published):
        record = {"block": row.block, "label": row.label, "method": row.method,
                  "step": row.step if row.step is not None else math.nan, "n_seeds": row.n_seeds or math.nan,
                  "iters": row.iters}
        for column in table.columns:
            cell = row.cells.get(column.metric)
            record[column.metric] = _value(cell)
            record[f"{column.metric}_lo"] = _value(cell, "lo")
            record[f"{column.metric}_hi"] = _value(cell, "hi")
            record[f"{column.metric}_protocol"] = row.protocols.get(column.metric, "")
        if table.budget_unit:
            record[f"budget_{table.budget_unit}"] = _value(row.budget)
        for name in table.counters:
            record[name] = _value(row.counters.get(name))
        record["source"] = row.citation
        records.append(record)
    return pd.DataFrame.from_records(records)


def comparisons_frame(table: PaperTable) -> pd.DataFrame:
    columns = ["metric", "kind", "label", "against", "compared", "diff", "lo", "hi", "p_value", "mde_prompts",
               "mde_seeds", "reason"]
    return pd.DataFrame([[getattr(c, name) for name in columns] for c in table.comparisons], columns=columns)


def paper_csv(table: PaperTable) -> str:
    return paper_frame(table).to_csv(index=False, float_format="%.12g", lineterminator="\n")


def _value(cell: Cell | None, part: str = "value") -> float:
    value = getattr(cell, part) if cell is not None else None
    return math.nan if value is None else float(value)


# ---------------------------------------------------------------------------------------------------------------
# Display (Markdown, LaTeX, HTML share these strings)


def format_value(cell: Cell | None, column: PaperColumn) -> tuple[str, str]:
    """("0.612", "[0.580, 0.640]") or ("", "") for a blank cell."""
    if cell is None or not math.isfinite(cell.value):
        return "", ""
    d = column.decimals
    interval = f"[{cell.lo:.{d}f}, {cell.hi:.{d}f}]" if cell.has_interval else ""
    return f"{cell.value:.{d}f}", interval


COUNTER_LABELS = {"optimizer_steps": "steps", "images": "images", "fwd_bwd": "fwd+bwd", "no_grad_fwd": "no-grad fwd",
                  "reward_calls": "reward calls"}


def budget_text(row: PaperRow, table: PaperTable) -> str:
    """The budget in the matched unit, then the raw counters: "592 (steps 37, images 0, fwd+bwd 592, ...)"."""
    if row.budget is None or not math.isfinite(row.budget.value):
        return ""
    raw = ", ".join(f"{COUNTER_LABELS.get(name, name)} {_count(cell.value)}" for name in table.counters
                    if (cell := row.counters.get(name)) is not None and math.isfinite(cell.value))
    return f"{_count(row.budget.value)}" + (f" ({raw})" if raw else "")


def _count(value: float) -> str:
    return f"{value:,.0f}" if abs(value - round(value)) < 1e-6 else f"{value:,.1f}"


def budget_header(table: PaperTable) -> str:
    return f"budget ({table.budget_unit})" if table.budget_unit else "budget"


def display_rows(table: PaperTable, bold: tuple[str, str], ci: tuple[str, str] = ("", ""),
                 text=lambda s: s) -> list[tuple[str, list[str]]]:
    """(block, cells) per row: model, iters or step, seeds, one cell per metric (best wrapped in `bold`), budget."""
    out = []
    for row in (*table.measured, *table.published):
        cells = [text(row.label), text(row.iters if row.block == PUBLISHED else _step(row)),
                 str(row.n_seeds) if row.n_seeds else ""]
        for column in table.columns:
            value, interval = format_value(row.cells.get(column.metric), column)
            if value and table.is_best(row, column.metric):
                value = f"{bold[0]}{value}{bold[1]}"
            cells.append(value + (f" {ci[0]}{text(interval)}{ci[1]}" if interval else ""))
        budget = budget_text(row, table) if row.block == MEASURED else ""
        if " (" in budget and ci != ("", ""):  # raw counters in the interval's (smaller) style
            value, raw = budget.split(" (", 1)
            budget = f"{text(value)} {ci[0]}{text('(' + raw)}{ci[1]}"
        else:
            budget = text(budget)
        cells.append(budget)
        out.append((row.block, cells))
    return out


def _step(row: PaperRow) -> str:
    return "" if row.step is None else str(row.step)


def display_headers(table: PaperTable, block: str = MEASURED) -> list[str]:
    """The measured block's headers name each column's measured protocol; the published block's say "paper"."""
    if block == PUBLISHED:
        metrics = [f"{c.title} {c.arrow} (paper)" for c in table.columns]
    else:
        metrics = [c.header for c in table.columns]
    return ["model", "#iter / step", "seeds", *metrics, budget_header(table)]


def paper_markdown(table: PaperTable) -> str:
    """Two pipe tables, measured then published, each under its block's label, then the notes."""
    rows = display_rows(table, bold=("**", "**"))
    out = []
    for block in (MEASURED, PUBLISHED):
        members = [cells for b, cells in rows if b == block]
        if not members:
            continue
        keep = slice(None) if block == MEASURED else slice(0, -1)  # published rows have no budget here
        out += [f"**{BLOCK_TITLES[block]}**", "", md_row(display_headers(table, block)[keep]),
                md_row([":--", "--:", "--:", *("--:" for _ in table.columns), "--:"][keep])]
        out += [md_row(cells[keep]) for cells in members] + [""]
    out += [f"- {note}" for note in table.notes]
    return "\n".join(out)


COMPARISON_HEADERS = ["metric", "model", "vs", "Δ", "95% CI", "p", "MDE (prompts)", "MDE (seeds)", "note"]


def display_comparisons(table: PaperTable) -> list[Comparison]:
    """The comparisons as printed: the pairs that were not compared for the same reason share one line, their
    metrics listed together (comparisons.csv keeps one line per metric)."""
    out: list[Comparison] = []
    merged: dict[tuple[str, str, str], int] = {}
    for c in table.comparisons:
        if c.compared:
            out.append(c)
            continue
        key = (c.label, c.against, c.reason)
        if key in merged:
            first = out[merged[key]]
            out[merged[key]] = Comparison(f"{first.metric}, {c.metric}", c.label, c.against, c.kind, False,
                                          reason=c.reason)
        else:
            merged[key] = len(out)
            out.append(c)
    return out


def comparisons_markdown(table: PaperTable) -> str:
    lines = [md_row(COMPARISON_HEADERS), md_row([":--", ":--", ":--", "--:", "--:", "--:", "--:", "--:", ":--"])]
    lines += [md_row(comparison_cells(c)) for c in display_comparisons(table)]
    return "\n".join(lines)


def comparison_cells(c: Comparison) -> list[str]:
    def num(v: float, sign: str = "") -> str:
        return f"{v:{sign}.3f}" if math.isfinite(v) else ""
    ci = f"[{num(c.lo, '+')}, {num(c.hi, '+')}]" if math.isfinite(c.lo) else ""
    p = "" if not math.isfinite(c.p_value) else ("<0.001" if c.p_value < 0.001 else f"{c.p_value:.3f}")
    note = c.reason or ("published value is a fixed number; MDE from the measured side only"
                        if c.kind == PUBLISHED else "paired over prompts")
    return [c.metric, c.label, c.against, num(c.diff, "+"), ci, p, num(c.mde_prompts), num(c.mde_seeds), note]


# ---------------------------------------------------------------------------------------------------------------
# LaTeX

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "↑": r"$\uparrow$", "↓": r"$\downarrow$", "Δ": r"$\Delta$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def paper_latex(table: PaperTable) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs, multirow}); blocks are the first index level."""
    headers = [latex_escape(h) for h in display_headers(table)]
    rows = display_rows(table, bold=(r"\textbf{", "}"), ci=(r"{\scriptsize ", "}"), text=latex_escape)
    index = pd.MultiIndex.from_tuples([(BLOCK_TITLES[b].split(" ")[0], cells[0]) for b, cells in rows],
                                      names=[None, None])
    frame = pd.DataFrame([cells[1:] for _, cells in rows], index=index, columns=headers[1:])
    styler = frame.style
    latex = styler.to_latex(hrules=True, multirow_align="t", column_format="ll" + "r" * (len(headers) - 1))
    caption = ("% soarbench paper table: measured rows, then published ones (not measured here). "
               "Bold: best of its block. Protocol in each header.\n")
    return caption + latex


# ---------------------------------------------------------------------------------------------------------------
# HTML


def paper_html(table: PaperTable) -> str:
    """One table: a header row per block (the published one says its protocol), metric headers on two lines."""
    first = display_headers(table)
    metric_heads = [f'{escape(f"{c.title} {c.arrow}")}<br><span class="proto">{escape(" · ".join(c.qualifiers))}'
                    "</span>" for c in table.columns]
    headers = "".join(f"<th>{h}</th>" for h in [escape(first[0]), escape(first[1]), escape(first[2]), *metric_heads,
                                                 escape(first[-1])])
    rows = display_rows(table, bold=("\x00b", "\x00/b"), ci=("\x00ci", "\x00/ci"))
    body, current = [], None
    width = len(display_headers(table))
    for block, cells in rows:
        if block != current:
            current = block
            title = escape(BLOCK_TITLES[block])
            body.append(f'<tr class="block block-{block}"><th colspan="{width}">{title}</th></tr>')
        tds = [f'<td class="label">{escape(cells[0])}</td>'] + [f"<td>{_html_cell(c)}</td>" for c in cells[1:]]
        body.append(f'<tr class="row-{block}">' + "".join(tds) + "</tr>")
    return (f'<div class="table-wrap"><table class="data paper" id="paper-table"><thead><tr>{headers}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _html_cell(text: str) -> str:
    # markers placed by display_rows, turned into tags after escaping the text around them
    out = escape(text)
    for marker, tag in (("\x00b", "<strong>"), ("\x00/b", "</strong>"), ("\x00ci", '<span class="ci">'),
                        ("\x00/ci", "</span>")):
        out = out.replace(escape(marker), tag)
    return out


def comparisons_html(table: PaperTable) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in COMPARISON_HEADERS)
    body = "".join(
        f'<tr class="{"compared" if c.compared else "not-compared"}">'
        + "".join(f"<td>{escape(x)}</td>" for x in comparison_cells(c)) + "</tr>"
        for c in display_comparisons(table)
    )
    return (f'<div class="table-wrap"><table class="data comparisons" id="comparisons"><thead><tr>{head}</tr>'
            f"</thead><tbody>{body}</tbody></table></div>")
