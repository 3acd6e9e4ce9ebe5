"""Published reference rows (published.toml beside this file): the papers' own numbers, with their sources.

    from soarbench.report.published import load_published
    rows = load_published()            # or load_published(Path("my_rows.toml")) in the same layout

Every row carries its protocol ("paper": measured by the authors under the papers' evaluation protocol) and the
citation of its source. The report prints them in a block of their own, labelled "published", and compares one
with a measured row only when both are of the same method and the measured column ran under the same protocol.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from soarbench.errors import UserError, did_you_mean

PUBLISHED_FILE = Path(__file__).with_name("published.toml")
PAPER_PROTOCOL = "paper"
# The metrics of the SOAR paper's main table, in its column order (also the report's paper-table columns).
PAPER_METRICS = ("geneval", "ocr", "pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward")


@dataclass(frozen=True)
class PublishedRow:
    model: str
    method: str  # the soarbench method it corresponds to; "base" untrained, "other" for another model family
    iters: str
    scores: Mapping[str, float]  # metric name (PAPER_METRICS) -> published value
    source: str  # key of its [sources.NAME] table
    citation: str
    note: str
    protocol: str = PAPER_PROTOCOL


def load_published(path: Path | str = PUBLISHED_FILE) -> list[PublishedRow]:
    """Parse and validate a published-rows file; any malformed field is a UserError naming file, row and field."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    sources = doc.get("sources", {})
    if not isinstance(sources, dict):
        raise UserError(f"{path}: 'sources' must be a table of [sources.NAME] tables")
    rows = doc.get("rows", [])
    if not isinstance(rows, list):
        raise UserError(f"{path}: 'rows' must be an array of [[rows]] tables")
    return [_row(path, i, row, sources) for i, row in enumerate(rows)]


def _row(path: Path, index: int, row: Any, sources: Mapping[str, Any]) -> PublishedRow:
    where = f"{path}: rows[{index}]"
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a table, got {type(row).__name__}")
    for key in ("source", "model", "method"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise UserError(f"{where}: field '{key}' must be a non-empty string, got {row.get(key)!r}")
    if row["source"] not in sources:
        raise UserError(f"{where}: {did_you_mean('source', row['source'], sources)}")
    source = sources[row["source"]]
    if not isinstance(source, dict) or not isinstance(source.get("citation"), str) or not source["citation"]:
        raise UserError(f"{path}: sources.{row['source']}: field 'citation' must be a non-empty string")
    scores = row.get("scores")
    if not isinstance(scores, dict) or not scores:
        raise UserError(f"{where}: field 'scores' must be a non-empty table of metric = number")
    for metric, value in scores.items():
        if metric not in PAPER_METRICS:
            raise UserError(f"{where}: {did_you_mean('metric', metric, PAPER_METRICS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: scores.{metric} must be a number, got {value!r}")
    return PublishedRow(
        model=row["model"],
        method=row["method"],
        iters=str(row.get("iters", "")),
        scores={m: float(scores[m]) for m in PAPER_METRICS if m in scores},
        source=row["source"],
        citation=source["citation"],
        note=str(source.get("note", "")),
        protocol=str(row.get("protocol", PAPER_PROTOCOL)),
    )
