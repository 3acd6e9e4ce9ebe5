"""The comparison's controls (soarbench/report/controls.py): a learning-rate-0 run must reproduce the base's images
byte for byte, and a run trained on the reported metric must beat the base with a paired interval above 0."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from soarbench.errors import UserError
from soarbench.experiment import plan_runs, _check_controls
from soarbench.report import write_report
from soarbench.report.stats import mde_paired, paired_bootstrap

N_PROMPTS = 6


def _summary(folder: Path, run: str, group: str, method: str, seed: int, step: int, per_prompt: list[float],
             images: dict[str, bytes]) -> None:
    """One evaluation folder: summary.json with per-prompt GenEval scores, samples.jsonl and the image files."""
    folder.mkdir(parents=True)
    (folder / "images").mkdir()
    rows = []
    for sample_id, data in images.items():
        (folder / "images" / f"{sample_id}.png").write_bytes(data)
        rows.append(json.dumps({"id": sample_id, "file": f"images/{sample_id}.png"}))
    (folder / "samples.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "summary.json").write_text(json.dumps({
        "schema": "soarbench.eval/1", "label": f"{group}@{step}",
        "model": {"path": "x", "run_name": run, "group": group, "method": method, "seed": seed, "step": step},
        "benchmark": {"name": "shapes", "n_prompts": N_PROMPTS, "images_per_prompt": 1, "prompt_set_sha256": "ab" * 32},
        "scores": {"geneval": float(np.mean(per_prompt))}, "per_prompt": {"geneval": per_prompt},
        "metrics": {"geneval": {"scale": "accuracy in [0, 1]", "higher_is_better": True}}}))


BASE_SCORES = [0.0, 0.5, 1.0, 0.5, 0.0, 1.0]


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


BASE_IMAGES = {f"{i:05d}_0": _png(10 * i) for i in range(N_PROMPTS)}


def _experiment(root: Path, negative_images: dict[str, bytes], positive_scores: list[list[float]]) -> Path:
    _summary(root / "base" / "evals" / "step_000000" / "shapes", "base", "base", "base", 0, 0, BASE_SCORES,
             BASE_IMAGES)
    _summary(root / "sft_lr0-s0" / "evals" / "step_000010" / "shapes", "sft_lr0-s0", "sft_lr0", "sft", 0, 10,
             BASE_SCORES, negative_images)
    for seed, scores in enumerate(positive_scores):
        _summary(root / f"grpo-s{seed}" / "evals" / "step_000010" / "shapes", f"grpo-s{seed}", "grpo", "flow_grpo",
                 seed, 10, scores, BASE_IMAGES)
    (root / "experiment.toml").write_text('[experiment]\ncontrols = { negative = "sft_lr0", positive = "grpo" }\n')
    return root


def _controls_section(report_md: str) -> list[str]:
    section = report_md.split("### Controls", 1)[1].split("###", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| negative") or line.startswith("| positive")]


def test_controls_pass_when_the_images_match_and_the_gain_is_clear(tmp_path):
    gain = [[s + 0.2 + 0.01 * i for i, s in enumerate(BASE_SCORES)], [s + 0.3 for s in BASE_SCORES]]
    exp = _experiment(tmp_path / "exp", dict(BASE_IMAGES), gain)
    md = write_report([exp], tmp_path / "out", formats=["md", "html"])["markdown"].read_text()
    negative, positive = _controls_section(md)
    assert "6/6 images byte-identical" in negative and negative.endswith("| passed |")
    # the positive control's numbers are the paired bootstrap of the seed-mean per-prompt scores vs the base
    diffs = np.mean(gain, axis=0) - np.asarray(BASE_SCORES)
    test = paired_bootstrap(np.mean(gain, axis=0), np.asarray(BASE_SCORES))
    assert f"{diffs.mean():+.3f} [{test.lo:+.3f}, {test.hi:+.3f}]" in positive
    assert f"minimum detectable difference {mde_paired(diffs):.3f}" in positive
    assert test.lo > 0 and positive.endswith("| passed |")
    html = (tmp_path / "out" / "index.html").read_text()
    assert "<h3>Controls</h3>" in html and html.count('class="verdict-passed"') == 2
    assert 'class="verdict-failed"' not in html


def test_controls_fail_on_one_changed_byte_and_on_no_gain(tmp_path):
    images = dict(BASE_IMAGES)
    images["00003_0"] = _png(31)  # one image differs
    exp = _experiment(tmp_path / "exp", images, [list(BASE_SCORES), [s + 0.0 for s in BASE_SCORES]])
    md = write_report([exp], tmp_path / "out", formats=["md"])["markdown"].read_text()
    negative, positive = _controls_section(md)
    assert "5/6 images byte-identical" in negative and negative.endswith("| FAILED |")
    assert "+0.000 [+0.000, +0.000]" in positive and positive.endswith("| FAILED |")


def test_a_missing_control_group_is_reported_as_not_run(tmp_path):
    exp = _experiment(tmp_path / "exp", dict(BASE_IMAGES), [list(BASE_SCORES)])
    (exp / "experiment.toml").write_text('[experiment]\ncontrols = { positive = "nope" }\n')
    md = write_report([exp], tmp_path / "out", formats=["md"])["markdown"].read_text()
    (positive,) = _controls_section(md)
    assert "no evaluation of group 'nope' found" in positive and positive.endswith("| not run |")


@pytest.mark.parametrize("controls, message", [
    ('{ negativ = "ctl" }', r"unknown control 'negativ' .*did you mean 'negative'"),
    ('{ positive = "grop" }', r"controls.positive: unknown group 'grop' .*did you mean 'grpo'"),
    ('{ negative = "grpo" }', r"negative control 'grpo' must train with train.lr = 0, got 0.001"),
    ('"ctl"', r"'controls' must be a table"),
])
def test_an_experiment_naming_bad_controls_is_refused_in_one_line(controls, message, tmp_path):
    import tomllib

    exp = tomllib.loads(f'[experiment]\ncontrols = {controls}\n[common.train]\nlr = 0.001\n'
                        '[runs.ctl]\ntrain = { lr = 0.0 }\n[runs.grpo]\nseeds = [0, 1]\n')
    with pytest.raises(UserError, match=message):
        _check_controls(exp["experiment"], plan_runs(exp), Path("compare.toml"))


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_a_learning_rate_0_run_passes_the_negative_control_end_to_end(tiny_model_dir, shapes_data, tmp_path,
                                                                       mixed_precision):
    """The real harness: an experiment with a base evaluation and an SFT run at lr 0; the run's final evaluation
    (after training steps, a checkpoint write and the in-process evaluation) must equal the base's byte for byte,
    and so must its exposure-bias probe (the report's probe section pairs it with the base's: difference 0). Under
    bf16 mixed precision too: the base is evaluated as a run holds it (frozen components in bf16, bf16 sampling)."""
    from soarbench.experiment import run_experiment

    exp = tmp_path / "exp.toml"
    exp.write_text(
        f'[experiment]\nname = "t"\nreport = "{tmp_path / "report"}"\ncontrols = {{ negative = "sft_lr0" }}\n'
        f'[common.model]\npath = "{tiny_model_dir}"\nmax_sequence_length = 0\n'
        f'[common.data]\njsonl = "{shapes_data}"\n'
        f'[common.train]\nbatch_size = 2\nlr = 0.0\nthreads = 2\nmixed_precision = "{mixed_precision}"\n'
        '[common.budget]\nunit = "optimizer_steps"\namount = 3\n'
        '[common.eval]\nbenchmark = "shapes"\npoints = 1\nnum_steps = 3\nbatch_size = 4\n'
        'benchmark_options = { n_per_tag = 1 }\n'
        '[runs.sft_lr0]\nmethod = { name = "sft" }\n'
        f'[experiment.probe]\njsonl = "{shapes_data}"\nn = 3\nsigmas = [1.0, 0.5]\n')
    run_experiment(exp, tmp_path / "out", [], log=lambda m: None)
    md = (tmp_path / "report" / "report.md").read_text()
    (negative,) = _controls_section(md)
    assert negative.endswith("| passed |"), negative
    assert "sft_lr0@3" in negative
    settings = json.loads((tmp_path / "out" / "base" / "evals" / "step_000000" / "shapes" / "settings.json").read_text())
    assert settings["precision"] == {"no": "fp32"}.get(mixed_precision, mixed_precision)
    probes = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out" / "probes").glob("*/probe.json")}
    assert set(probes) == {"base", "sft_lr0"} and probes["base"]["n_pairs"] == 3
    section = md.split("## Exposure-bias probe", 1)[1]
    for label, doc in probes.items():  # the table's cells are the probe files' numbers
        cells = [f"{r['mse_mean']:.4f} ± {1.96 * r['mse_sem']:.4f}" for r in doc["rows"] if r["guidance"] == 4.5]
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
        assert all(c in row for c in cells) and len(cells) == 2
    assert probes["base"]["rows"][0]["per_pair_mse"] == probes["sft_lr0"]["rows"][0]["per_pair_mse"]
    assert "sft_lr0 minus base" in section and "+0.0000 [+0.0000, +0.0000]" in section


def test_a_control_scored_on_a_second_benchmark_is_checked_there_alone_and_labelled(tmp_path):
    """The positive control is also scored on prompts it trained on (shapes_train) with its base: that section
    checks it there, and does not list the negative control, which was evaluated on the held-out split only. Its
    row in the final tables says it is a control, not a matched-budget comparison."""
    gain = [[s + 0.2 + 0.01 * i for i, s in enumerate(BASE_SCORES)]]
    exp = _experiment(tmp_path / "exp", dict(BASE_IMAGES), gain)
    for run, group, method, step, scores in (("base", "base", "base", 0, BASE_SCORES),
                                             ("grpo-s0", "grpo", "flow_grpo", 10, gain[0])):
        folder = exp / run / "evals" / f"step_{step:06d}" / "shapes_train"
        _summary(folder, run, group, method, 0, step, scores, BASE_IMAGES)
        summary = json.loads((folder / "summary.json").read_text())
        summary["benchmark"]["name"] = "shapes_train"
        (folder / "summary.json").write_text(json.dumps(summary))
    md = write_report([exp], tmp_path / "out", formats=["md"])["markdown"].read_text()
    sections = {part.split("\n", 1)[0].strip(): part for part in md.split("\n## ")[1:]}
    held_out, trained = sections["Benchmark: shapes"], sections["Benchmark: shapes_train"]
    assert [line.split(" |")[0] for line in _controls_section(held_out)] == ["| negative", "| positive"]
    (positive,) = _controls_section(trained)
    assert positive.startswith("| positive | grpo | shapes_train |") and positive.endswith("| passed |")
    for text in (held_out, trained):
        assert "grpo is the positive control" in text and "not one of the matched-budget comparisons" in text


# ---- budget views (soarbench/report/entries.py): a second matching of budgets, in a final table of its own ------

VIEW_TOML = ('[experiment]\n[experiment.views.matched_data]\ntitle = "Matched data passes"\nreference = "sft_data"\n'
             'groups = ["soar"]\n')


def test_a_view_gets_its_own_final_table_tested_against_its_reference(tmp_path):
    root = tmp_path / "exp"
    sft = [0.5, 0.5, 1.0, 0.5, 0.5, 1.0]
    sft_data = [0.0, 0.5, 0.5, 0.5, 0.0, 0.5]
    soar = [[0.5, 0.5, 1.0, 1.0, 0.0, 1.0], [0.5, 1.0, 1.0, 0.5, 0.5, 1.0]]
    _summary(root / "base" / "evals" / "step_000000" / "shapes", "base", "base", "base", 0, 0, BASE_SCORES,
             BASE_IMAGES)
    _summary(root / "sft-s0" / "evals" / "step_000700" / "shapes", "sft-s0", "sft", "sft", 0, 700, sft, BASE_IMAGES)
    _summary(root / "sft_data-s0" / "evals" / "step_000095" / "shapes", "sft_data-s0", "sft_data", "sft", 0, 95,
             sft_data, BASE_IMAGES)
    for seed, scores in enumerate(soar):
        _summary(root / f"soar-s{seed}" / "evals" / "step_000095" / "shapes", f"soar-s{seed}", "soar", "soar", seed,
                 95, scores, BASE_IMAGES)
    (root / "experiment.toml").write_text(VIEW_TOML)
    paths = write_report([root], tmp_path / "out", formats=["md", "html", "csv"])
    md = paths["markdown"].read_text()

    def table(title: str) -> list[str]:
        block = md.split(f"### {title}\n", 1)[1].split("###", 1)[0]
        return [line for line in block.splitlines() if line.startswith("| ")]

    final = table("Final checkpoints")
    assert not any(line.startswith("| sft_data") for line in final)  # budgeted for the view only
    assert any(line.startswith("| soar") for line in final) and "Δ geneval vs sft |" in final[0]
    view = table("Matched data passes")
    assert "Δ geneval vs sft_data |" in view[0]
    assert {line.split("|")[1].strip().split("@")[0] for line in view[2:]} == {"base", "sft_data", "soar"}
    # SOAR's paired difference against sft_data: the seed-mean per-prompt scores minus sft_data's, by hand
    expected = np.mean(soar, axis=0) - np.asarray(sft_data)
    test = paired_bootstrap(np.mean(soar, axis=0), np.asarray(sft_data))
    soar_row = next(line for line in view if line.startswith("| soar"))
    assert f"{expected.mean():+.3f} [{test.lo:+.3f}, {test.hi:+.3f}]" in soar_row
    assert "MDE of soar vs sft_data on geneval" in md
    assert "Matched data passes" in (tmp_path / "out" / "index.html").read_text()
    # final_table.csv: the main table's rows, then the view's, named in its "view" column
    rows = list(csv.DictReader(paths["final_table_csv"].open(newline="", encoding="utf-8")))
    assert [(r["view"], r["group"]) for r in rows] == [("", "base"), ("", "sft"), ("", "soar"),
                                                      ("matched_data", "base"), ("matched_data", "sft_data"),
                                                      ("matched_data", "soar")]
    soar_view = rows[-1]
    assert float(soar_view["geneval_diff_vs_sft_data"]) == pytest.approx(expected.mean())
    assert soar_view["geneval_diff_vs_sft"] == ""  # the main table's test lives on the main table's row


def test_a_view_is_not_shown_on_a_benchmark_none_of_its_groups_was_scored_on(tmp_path):
    root = _experiment(tmp_path / "exp", dict(BASE_IMAGES), [list(BASE_SCORES)])
    (root / "experiment.toml").write_text(VIEW_TOML)
    md = write_report([root], tmp_path / "out", formats=["md"])["markdown"].read_text()
    assert "### Final checkpoints" in md and "Matched data passes" not in md


@pytest.mark.parametrize("views, message", [
    ('{ m = { reference = "sft_dta", groups = ["soar"] } }',
     r"views.m: unknown group 'sft_dta' .*did you mean 'sft_data'"),
    ('{ m = { reference = "sft_data", groups = [] } }', r"views.m: 'groups' must be a non-empty list"),
    ('{ m = { reference = "sft_data", groups = ["soar"], titel = "x" } }', r"views.m: unknown key 'titel'.*'title'"),
    ('{ m = { reference = "soar", groups = ["soar"] } }', r"views.m: the reference 'soar' is also listed"),
    ('"sft_data"', r"'views' must be a table"),
])
def test_an_experiment_naming_bad_views_is_refused_in_one_line(views, message, tmp_path):
    import tomllib

    from soarbench.experiment import _check_views

    exp = tomllib.loads(f'[experiment]\nviews = {views}\n[runs.sft_data]\nseeds = [0]\n[runs.soar]\nseeds = [0]\n')
    with pytest.raises(UserError, match=message):
        _check_views(exp["experiment"], plan_runs(exp), Path("compare.toml"))
