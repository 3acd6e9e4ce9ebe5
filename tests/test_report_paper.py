"""The paper table: measured rows from hand-written summaries, the published block, protocols and comparisons.

Every number is chosen by hand: two seeds give a mean and, for the 95% percentile bootstrap, exactly [min, max]
(see test_report.py), so the expected cells are computed here independently of the report code.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import norm

from soarbench.errors import UserError
from soarbench.report import parse_formats, write_report
from soarbench.report.collect import collect
from soarbench.report.paper import build_paper_table
from soarbench.report.published import PAPER_METRICS, load_published
from soarbench.report.stats import mde_paired, mde_two_groups

# run -> benchmark -> metric -> value (final step); per-prompt scores are value + OFFSETS
FINAL = {
    "base": {"geneval": {"geneval": 0.40}, "ocr": {"ocr": 0.30},
             "drawbench": {"pickscore": 21.50, "clipscore": 0.270, "hpsv2": 0.250, "aesthetic": 5.10,
                           "imagereward": 0.50}},
    "sft-s0": {"geneval": {"geneval": 0.60}, "ocr": {"ocr": 0.50},
               "drawbench": {"pickscore": 22.00, "clipscore": 0.280, "hpsv2": 0.260, "aesthetic": 5.30,
                             "imagereward": 0.70}},
    "sft-s1": {"geneval": {"geneval": 0.64}, "ocr": {"ocr": 0.54},
               "drawbench": {"pickscore": 22.20, "clipscore": 0.284, "hpsv2": 0.262, "aesthetic": 5.20,
                             "imagereward": 0.74}},
    "soar-s0": {"geneval": {"geneval": 0.70}, "ocr": {"ocr": 0.52},
                "drawbench": {"pickscore": 22.40, "clipscore": 0.290, "hpsv2": 0.270, "aesthetic": 5.40,
                              "imagereward": 0.80}},
    "soar-s1": {"geneval": {"geneval": 0.74}, "ocr": {"ocr": 0.50},
                "drawbench": {"pickscore": 22.60, "clipscore": 0.292, "hpsv2": 0.272, "aesthetic": 5.50,
                              "imagereward": 0.90}},
}
OFFSETS = (-0.1, 0.1, 0.0, 0.02)  # same for every model: paired differences are then constant per prompt
STEP = 300
OCR_ENGINE = {"engine": "rapidocr", "engine_version": "3.10.0"}


def _summary(folder: Path, run: str, bench: str, scores: dict[str, float], protocol: str | None,
             step: int) -> None:
    group, method, seed = ("base", "base", 0) if run == "base" else (run.split("-s")[0], run.split("-s")[0],
                                                                      int(run.split("-s")[1]))
    metrics = {}
    for name in scores:
        info = {"name": name, "version": "1", "scale": "x", "higher_is_better": True}
        if protocol is not None:
            info["protocol"] = protocol
        if name == "ocr":
            info.update(OCR_ENGINE)
        metrics[name] = info
    doc = {
        "schema": "soarbench.eval/1",
        "model": {"run_name": run, "group": group, "method": method, "seed": seed, "step": step,
                  "path": str(folder / "ckpt"),
                  "budget_spent": {"fwd_bwd_equiv": 10.0 * step, "fwd_bwd": 8 * step, "images": 0,
                                   "no_grad_fwd": 6 * step, "reward_calls": 0, "optimizer_steps": step}},
        "benchmark": {"name": bench, "n_prompts": 4, "images_per_prompt": 1, "prompt_set_sha256": bench * 4},
        "scores": scores,
        "per_prompt": {k: [v + o for o in OFFSETS] for k, v in scores.items()},
        "metrics": metrics,
        "provenance": {"git_sha": "feedbeef", "resolved_config": {"budget": {"unit": "fwd_bwd_equiv"}}},
    }
    path = folder / "evals" / f"step_{step:06d}" / bench / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc), encoding="utf-8")


def write_paper_experiment(root: Path, geneval_protocol: str | None = "paper") -> Path:
    """Base at step 0; sft and soar, two seeds each, at STEP. GenEval under `geneval_protocol`, the rest with no
    protocol key (official)."""
    for run, benches in FINAL.items():
        step = 0 if run == "base" else STEP
        for bench, scores in benches.items():
            _summary(root / run, run, bench, scores, geneval_protocol if bench == "geneval" else None, step)
        if run != "base":
            (root / run / "run.json").write_text(json.dumps({
                "run_name": run, "group": run.split("-s")[0], "method": run.split("-s")[0], "seed": 0,
                "budget": {"unit": "fwd_bwd_equiv", "amount": 3000}}))
    return root


def _mean(*runs: str, bench: str, metric: str) -> float:
    return sum(FINAL[r][bench][metric] for r in runs) / len(runs)


BENCH_OF = {"geneval": "geneval", "ocr": "ocr"}


@pytest.fixture(scope="module")
def paper_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    exp = write_paper_experiment(root / "exp")
    return exp, write_report([exp], root / "out", title="Paper")


def test_paper_csv_round_trips_to_the_summaries_numbers(paper_report):
    _, paths = paper_report
    frame = pd.read_csv(paths["paper_table_csv"])
    measured = frame[frame["block"] == "measured"].set_index("label")
    assert list(measured.index) == ["base", f"sft@{STEP}", f"soar@{STEP}"]
    for metric in PAPER_METRICS:
        bench = BENCH_OF.get(metric, "drawbench")
        values = {r: FINAL[r][bench][metric] for r in FINAL}
        assert measured.loc["base", metric] == pytest.approx(values["base"])
        assert math.isnan(measured.loc["base", f"{metric}_lo"])  # one seed: no interval
        for group in ("sft", "soar"):
            row = measured.loc[f"{group}@{STEP}"]
            pair = [values[f"{group}-s0"], values[f"{group}-s1"]]
            assert row[metric] == pytest.approx(sum(pair) / 2)
            assert (row[f"{metric}_lo"], row[f"{metric}_hi"]) == (pytest.approx(min(pair)), pytest.approx(max(pair)))
    assert measured.loc[f"soar@{STEP}", "n_seeds"] == 2
    assert measured.loc[f"soar@{STEP}", "budget_fwd_bwd_equiv"] == pytest.approx(10.0 * STEP)
    assert measured.loc[f"soar@{STEP}", "no_grad_fwd"] == pytest.approx(6 * STEP)
    assert set(measured["geneval_protocol"]) == {"paper"} and set(measured["ocr_protocol"]) == {"official"}


def test_published_rows_are_their_own_labelled_block_with_sources(paper_report):
    _, paths = paper_report
    frame = pd.read_csv(paths["paper_table_csv"])
    published = frame[frame["block"] == "published"].set_index("label")
    rows = load_published()
    assert list(published.index) == [r.model for r in rows]
    # every measured row comes first, then the published block: never interleaved
    assert list(frame["block"]) == ["measured"] * 3 + ["published"] * len(rows)
    soar = published.loc["SD3.5-M + SOAR"]
    # only GenEval ran under the published rows' protocol ('paper') here: the official columns stay empty for them
    assert soar["geneval"] == 0.78 and pd.isna(soar["ocr"]) and pd.isna(soar["pickscore"])
    assert "arXiv 2604.12617" in soar["source"] and set(published["geneval_protocol"]) == {"paper"}
    assert "arXiv 2505.05470" in published.loc["SD3.5-M + Flow-GRPO (per-task models)", "source"]
    assert published.loc["SD3.5-M + DiffusionNFT", "geneval"] == 0.98
    md = paths["markdown"].read_text(encoding="utf-8")
    block = md.split("**published (papers' numbers, 'paper' protocol)**", 1)[1].split("\n- ", 1)[0]
    assert "| SD3.5-M + SOAR | 10k |  | 0.780 |  |  |  |  |  |  |\n" in block
    assert f"sft@{STEP}" not in block  # no measured row in the published block


def test_headers_show_protocol_direction_and_ocr_engine(paper_report):
    _, paths = paper_report
    md = paths["markdown"].read_text(encoding="utf-8")
    measured = md.split("**measured (this report)**", 1)[1].split("**published", 1)[0]
    header = measured.strip().splitlines()[0]
    assert "GenEval ↑ (paper)" in header
    assert "OCR ↑ (official, rapidocr-3.10.0)" in header
    for title in ("PickScore", "ClipScore", "HPSv2.1", "Aesthetic", "ImgRwd"):
        assert f"{title} ↑ (official)" in header
    assert "budget (fwd_bwd_equiv)" in header
    tex = paths["latex"].read_text(encoding="utf-8")
    assert r"GenEval $\uparrow$ (paper)" in tex and r"OCR $\uparrow$ (official, rapidocr-3.10.0)" in tex


def test_latex_has_the_numbers_and_bolds_the_best(paper_report):
    _, paths = paper_report
    tex = paths["latex"].read_text(encoding="utf-8")
    assert r"\toprule" in tex and r"\bottomrule" in tex
    soar_line = next(line for line in tex.splitlines() if f"soar@{STEP}" in line)
    # soar's geneval 0.72 [0.70, 0.74] is the best measured; ocr: sft 0.52 beats soar 0.51
    assert r"\textbf{0.720} {\scriptsize [0.700, 0.740]}" in soar_line
    assert r"0.510 {\scriptsize [0.500, 0.520]}" in soar_line and r"\textbf{0.510}" not in soar_line
    sft_line = next(line for line in tex.splitlines() if f"sft@{STEP}" in line)
    assert r"\textbf{0.520} {\scriptsize [0.500, 0.540]}" in sft_line
    assert r"\textbf{22.50}" in soar_line  # pickscore (22.4 + 22.6) / 2, two decimals
    # the blocks are the first index level: 3 measured rows, then every published row
    assert r"\multirow[t]{3}{*}{measured}" in tex
    assert rf"\multirow[t]{{{len(load_published())}}}{{*}}{{published}}" in tex
    assert tex.index(f"soar@{STEP}") < tex.index("published}") < tex.index(r"SD3.5-M + SOAR & 10k")


def test_published_row_is_compared_only_under_the_same_protocol(paper_report):
    exp, paths = paper_report
    frame = pd.read_csv(paths["comparisons_csv"])
    published = frame[frame["kind"] == "published"]
    soar = published[(published["label"] == f"soar@{STEP}") & (published["against"] == "SD3.5-M + SOAR")]
    by_metric = soar.set_index("metric")
    # GenEval ran under "paper": compared, measured minus published
    assert bool(by_metric.loc["geneval", "compared"])
    assert by_metric.loc["geneval", "diff"] == pytest.approx(0.72 - 0.78)
    # every other metric ran under "official": listed, not compared, no difference
    for metric in ("ocr", "pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward"):
        assert not bool(by_metric.loc[metric, "compared"])
        assert math.isnan(by_metric.loc[metric, "diff"])
        assert by_metric.loc[metric, "reason"] == \
            "not compared: measured under protocol 'official', published under 'paper'"
    # a row of another method is never paired with soar's published row, nor a model family of its own ("other")
    assert set(published[published["against"] == "SD3.5-M + SOAR"]["label"]) == {f"soar@{STEP}"}
    assert "FLUX.1-Dev" not in set(published["against"])
    # printed, the metrics not compared for one reason share a line
    md = paths["markdown"].read_text(encoding="utf-8")
    assert (f"| ocr, pickscore, clipscore, hpsv2, aesthetic, imagereward | soar@{STEP} | SD3.5-M + SOAR |"
            in md)
    assert f"| geneval | soar@{STEP} | SD3.5-M + SOAR | -0.060 |" in md


def test_all_official_report_compares_no_published_row(tmp_path):
    exp = write_paper_experiment(tmp_path / "exp", geneval_protocol=None)
    table = build_paper_table(collect([exp]))
    published = [c for c in table.comparisons if c.kind == "published"]
    assert published and not any(c.compared for c in published)
    assert "GenEval ↑ (official)" == table.columns[0].header
    # nor shows one: no measured column ran under the published rows' protocol, so none stands beside them
    assert table.published == ()
    assert any(n.startswith("Published values are shown only beside measured values of the same benchmark and "
                            "protocol; none qualifies here: GenEval (measured under protocol 'official', published "
                            "under 'paper')") for n in table.notes)


def test_published_rows_stay_out_of_another_benchmarks_column(tmp_path):
    """A shapes report's GenEval (measured on the shapes world) never sits beside the papers' SD3.5 GenEval."""
    for run, value in (("base", 0.30), ("sft-s0", 0.35)):
        _summary(tmp_path / "exp" / run, run, "shapes", {"geneval": value}, "paper", 0 if run == "base" else STEP)
    table = build_paper_table(collect([tmp_path / "exp"]))
    assert [r.label for r in table.measured] == ["base", f"sft@{STEP}"] and table.published == ()
    assert table.columns[0].header == "GenEval ↑ (paper, on shapes)"
    assert any("none qualifies here: GenEval (measured on shapes, published on geneval)" in n for n in table.notes)
    assert not any(n.startswith("Published: ") for n in table.notes)
    assert not [c for c in table.comparisons if c.kind == "published"]  # not even listed as "not compared"


def test_paired_comparisons_state_their_mde(paper_report):
    _, paths = paper_report
    frame = pd.read_csv(paths["comparisons_csv"])
    row = frame[(frame["kind"] == "paired") & (frame["metric"] == "geneval") & (frame["label"] == f"soar@{STEP}")]
    row = row.iloc[0]
    assert row["against"] == f"sft@{STEP}"
    assert row["diff"] == pytest.approx(0.72 - 0.62)
    # per-prompt differences are constant (same offsets): no spread, MDE 0
    assert row["mde_prompts"] == pytest.approx(0.0, abs=1e-12)
    # seeds: soar (0.70, 0.74), sft (0.60, 0.64): s^2 = 0.0008 each, n = 2 each
    z = norm.ppf(0.975) + norm.ppf(0.8)
    assert row["mde_seeds"] == pytest.approx(z * math.sqrt(0.0008 / 2 + 0.0008 / 2))
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "MDE of soar vs sft" not in md or "80% power" in md
    assert "### Comparisons" in md


def test_mde_closed_forms():
    z = norm.ppf(0.975) + norm.ppf(0.8)
    diffs = [1.0, 2.0, 3.0, 4.0]
    sd = math.sqrt(sum((d - 2.5) ** 2 for d in diffs) / 3)
    assert mde_paired(diffs) == pytest.approx(z * sd / 2)
    assert mde_two_groups([1.0, 3.0], None) == pytest.approx(z * math.sqrt(2.0) / math.sqrt(2))
    assert mde_two_groups([1.0, 3.0], [0.0, 4.0, 2.0]) == pytest.approx(z * math.sqrt(2.0 / 2 + 4.0 / 3))
    assert math.isnan(mde_two_groups([1.0], [2.0, 3.0])) and math.isnan(mde_paired([0.5]))


def test_formats_select_the_outputs(tmp_path):
    exp = write_paper_experiment(tmp_path / "exp")
    paths = write_report([exp], tmp_path / "out", formats=["tex", "csv"])
    assert set(paths) == {"latex", "paper_table_csv", "comparisons_csv", "main_table_csv", "final_table_csv"}
    assert not (tmp_path / "out" / "index.html").exists() and not (tmp_path / "out" / "figures").exists()
    assert parse_formats("html, md") == ["html", "md"]
    with pytest.raises(UserError, match=r"unknown format 'texx' .*did you mean 'tex'"):
        parse_formats("html,texx")


def test_cli_report_format_option(tmp_path, cli):
    exp = write_paper_experiment(tmp_path / "exp")
    code, out, err = cli("report", str(exp), "--out", str(tmp_path / "out"), "--format", "md")
    assert code == 0, err
    assert "markdown\t" in out and not (tmp_path / "out" / "paper_table.csv").exists()
    code, out, err = cli("report", str(exp), "--out", str(tmp_path / "out"), "--format", "pdf")
    assert code == 2 and "unknown format 'pdf'" in err


def test_malformed_published_file_names_row_and_field(tmp_path):
    path = tmp_path / "published.toml"
    path.write_text('[sources.a]\ncitation = "x"\n[[rows]]\nsource = "a"\nmodel = "m"\nmethod = "sft"\n'
                    'scores = { genevall = 0.5 }\n')
    with pytest.raises(UserError, match=re.escape(f"{path}: rows[0]: unknown metric 'genevall'")):
        load_published(path)
    path.write_text('[sources.a]\ncitation = "x"\n[[rows]]\nsource = "b"\nmodel = "m"\nmethod = "sft"\n'
                    'scores = { geneval = 0.5 }\n')
    with pytest.raises(UserError, match=re.escape(f"{path}: rows[0]: unknown source 'b'")):
        load_published(path)


def test_benchmark_tables_lead_with_the_matched_budget_unit(paper_report):
    _, paths = paper_report
    frame = pd.read_csv(paths["final_table_csv"])
    budget = [c for c in frame.columns if c in ("fwd_bwd_equiv", "fwd_bwd", "images")]
    assert budget == ["fwd_bwd_equiv", "fwd_bwd", "images"]
    soar = frame[(frame["benchmark"] == "geneval") & (frame["label"] == f"soar@{STEP}")].iloc[0]
    assert (soar["fwd_bwd_equiv"], soar["fwd_bwd"]) == (10.0 * STEP, 8 * STEP)
    assert "budget (fwd_bwd_equiv)" in paths["markdown"].read_text(encoding="utf-8")


def test_mixed_protocols_are_marked_and_never_compared(tmp_path):
    exp = write_paper_experiment(tmp_path / "exp")  # GenEval under "paper" ...
    summary = exp / "sft-s1" / "evals" / f"step_{STEP:06d}" / "geneval" / "summary.json"
    doc = json.loads(summary.read_text())
    del doc["metrics"]["geneval"]["protocol"]  # ... except one sft seed: official
    summary.write_text(json.dumps(doc))
    table = build_paper_table(collect([exp]))
    assert table.columns[0].header == "GenEval ↑ (mixed)"
    rows = {r.label: r for r in table.measured}
    assert rows[f"sft@{STEP}"].protocols["geneval"] == "mixed"
    assert rows[f"soar@{STEP}"].protocols["geneval"] == "paper"
    geneval = {(c.label, c.against): c for c in table.comparisons if c.kind == "published" and c.metric == "geneval"}
    assert not geneval[(f"sft@{STEP}", "SD3.5-M + SFT")].compared
    assert geneval[(f"soar@{STEP}", "SD3.5-M + SOAR")].compared
    assert any("'mixed'" in note for note in table.notes)
