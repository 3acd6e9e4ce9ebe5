"""The report's matplotlib figures, checked on the drawn Figure objects against hand-made run folders.

Each model's images are filled with one colour of its own (and one shade per prompt), so an image grid can be
checked pixel by pixel for the right model in the right row and the right prompt in the right column.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soarbench.report.collect import collect
from soarbench.report.figures import build_figures

BENCH = "shapes"
PROMPTS = ("a photo of a cross", "a photo of two circles", "a photo of a red square")
COLOR = {"base": (128, 128, 128), "sft": (200, 0, 0), "grpo": (0, 0, 200)}
SEED_OF = {0: 11, 1: 22, 2: 33}  # sampling seed of each prompt's first image: the same for every model


def _image(group: str, prompt: int, step: int) -> np.ndarray:
    r, g, b = COLOR[group]
    return np.full((8, 8, 3), (r, min(255, g + 20 * prompt + step // 10), b), dtype=np.uint8)


def _eval(run_dir: Path, run: str, group: str, method: str, seed: int, step: int, geneval: list[float],
          clip: float, seeds=SEED_OF) -> None:
    folder = run_dir / "evals" / f"step_{step:06d}" / BENCH
    (folder / "images").mkdir(parents=True)
    samples = []
    for p, prompt in enumerate(PROMPTS):
        name = f"images/{p:05d}_0.png"
        Image.fromarray(_image(group, p, step)).save(folder / name)
        samples.append({"id": f"{p:05d}_0", "prompt_index": p, "image_index": 0, "seed": seeds[p],
                        "prompt": prompt, "file": name, "records": {"geneval": {"score": geneval[p]}}})
    (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    summary = {
        "schema": "soarbench.eval/1",
        "model": {"run_name": run, "group": group, "method": method, "seed": seed, "step": step,
                  "budget_spent": {"fwd_bwd_equiv": 4.0 * step}},
        "benchmark": {"name": BENCH, "n_prompts": 3, "images_per_prompt": 1, "prompt_set_sha256": "ab" * 32},
        "scores": {"geneval": float(np.mean(geneval)), "clipscore": clip},
        "per_prompt": {"geneval": geneval},
        "metrics": {"geneval": {"higher_is_better": True}, "clipscore": {"higher_is_better": True}},
        "provenance": {"resolved_config": {"budget": {"unit": "fwd_bwd_equiv"}}},
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def _run(root: Path, run: str, group: str, method: str, seed: int, rewards: dict | None, log: list[dict]) -> Path:
    run_dir = root / run
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_name": run, "group": group, "method": method, "seed": seed,
                                                  "budget": {"unit": "fwd_bwd_equiv", "amount": 80}}))
    method_toml = f'[method]\nname = "{method}"\n'
    if rewards:
        method_toml += "rewards = { " + ", ".join(f"{k} = {v}" for k, v in rewards.items()) + " }\n"
    (run_dir / "config.toml").write_text(method_toml)
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in log))
    return run_dir


GRPO_LOG = [{"step": s, "loss": 0.1 * s, "reward_mean": 0.2 + 0.01 * s, "kl": 0.001 * s, "clipfrac": 0.5,
             "grad_norm": 1.0 + s, "lr": 3e-4, "budget": {"fwd_bwd": s}} for s in range(1, 21)]
SFT_LOG = [{"step": s, "loss": 1.0 / s, "loss_main": 1.0 / s, "grad_norm": 2.0, "lr": 1e-4} for s in range(1, 21)]


@pytest.fixture()
def experiment(tmp_path) -> Path:
    root = tmp_path / "exp"
    _eval(root / "base", "base", "base", "base", 0, 0, [0.0, 0.5, 0.0], 0.25)
    for group, method, rewards, log in (("sft", "sft", None, SFT_LOG),
                                        ("grpo", "flow_grpo", {"geneval": 1.0}, GRPO_LOG)):
        run_dir = _run(root, f"{group}-s0", group, method, 0, rewards, log)
        for step, geneval, clip in ((10, [0.5, 0.5, 0.0], 0.26), (20, [1.0, 0.5, 1.0], 0.24)):
            _eval(run_dir, f"{group}-s0", group, method, 0, step, geneval, clip)
    return root


def _figures(root: Path) -> dict:
    return {f.name: f for f in build_figures(collect([root]))}


def test_every_figure_kind_is_drawn(experiment, tmp_path):
    figures = _figures(experiment)
    assert sorted(figures) == sorted([
        "curves_shapes_geneval", "curves_shapes_clipscore", "distribution_shapes_geneval",
        "grid_methods_shapes", "grid_steps_shapes_sft-s0",
        "grid_steps_shapes_grpo-s0", "reward_hacking_grpo", "signals_sft", "signals_grpo",
    ])
    assert "distribution_shapes_clipscore" not in figures  # no per-sample clipscore: nothing to draw
    png, svg = figures["grid_methods_shapes"].save(tmp_path / "out")
    assert png.read_bytes().startswith(b"\x89PNG") and b"<svg" in svg.read_bytes()


def test_grid_across_methods_shows_each_models_own_images_for_the_same_prompts(experiment):
    fig = _figures(experiment)["grid_methods_shapes"]
    axes = np.array(fig.figure.axes).reshape(3, 3)  # rows: base, sft@20, grpo@20; columns: the prompts
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["base", "sft@20", "grpo@20"]
    assert [ax.get_title().replace("\n", " ") for ax in axes[0]] == list(PROMPTS)
    for r, (group, step) in enumerate((("base", 0), ("sft", 20), ("grpo", 20))):
        for c in range(3):
            shown = np.asarray(axes[r, c].get_images()[0].get_array())
            assert np.array_equal(shown, _image(group, c, step))
    assert "Every row used the same sampling seeds." in fig.caption


def test_grid_across_checkpoints_and_a_seed_mismatch_warning(experiment):
    fig = _figures(experiment)["grid_steps_shapes_sft-s0"]
    axes = np.array(fig.figure.axes).reshape(3, 3)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["base", "sft@10", "sft@20"]
    assert np.array_equal(np.asarray(axes[1, 2].get_images()[0].get_array()), _image("sft", 2, 10))
    # a model whose samples used other seeds is flagged as not like-for-like
    other = experiment / "grpo-s0" / "evals" / "step_000020" / BENCH / "samples.jsonl"
    rows = [json.loads(line) for line in other.read_text().splitlines()]
    rows[0]["seed"] = 999
    other.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "Warning: the rows' sampling seeds differ" in _figures(experiment)["grid_methods_shapes"].caption


def test_reward_hacking_panel_shows_every_metric_of_the_reward_trained_group(experiment):
    fig = _figures(experiment)["reward_hacking_grpo"]
    titles = [ax.get_title() for ax in fig.figure.axes]
    assert titles == ["geneval (shapes) — trained on", "clipscore (shapes)"]
    clip_ax = fig.figure.axes[1]
    solid = [line for line in clip_ax.get_lines() if line.get_linestyle() == "-"]
    assert [line.get_label() for line in solid] == ["grpo"]  # only the reward-trained group, not sft
    assert list(solid[0].get_ydata()) == pytest.approx([0.26, 0.24])
    base = [line for line in clip_ax.get_lines() if line.get_linestyle() == "--"]
    assert list(base[0].get_ydata()) == pytest.approx([0.25, 0.25])
    assert "geneval x 1" in fig.title
    assert "reward_hacking_sft" not in _figures(experiment)  # SFT trains on no reward


def test_training_signals_come_from_the_log(experiment):
    figures = _figures(experiment)
    grpo = figures["signals_grpo"].figure.axes
    assert [ax.get_title() for ax in grpo] == ["loss", "reward_mean", "kl", "clipfrac", "grad_norm"]
    kl = grpo[2].get_lines()[0]
    assert list(kl.get_xdata()) == list(range(1, 21))
    assert list(kl.get_ydata()) == pytest.approx([0.001 * s for s in range(1, 21)])
    assert [ax.get_title() for ax in figures["signals_sft"].figure.axes] == ["loss", "loss_main", "grad_norm"]


def test_distribution_uses_the_per_sample_scores(experiment):
    ax = _figures(experiment)["distribution_shapes_geneval"].figure.axes[0]
    points = [sorted(c.get_offsets()[:, 1].tolist()) for c in ax.collections]
    assert points == [[0.0, 0.0, 0.5], [0.5, 1.0, 1.0], [0.5, 1.0, 1.0]]  # base, sft@20, grpo@20
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base\n(n=3)", "sft@20\n(n=3)", "grpo@20\n(n=3)"]


def test_provenance_lists_prompt_sets_run_configs_and_checkpoint_hashes(experiment):
    import hashlib

    from soarbench.report.tables import provenance_items

    ckpt = experiment / "grpo-s0" / "ckpt"
    ckpt.mkdir()
    (ckpt / "weights.bin").write_bytes(b"\x01\x02\x03")
    for summary in (experiment / "grpo-s0").rglob("summary.json"):
        doc = json.loads(summary.read_text())
        doc["model"]["path"] = str(ckpt)
        summary.write_text(json.dumps(doc))
    items = dict(provenance_items(collect([experiment])))
    assert items["prompt set shapes"] == "sha256 " + "ab" * 32
    config = experiment / "grpo-s0" / "config.toml"
    config_sha = hashlib.sha256(config.read_bytes()).hexdigest()
    assert items["run grpo-s0"] == f"budget 80 fwd_bwd_equiv; config {config} (sha256 {config_sha[:16]}); " \
                                   "rewards geneval x 1"
    # the folder hash: sha256 over "relative path NUL file sha256 newline" of each file
    file_sha = hashlib.sha256(b"\x01\x02\x03").hexdigest()
    folder_sha = hashlib.sha256(f"weights.bin\0{file_sha}\n".encode()).hexdigest()
    assert items["checkpoint"] == f"{ckpt}: sha256 {folder_sha}"


def test_rewards_come_from_the_summaries_when_only_eval_folders_are_passed(experiment):
    for summary in (experiment / "grpo-s0").rglob("summary.json"):
        doc = json.loads(summary.read_text())
        doc["provenance"]["resolved_config"]["method"] = {"name": "flow_grpo", "rewards": {"geneval": 0.5}}
        summary.write_text(json.dumps(doc))
    data = collect([experiment / "grpo-s0" / "evals", experiment / "base"])  # no run.json, no config.toml
    assert data.rewards_of("grpo") == {"geneval": 0.5} and data.rewards_of("base") == {}
    assert "reward_hacking_grpo" in {f.name for f in build_figures(data)}


def test_budget_axis_falls_back_to_a_counter_every_evaluation_records(experiment):
    # the matched unit (fwd_bwd_equiv) is missing from one evaluation: the budget panel uses images instead
    summary = experiment / "sft-s0" / "evals" / "step_000010" / BENCH / "summary.json"
    doc = json.loads(summary.read_text())
    doc["model"]["budget_spent"] = {"images": 160}
    summary.write_text(json.dumps(doc))
    for other in experiment.rglob("summary.json"):
        if other != summary:
            doc = json.loads(other.read_text())
            doc["model"]["budget_spent"]["images"] = 16 * doc["model"]["step"]
            other.write_text(json.dumps(doc))
    by_budget = _figures(experiment)["curves_shapes_geneval"].figure.axes[1]
    assert by_budget.get_xlabel() == "budget spent (images)"
    assert list(by_budget.get_lines()[0].get_xdata()) == [160, 320]


def test_ten_groups_get_ten_colours_and_base_models_grey():
    from soarbench.report.collect import Provenance, ReportData
    from soarbench.report.figures import BASE_COLOR, group_colors

    groups = {f"m{i}": "sft" for i in range(10)} | {"base": "base"}
    colors = group_colors(ReportData(evals=(), train_logs=(), group_methods=groups, provenance=Provenance()))
    assert colors["base"] == BASE_COLOR
    assert len({colors[g] for g in groups if g != "base"}) == 10 and BASE_COLOR not in {colors[f"m{i}"] for i in range(10)}
