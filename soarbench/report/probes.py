"""The exposure-bias probe in the report: one table of each probed model's error per starting sigma.

`soarbench run` writes OUT/probes/LABEL/probe.json when the experiment has an [experiment.probe] table
(soarbench/experiment.py); `soarbench probe --out DIR` writes DIR/probe.json. The report reads every probe.json
under its arguments and labels it by its folder's name. What the probe measures: soarbench/probes/exposure.py.

Per starting sigma s: the MSE to z0 of the model's own sampler started on the data's path at s (mean over pairs,
with 1.96 standard errors), and the GenEval accuracy of the decoded results when the data carry GenEval rows.
Rows of the same data, seed and sampler are paired (the same pairs and noises): each model's difference to the
base is printed with its paired 95% interval and minimum detectable difference (soarbench.probes.exposure.
compare_probes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from soarbench.errors import UserError

SCHEMA_PREFIX = "soarbench.probe.exposure/"


@dataclass(frozen=True)
class Probe:
    label: str
    path: Path
    doc: dict[str, Any]

    def rows(self, guidance: float) -> dict[float, dict[str, Any]]:
        return {float(r["sigma"]): r for r in self.doc["rows"] if float(r["guidance"]) == guidance}


def read_probes(paths: Iterable[Path | str]) -> tuple[Probe, ...]:
    """Every probe.json under the report's arguments, labelled by its folder, base first, then by label."""
    found: dict[Path, Probe] = {}
    for root in map(Path, paths):
        candidates = [root] if root.is_file() else sorted(root.rglob("probe.json")) if root.is_dir() else []
        for path in candidates:
            if path.name != "probe.json" or path.resolve() in found:
                continue
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(f"{path}: not a readable probe.json ({e})") from None
            if not str(doc.get("schema", "")).startswith(SCHEMA_PREFIX) or not isinstance(doc.get("rows"), list):
                raise UserError(f"{path}: field 'schema' must start with '{SCHEMA_PREFIX}' and 'rows' be a list")
            found[path.resolve()] = Probe(path.parent.name, path, doc)
    return tuple(sorted(found.values(), key=lambda p: (p.label != "base", p.label)))


def probe_tables(probes: Sequence[Probe]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows): one table per guidance scale, a row per probed model, a column per starting sigma."""
    tables = []
    for guidance in _guidances(probes):
        sigmas = sorted({s for p in probes for s in p.rows(guidance)}, reverse=True)
        header = ["model", *(f"from s = {s:g}" for s in sigmas)]
        rows = [[p.label, *(_cell(p.rows(guidance).get(s)) for s in sigmas)] for p in probes]
        tables.append((f"CFG {guidance:g}: MSE to z0 ± 1.96 SE (GenEval of the decoded results)", header, rows))
    return tables


def probe_notes(probes: Sequence[Probe]) -> list[str]:
    """What the probe ran on, then each model's paired difference to the base."""
    return [f"Data: {_data_line(probes[0])}."] + _differences(probes) if probes else []


def probe_markdown(probes: Sequence[Probe]) -> list[str]:
    out = []
    for title, header, rows in probe_tables(probes):
        out += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    return out + [f"- {note}" for note in probe_notes(probes)] + [""]


def _differences(probes: Sequence[Probe]) -> list[str]:
    from soarbench.probes.exposure import compare_probes

    base = next((p for p in probes if p.label == "base"), None)
    if base is None:
        return []
    lines = []
    for p in probes:
        if p is base:
            continue
        try:
            rows = compare_probes(base.doc, p.doc)
        except UserError as e:  # other data, seed or sampler: not paired
            lines.append(f"{p.label}: not paired with base ({e})")
            continue
        parts = [f"s = {r['sigma']:g}, CFG {r['guidance']:g}: {r['diff_mean']:+.4f} [{r['diff_ci95'][0]:+.4f}, "
                 f"{r['diff_ci95'][1]:+.4f}] (MDE {r['min_detectable_difference']:.4f})" for r in rows]
        lines.append(f"{p.label} minus base, paired over the same pairs (negative: closer to the data), 95% "
                     "interval: " + "; ".join(parts))
    return lines


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    text = f"{row['mse_mean']:.4f} ± {1.96 * row['mse_sem']:.4f}"
    return text + (f" ({row['geneval']:.3f})" if row.get("geneval") is not None else "")


def _guidances(probes: Sequence[Probe]) -> list[float]:
    return sorted({float(r["guidance"]) for p in probes for r in p.doc["rows"]}, reverse=True)


def _data_line(probe: Probe) -> str:
    doc = probe.doc
    data = doc.get("data", {})
    return (f"{doc.get('n_pairs', '?')} held-out pairs of {data.get('jsonl', '?')} (sha256 "
            f"{str(data.get('sha256', ''))[:12]}), seed {doc.get('seed', '?')}, {doc.get('num_steps', '?')}-step grid")
