"""soarbench.report: statistics, tables (CSV/Markdown), the HTML page and input errors.

The report tests build run folders by hand with chosen numbers and compare what write_report writes with the
values computed by hand. With two seeds the 95% percentile bootstrap interval of the mean is exactly
[min, max] (each extreme carries a quarter of the resampled means), which makes the interval columns exact too.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from soarbench.errors import UserError
from soarbench.report import OUTPUT_FILES, write_report
from soarbench.report.collect import collect
from soarbench.report.figures import build_figures, ema, smoothing_span
from soarbench.report.stats import N_RESAMPLES, bootstrap_ci, paired_bootstrap

# ---------------------------------------------------------------------------------------------------------------
# stats


def test_bootstrap_ci_of_a_constant_is_degenerate_at_the_constant():
    ci = bootstrap_ci([0.1] * 7)
    assert (ci.mean, ci.lo, ci.hi, ci.n) == (0.1, 0.1, 0.1, 7)


def test_bootstrap_ci_of_two_values_is_their_range():
    ci = bootstrap_ci([0.62, 0.60])
    assert ci.mean == pytest.approx(0.61)
    assert (ci.lo, ci.hi) == (pytest.approx(0.60), pytest.approx(0.62))


def test_bootstrap_ci_approaches_the_normal_interval_for_a_large_sample():
    values = np.random.default_rng(1).normal(3.0, 2.0, size=2000)
    half_width = 1.96 * values.std() / math.sqrt(values.size)
    ci = bootstrap_ci(values)
    assert ci.mean == pytest.approx(values.mean())
    assert ci.lo == pytest.approx(values.mean() - half_width, abs=0.1 * half_width)
    assert ci.hi == pytest.approx(values.mean() + half_width, abs=0.1 * half_width)


def test_bootstrap_ci_is_reproducible_and_depends_on_the_seed():
    values = [0.1, 0.5, 0.3, 0.9, 0.7]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


@pytest.mark.parametrize("values", [[], [1.0, math.nan], [[1.0, 2.0]]])
def test_bootstrap_ci_rejects_empty_non_finite_or_nested_input(values):
    with pytest.raises(ValueError):
        bootstrap_ci(values)


def test_paired_bootstrap_on_identical_inputs_finds_no_difference():
    a = [0.2, 0.9, 0.4, 0.6]
    test = paired_bootstrap(a, list(a))
    assert (test.diff, test.lo, test.hi, test.p_value, test.n) == (0.0, 0.0, 0.0, 1.0, 4)


def test_paired_bootstrap_detects_a_clear_shift():
    rng = np.random.default_rng(2)
    b = rng.uniform(0, 1, size=50)
    a = b + 0.1 + rng.normal(0, 0.01, size=50)
    test = paired_bootstrap(a, b)
    assert test.p_value < 0.01
    assert test.p_value == pytest.approx(1 / (1 + N_RESAMPLES))  # no resample comes near zero
    assert test.lo < 0.1 < test.hi
    assert test.diff == pytest.approx(float(np.mean(a - b)))


def test_paired_bootstrap_p_value_matches_the_normal_approximation():
    # d ~ N(0.1, 1), n = 400: z = mean / (sd / sqrt(n)) is near 2; the bootstrap p should be near erfc(z / sqrt 2).
    rng = np.random.default_rng(5)
    d = rng.normal(0.1, 1.0, size=400)
    z = abs(d.mean()) / (d.std() / math.sqrt(d.size))
    test = paired_bootstrap(d, np.zeros_like(d))
    assert test.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.015)


def test_paired_bootstrap_rejects_unpaired_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0, 2.0], [1.0])


# ---------------------------------------------------------------------------------------------------------------
# chart helpers


def test_ema_is_bias_corrected_and_skips_nan():
    smoothed = ema(np.array([2.0, 2.0, math.nan, 2.0]), span=9)
    assert smoothed[[0, 1, 3]] == pytest.approx([2.0, 2.0, 2.0])
    assert math.isnan(smoothed[2])
    assert smoothing_span(10) == 1 and smoothing_span(400) == 20


# ---------------------------------------------------------------------------------------------------------------
# Synthetic run folders

BENCHMARK = "shapes"
STEPS = (100, 200)
# geneval per run and step; the sub-task scores are derived from it (see _scores) so every value is hand-checkable
GENEVAL = {
    "sft-s0": {100: 0.50, 200: 0.60},
    "sft-s1": {100: 0.54, 200: 0.62},
    "soar-s0": {100: 0.55, 200: 0.70},
    "soar-s1": {100: 0.57, 200: 0.74},
}
BASE_GENEVAL = 0.40
WALL_S = {0: 10.0, 1: 12.0}  # by seed


def _scores(g: float) -> dict[str, float]:
    return {"geneval": g, "geneval/counting": g - 0.1, "geneval/colors": g + 0.1}


def _per_prompt(g: float) -> list[float]:
    # mean g; differences between two models are then the same on every prompt
    return [g - 0.1, g + 0.1, g, g]


def write_summary(run_dir: Path, run_name: str, group: str, method: str, seed: int, step: int, g: float,
                  wall_s: float = 0.0, per_prompt: bool = True) -> Path:
    path = run_dir / "evals" / f"step_{step:06d}" / BENCHMARK / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema": "soarbench.eval/1",
        "label": f"{group}@{step}",
        "model": {
            "path": str(run_dir / "ckpt"), "run_name": run_name, "group": group, "method": method, "seed": seed,
            "step": step,
            "budget_spent": {"images": step * 16, "unique_prompts": step, "no_grad_fwd": 0, "fwd_bwd": step * 8,
                             "reward_calls": 0, "optimizer_steps": step, "wall_s": wall_s},
        },
        "benchmark": {"name": BENCHMARK, "n_prompts": 4, "images_per_prompt": 2, "prompt_set_sha256": "ab" * 32},
        "scores": _scores(g),
        "metrics": {"geneval": {"name": "geneval", "version": "1", "scale": "accuracy in [0, 1]",
                                "higher_is_better": True}},
        "n_samples": 8,
        "provenance": {"git_sha": "0123abcd", "git_dirty": False, "packages": {"torch": "2.13.0"}},
    }
    if per_prompt:
        doc["per_prompt"] = {"geneval": _per_prompt(g)}
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def write_run(exp: Path, run_name: str, group: str, method: str, seed: int, per_prompt: bool = True) -> Path:
    run_dir = exp / run_name
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(
        {"run_name": run_name, "group": group, "method": method, "seed": seed, "budget": {"fwd_bwd": 1600}}))
    log = [{"step": s, "loss": 1.0 / s, "budget": {"fwd_bwd": 8 * s}} for s in range(1, 201)]
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
    for step in STEPS:
        write_summary(run_dir, run_name, group, method, seed, step, GENEVAL[run_name][step], WALL_S[seed],
                      per_prompt)
    return run_dir


def write_experiment(exp: Path, runs=tuple(GENEVAL), per_prompt: bool = True) -> Path:
    write_summary(exp / "base", "base", "base", "base", 0, 0, BASE_GENEVAL, per_prompt=per_prompt)
    for run_name in runs:
        group, seed = run_name.split("-s")
        write_run(exp, run_name, group, group, int(seed), per_prompt)
    return exp


def read_csv(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return list(rows[0]), {row["label"]: row for row in rows}


# ---------------------------------------------------------------------------------------------------------------
# Report outputs


@pytest.fixture(scope="module")
def two_seed_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    exp = write_experiment(root / "exp")
    paths = write_report([exp], root / "out", title="Two seeds")
    return paths


def test_write_report_writes_every_output(two_seed_report):
    assert set(two_seed_report) == set(OUTPUT_FILES)
    for key, path in two_seed_report.items():
        assert path.name == OUTPUT_FILES[key] and path.is_file()
    assert not list(two_seed_report["html"].parent.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_main_table_csv_has_means_and_seed_intervals(two_seed_report):
    header, rows = read_csv(two_seed_report["main_table_csv"])
    assert header == [
        "benchmark", "label", "group", "method", "step", "n_seeds",
        "geneval_mean", "geneval_lo", "geneval_hi",
        "geneval/counting_mean", "geneval/counting_lo", "geneval/counting_hi",
        "geneval/colors_mean", "geneval/colors_lo", "geneval/colors_hi",
        "fwd_bwd", "images", "wall_s",
    ]
    assert list(rows) == ["base", "sft@100", "sft@200", "soar@100", "soar@200"]
    expected = {  # label: (n_seeds, mean, lo, hi) of geneval; two seeds -> [min, max]
        "sft@100": (2, 0.52, 0.50, 0.54),
        "sft@200": (2, 0.61, 0.60, 0.62),
        "soar@100": (2, 0.56, 0.55, 0.57),
        "soar@200": (2, 0.72, 0.70, 0.74),
    }
    for label, (n, mean, lo, hi) in expected.items():
        row = rows[label]
        assert int(row["n_seeds"]) == n
        assert [float(row[f"geneval_{s}"]) for s in ("mean", "lo", "hi")] == pytest.approx([mean, lo, hi])
        assert float(row["geneval/counting_mean"]) == pytest.approx(mean - 0.1)
        assert float(row["geneval/colors_hi"]) == pytest.approx(hi + 0.1)
        assert float(row["wall_s"]) == pytest.approx(11.0)  # mean of 10 s and 12 s
    assert int(rows["soar@200"]["fwd_bwd"]) == 1600 and int(rows["soar@200"]["images"]) == 3200
    base = rows["base"]
    assert (base["group"], base["method"], base["step"], base["n_seeds"]) == ("base", "base", "0", "1")
    assert float(base["geneval_mean"]) == pytest.approx(0.40)
    assert base["geneval_lo"] == base["geneval_hi"] == ""  # one seed: no interval


def test_final_table_csv_has_paired_test_vs_sft(two_seed_report):
    header, rows = read_csv(two_seed_report["final_table_csv"])
    assert list(rows) == ["base", "sft@200", "soar@200"]
    assert header[6] == "view" and {row["view"] for row in rows.values()} == {""}  # no budget view here
    assert header[7:] == [
        "geneval_mean", "geneval_lo", "geneval_hi",
        "geneval_diff_vs_sft", "geneval_diff_vs_sft_lo", "geneval_diff_vs_sft_hi", "geneval_p_vs_sft",
        "fwd_bwd", "images", "wall_s",
    ]
    soar = rows["soar@200"]
    # per-prompt differences are 0.72 - 0.61 = 0.11 on every prompt: a degenerate interval and the smallest p
    assert [float(soar[k]) for k in ("geneval_diff_vs_sft", "geneval_diff_vs_sft_lo", "geneval_diff_vs_sft_hi")] \
        == pytest.approx([0.11, 0.11, 0.11])
    assert float(soar["geneval_p_vs_sft"]) == pytest.approx(1 / (1 + N_RESAMPLES))
    assert float(rows["base"]["geneval_diff_vs_sft"]) == pytest.approx(0.40 - 0.61)
    assert rows["sft@200"]["geneval_diff_vs_sft"] == rows["sft@200"]["geneval_p_vs_sft"] == ""


def test_markdown_has_every_table_and_row(two_seed_report):
    md = two_seed_report["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# Two seeds\n")
    for heading in ("### Final checkpoints", "### GenEval accuracy per task (final checkpoints)",
                    "### All checkpoints", "## Notes"):
        assert heading in md
    main = md.split("### All checkpoints", 1)[1]
    labels = re.findall(r"^\| ([\w@]+) \|", main, flags=re.MULTILINE)
    assert labels == ["model", "base", "sft@100", "sft@200", "soar@100", "soar@200"]
    assert "| sft@200 | 2 | 0.610 [0.600, 0.620] | 0.510 [0.500, 0.520] | 0.710 [0.700, 0.720] | 1,600 |" in main
    assert "| base | 1 | 0.400 | 0.300 | 0.500 | 0 | 0 | 0.00 |" in main
    final = md.split("### Final checkpoints", 1)[1].split("###", 1)[0]
    assert "| soar@200 | 2 | 0.720 [0.700, 0.740] | +0.110 [+0.110, +0.110] | <0.001 |" in final
    assert "| model | seeds | overall | counting | colors |" in md
    assert "git sha: 0123abcd" in md and "torch 2.13.0" in md


def test_html_is_self_contained_with_every_figure_embedded(two_seed_report):
    page = two_seed_report["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, flags=re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|iframe)\b", page)
    images = re.findall(r'<img src="([^"]*)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    figures = sorted(p.stem for p in (two_seed_report["html"].parent / "figures").glob("*.png"))
    assert sorted(p.stem for p in (two_seed_report["html"].parent / "figures").glob("*.svg")) == figures
    # one curve figure per top-level metric, the GenEval tasks, one distribution, one signals figure per group
    assert figures == ["curves_shapes_geneval", "distribution_shapes_geneval", "geneval_tasks_shapes",
                       "signals_sft", "signals_soar"]
    assert len(images) == len(figures)
    assert "0.720 <span class=\"ci\">[0.700, 0.740]</span>" in page
    assert "0123abcd" in page


def _curve_axes(exp: Path):
    figures = {f.name: f for f in build_figures(collect([exp]))}
    return figures["curves_shapes_geneval"].figure.axes


def test_curve_figure_has_seed_bands_and_a_dashed_base_line(tmp_path):
    axes = _curve_axes(write_experiment(tmp_path / "exp"))
    by_step, by_budget = axes[:2]
    for ax in (by_step, by_budget):
        solid = {line.get_label(): line for line in ax.get_lines() if line.get_linestyle() == "-"}
        assert set(solid) == {"sft (2 seeds)", "soar (2 seeds)"}
        assert list(solid["soar (2 seeds)"].get_ydata()) == pytest.approx([0.56, 0.72])
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and list(dashed[0].get_ydata()) == pytest.approx([0.40, 0.40])
        assert len(ax.collections) == 2  # one seed band per trained group
    assert list(by_step.get_lines()[0].get_xdata()) == [100, 200]
    assert list(by_budget.get_lines()[0].get_xdata()) == [800, 1600]  # fwd_bwd: step * 8


def test_single_seed_report_has_plain_columns(tmp_path):
    exp = write_experiment(tmp_path / "exp", runs=("sft-s0", "soar-s0"))
    paths = write_report([exp / "base", exp / "sft-s0", exp / "soar-s0"], tmp_path / "out")
    header, rows = read_csv(paths["main_table_csv"])
    assert header[6:9] == ["geneval", "geneval/counting", "geneval/colors"]
    assert float(rows["soar@200"]["geneval"]) == pytest.approx(0.70)
    assert not any(ax.collections for ax in _curve_axes(exp)[:2])  # no seed bands with one seed


def test_report_without_per_prompt_scores_has_no_paired_test(tmp_path):
    exp = write_experiment(tmp_path / "exp", per_prompt=False)
    header, _ = read_csv(write_report([exp], tmp_path / "out")["final_table_csv"])
    assert not any("diff_vs" in name for name in header)


def test_experiment_and_its_run_passed_together_are_read_once(tmp_path):
    exp = write_experiment(tmp_path / "exp")
    _, rows = read_csv(write_report([exp, exp / "sft-s0"], tmp_path / "out")["main_table_csv"])
    assert rows["sft@200"]["n_seeds"] == "2"


def test_step_zero_eval_of_a_run_stays_in_its_group(tmp_path):
    # The trainer marks a run's own step-0 evaluation as method "base" while keeping the run's group.
    exp = write_experiment(tmp_path / "exp", runs=("sft-s0", "soar-s0"))
    for run_name in ("sft-s0", "soar-s0"):
        group = run_name.split("-")[0]
        write_summary(exp / run_name, run_name, group, "base", 0, 0, BASE_GENEVAL)
    paths = write_report([exp], tmp_path / "out")
    _, rows = read_csv(paths["main_table_csv"])
    assert list(rows) == ["base", "sft@0", "sft@100", "sft@200", "soar@0", "soar@100", "soar@200"]
    assert rows["soar@0"]["method"] == "soar"
    assert float(rows["soar@0"]["geneval"]) == pytest.approx(BASE_GENEVAL)


def test_model_evaluated_on_its_own_is_a_reference_line(tmp_path):
    exp = write_experiment(tmp_path / "exp", runs=("sft-s0",))
    # what `soarbench eval` writes: no run name, group or seed, and no step
    path = write_summary(tmp_path / "eval", "x", "x", "x", 0, 0, 0.55)
    doc = json.loads(path.read_text())
    doc["label"] = "sd35m"
    doc["model"] = {"path": "/models/sd35m", "label": "sd35m", "method": "eval", "step": None}
    path.write_text(json.dumps(doc))
    paths = write_report([exp, tmp_path / "eval"], tmp_path / "out")
    _, rows = read_csv(paths["main_table_csv"])
    assert list(rows) == ["base", "sft@100", "sft@200", "sd35m"]
    assert (rows["sd35m"]["step"], rows["sd35m"]["method"]) == ("", "eval")
    figures = {f.name: f for f in build_figures(collect([exp, tmp_path / "eval"]))}
    for ax in figures["curves_shapes_geneval"].figure.axes[:2]:  # base and sd35m, dashed, in both panels
        dashed = {line.get_label(): line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"}
        assert dashed == {"base": pytest.approx(0.40), "sd35m": pytest.approx(0.55)}


def test_different_prompt_sets_are_warned_about_and_not_paired(tmp_path):
    exp = write_experiment(tmp_path / "exp", runs=("sft-s0", "soar-s0"))
    for path in (exp / "soar-s0").rglob("summary.json"):
        doc = json.loads(path.read_text())
        doc["benchmark"]["prompt_set_sha256"] = "cd" * 32
        path.write_text(json.dumps(doc))
    paths = write_report([exp], tmp_path / "out")
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "benchmark 'shapes' was evaluated on 2 different prompt sets" in md
    assert "No paired test for 'soar': it was evaluated on other prompts than 'sft'." in md
    assert "Warnings" in paths["html"].read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_folder_without_runs_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no summary.json or train_log.jsonl found \(expected a run"):
        write_report([tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'nope'}: no such file or directory")):
        write_report([tmp_path / "nope"], tmp_path / "out")


@pytest.mark.parametrize("field, value, message", [
    ("step", None, "missing field 'model.step'"),
    ("step", "200", "field 'model.step' must be an integer >= 0"),
    ("method", None, "missing field 'model.method'"),
    ("seed", 1.5, "field 'model.seed' must be an integer, got 1.5"),
])
def test_malformed_summary_names_file_and_field(tmp_path, field, value, message):
    path = write_summary(tmp_path / "run", "r", "g", "soar", 0, 200, 0.5)
    doc = json.loads(path.read_text())
    if value is None:
        del doc["model"][field]
    else:
        doc["model"][field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=re.escape(f"{path}: {message}")):
        write_report([tmp_path / "run"], tmp_path / "out")


def test_summary_without_run_name_or_label_names_the_field(tmp_path):
    path = write_summary(tmp_path / "run", "r", "g", "soar", 0, 200, 0.5)
    doc = json.loads(path.read_text())
    del doc["model"]["run_name"], doc["label"]
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=re.escape(f"{path}: missing field 'model.run_name'")):
        write_report([path.parent], tmp_path / "out")


def test_summary_that_is_not_json_names_the_file(tmp_path):
    path = tmp_path / "eval" / "summary.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(UserError, match=re.escape(f"{path}:1: not valid JSON")):
        write_report([path.parent], tmp_path / "out")


def test_bad_train_log_line_names_file_and_line(tmp_path):
    run_dir = write_run(tmp_path, "sft-s0", "sft", "sft", 0)
    log = run_dir / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 201}\n')
    with pytest.raises(UserError, match=re.escape(f"{log}:201: missing field 'loss'")):
        write_report([run_dir], tmp_path / "out")


def test_duplicate_evaluation_is_a_user_error(tmp_path):
    first = write_summary(tmp_path / "a", "sft-s0", "sft", "sft", 0, 200, 0.6)
    write_summary(tmp_path / "b", "sft-s0", "sft", "sft", 0, 200, 0.6)
    with pytest.raises(UserError, match=re.escape(str(first))):
        write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out")


def test_group_mixing_methods_is_a_user_error(tmp_path):
    write_summary(tmp_path / "a", "x-s0", "x", "sft", 0, 200, 0.6)
    second = write_summary(tmp_path / "b", "x-s1", "x", "soar", 1, 200, 0.6)
    with pytest.raises(UserError, match=re.escape(f"{second}: group 'x' has method 'soar'")):
        write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out")


def test_seeds_reaching_budget_points_at_different_steps_are_aligned(tmp_path):
    """Flow-GRPO's seeds reach the same budget fractions at different steps: the i-th evals are one checkpoint."""
    exp = tmp_path / "exp"
    for seed, steps, scores in ((0, (10, 20), (0.2, 0.4)), (1, (11, 23), (0.4, 0.6))):
        for step, g in zip(steps, scores):
            write_summary(exp / f"grpo-s{seed}", f"grpo-s{seed}", "grpo", "flow_grpo", seed, step, g)
    write_report([exp], tmp_path / "out")
    header, rows = read_csv(tmp_path / "out" / "main_table.csv")
    assert set(rows) == {"grpo@10-11", "grpo@20-23"}
    assert float(rows["grpo@20-23"]["geneval_mean"]) == pytest.approx(0.5)
    assert rows["grpo@10-11"]["n_seeds"] == "2"


def test_markdown_links_every_figure(two_seed_report):
    md = two_seed_report["markdown"].read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    pngs = (two_seed_report["html"].parent / "figures").glob("*.png")
    assert links and sorted(links) == sorted(f"figures/{p.name}" for p in pngs)


def test_a_reconstructed_method_is_labelled_so_in_every_table(tmp_path):
    exp = write_experiment(tmp_path / "exp", runs=("sft-s0",))
    for path in (exp / "sft-s0").glob("evals/*/*/summary.json"):  # the run's method has no public code
        doc = json.loads(path.read_text())
        doc["model"]["method_version"] = "1-reconstructed (from the paper)"
        path.write_text(json.dumps(doc))
    paths = write_report([exp], tmp_path / "out", title="t")
    _, rows = read_csv(paths["main_table_csv"])
    assert set(rows) == {"base", "sft@100 (reconstructed)", "sft@200 (reconstructed)"}
    assert "| sft@200 (reconstructed) | 1 |" in paths["markdown"].read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Strata: GenEval's overall is the mean of its task means


def test_stratified_paired_bootstrap_tests_the_mean_of_strata_means():
    from soarbench.report.stats import mde_paired, mde_multiplier

    a = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    b = np.zeros(6)
    strata = ["x", "x", "y", "y", "y", "y"]
    # per-prompt mean of d is 2/6; the mean of the strata's means is (1 + 0) / 2
    assert paired_bootstrap(a, b).diff == pytest.approx(1 / 3)
    test = paired_bootstrap(a, b, strata=strata)
    assert test.diff == pytest.approx(0.5)
    assert test.lo == pytest.approx(0.5) and test.hi == pytest.approx(0.5)  # no spread inside either stratum
    # one stratum is the plain test, draw for draw
    one = paired_bootstrap(a + np.arange(6) / 10, b, strata=["t"] * 6)
    assert one == paired_bootstrap(a + np.arange(6) / 10, b)
    # MDE: sqrt(sum_t s_t^2 / n_t) / T; d = [1, 3 | 0, 0, 6]: s^2 = 2 and 12, n = 2 and 3
    d = np.array([1.0, 3.0, 0.0, 0.0, 6.0])
    expected = mde_multiplier(0.05, 0.8) * math.sqrt(2 / 2 + 12 / 3) / 2
    assert mde_paired(d, strata=["a", "a", "b", "b", "b"]) == pytest.approx(expected)
    assert mde_paired(d, strata=["a"] * 5) == pytest.approx(mde_paired(d))
    with pytest.raises(ValueError, match="strata has 2 labels for 5 units"):
        mde_paired(d, strata=["a", "b"])


def _with_tasks(summary: Path, tasks: list[str]) -> None:
    rows = [{"filename": f"images/{p:05d}_{k}.png", "tag": tag, "correct": True} for p, tag in enumerate(tasks)
            for k in range(2)]
    (summary.parent / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_geneval_comparisons_are_stratified_by_task_from_results_jsonl(tmp_path):
    # two tasks of unequal size: the per-prompt mean and the mean of the task means differ
    exp = tmp_path / "exp"
    tasks = ["counting", "colors", "colors", "colors"]
    base = write_summary(exp / "base", "base", "base", "base", 0, 0, BASE_GENEVAL)
    for run_name in ("sft-s0", "soar-s0"):
        write_run(exp, run_name, run_name[:-3], run_name[:-3], 0)
    for summary in [base, *exp.rglob("summary.json")]:
        _with_tasks(summary, tasks)
    data = collect([exp])
    assert all(e.strata == {"geneval": tuple(tasks)} for e in data.evals)
    # soar - sft per prompt: _per_prompt(g) shifts every prompt by the same amount, so make one task differ
    soar = exp / "soar-s0" / "evals" / "step_000200" / BENCHMARK / "summary.json"
    doc = json.loads(soar.read_text())
    doc["per_prompt"]["geneval"][0] += 0.4  # the counting prompt only
    soar.write_text(json.dumps(doc))
    paths = write_report([exp], tmp_path / "out", title="strata")
    assert paths
    text = (tmp_path / "out" / "report.md").read_text()
    shift = GENEVAL["soar-s0"][200] - GENEVAL["sft-s0"][200]
    # the counting task's mean moved by 0.4, the colours task's not: the overall's difference moves by 0.4 / 2
    assert f"{shift + 0.2:+.3f}" in text
    assert "in 2 strata (the overall is the mean of their means)" in text


def test_results_jsonl_that_disagrees_with_the_summary_is_named(tmp_path):
    exp = tmp_path / "exp"
    base = write_summary(exp / "base", "base", "base", "base", 0, 0, BASE_GENEVAL)
    _with_tasks(base, ["counting", "colors"])  # the summary has 4 prompts
    with pytest.raises(UserError, match=r"results.jsonl: tags for 2 prompts, but .* per-prompt scores for 4"):
        collect([exp])
