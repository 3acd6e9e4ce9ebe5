"""Prompt sampling for online methods (data.prompt_sampling), the prompts_<tag> counts of the train log, and the
shapes world's in-distribution benchmark (shapes_train) evaluated beside the held-out one (eval.extra_benchmarks)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from soarbench import config as C
from soarbench.errors import UserError
from soarbench.harness.data import PromptData, Record
from soarbench.meter import Meter
from soarbench.worlds import shapes

SHAPES = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes"


def _records(captions_and_tags):
    return [Record(image=Path("x.png"), caption=c, bw=32, bh=32, where=f"t:{i}", geneval={"tag": t})
            for i, (c, t) in enumerate(captions_and_tags)]


def _share_of(data: PromptData, caption: str, units: int) -> float:
    hits = sum(data.prompts[p] == caption for u in range(units) for p in data.unit_prompts(u)[::data.k])
    return hits / (units * data.m)


@pytest.mark.parametrize("sampling, expected", [("records", 9 / 12), ("unique", 1 / 4)])
def test_records_draw_prompts_in_proportion_to_their_records(sampling, expected):
    # one caption with 9 records and three with 1: by records 9/12 of the draws, by unique captions 1/4
    data = PromptData(_records([("a", "single_object")] * 9 + [("b", "colors"), ("c", "colors"), ("d", "colors")]),
                      prompts_per_unit=1, group_size=2, engine=None, seed=0, sampling=sampling)
    # 4000 draws: the binomial standard deviation is at most 0.008, so 0.04 is five of them
    assert abs(_share_of(data, "a", 4000) - expected) < 0.04


def test_records_visit_every_record_once_per_pass_with_each_task_near_its_share_all_along():
    tags = ["single_object"] * 10 + ["position"] * 20 + ["colors"] * 30  # shares 1/6, 1/3, 1/2
    data = PromptData(_records([(f"p{i}", t) for i, t in enumerate(tags)]), prompts_per_unit=4, group_size=1,
                      engine=None, seed=3, sampling="records")
    drawn = [p for u in range(30) for p in data.unit_prompts(u)]  # 120 draws: two passes over 60 records
    assert sorted(drawn[:60]) == list(range(60)) and sorted(drawn[60:]) == list(range(60))
    assert drawn[:60] != drawn[60:]  # each pass is shuffled anew
    for length in range(1, 121):  # every prefix: each task within one prompt of its share
        counts = Counter(tags[p] for p in drawn[:length])
        for tag, share in (("single_object", 1 / 6), ("position", 1 / 3), ("colors", 1 / 2)):
            assert abs(counts[tag] - share * length) < 1 + 1e-9 + (length > 60), (length, tag, counts)


def test_unit_logs_count_the_tags_of_the_units_groups():
    data = PromptData(_records([(f"p{i}", shapes.TAGS[i % 6]) for i in range(60)]), prompts_per_unit=5,
                      group_size=3, engine=None, seed=7, sampling="records")
    for unit in range(4):
        ctx = SimpleNamespace(unit=unit, meter=Meter())
        share = data.next(ctx)
        # counted independently from what the rollouts receive: one tag per group (every third sample)
        by_hand = Counter(f"prompts_{m['tag']}" for m in share.metadata[::3])
        assert data.unit_logs(unit) == {k: float(v) for k, v in by_hand.items()}
        assert sum(data.unit_logs(unit).values()) == 5


def test_an_unknown_sampling_and_too_few_records_are_one_line():
    with pytest.raises(UserError, match="did you mean 'records'"):
        PromptData(_records([("a", "colors")]), 1, 1, None, 0, sampling="record")
    with pytest.raises(UserError, match="2 prompts per epoch but the data has only 1 records"):
        PromptData(_records([("a", "colors")]), 2, 1, None, 0, sampling="records")
    with pytest.raises(UserError, match="data.prompt_sampling"):
        C.validate_train_config({"model": {"path": "m"}, "data": {"jsonl": "d", "prompt_sampling": "rows"},
                                 "method": {"name": "sft"}, "budget": {"amount": 1}})


def _planned_units(cfg: dict) -> tuple[int, int, int]:
    """(units, prompts per unit, group size) of a resolved online config on one process, from its budget."""
    from soarbench.harness.budget import Budget
    from soarbench.harness.train import accumulation_steps
    from soarbench.methods import build_method
    from soarbench.methods.base import RunShape

    options = dict(cfg["method"])
    method = build_method(options.pop("name"), options)
    shape = RunShape(1, accumulation_steps(cfg["train"], 1), int(cfg["train"]["batch_size"]))
    cost = method.plan(shape)
    units, _ = Budget.from_config(cfg["budget"]).plan_units(lambda unit: method.unit_plan(shape, unit))
    return units, cost.images // method.group_size, method.group_size


@pytest.mark.parametrize("path", ["flow_grpo.toml", "flow_grpo_control.toml"])
def test_the_shipped_flow_grpo_configs_roll_out_every_task_about_equally(path):
    """Over a whole run, each GenEval task gets 1/6 +- 0.06 of the rollout prompts (the records of the generated
    data cycle the six tasks; their prompts are recomputed here without rendering a pixel)."""
    from soarbench.harness.train import resolve_config

    cfg = resolve_config(C.load_config(SHAPES / path))
    assert cfg["data"]["prompt_sampling"] == "records"
    gen = cfg["data"]["generate"]
    rows = shapes.training_rows(int(gen["n_images"]), int(gen["seed"]))
    assert Counter(r["tag"] for r in rows) == {t: len(rows) // 6 + (i < len(rows) % 6) for i, t in enumerate(shapes.TAGS)}
    records = _records([(r["prompt"], r["tag"]) for r in rows])
    units, m, k = _planned_units(cfg)
    data = PromptData(records, m, k, None, int(cfg["train"]["seed"]), sampling="records")
    counts = Counter()
    for unit in range(units):
        counts.update(data.unit_logs(unit))
    total = sum(counts.values())
    assert total == units * m
    for tag in shapes.TAGS:
        assert abs(counts[f"prompts_{tag}"] / total - 1 / 6) <= 0.06, (tag, counts)


def test_training_rows_are_the_prompts_write_training_split_writes(tmp_path):
    jsonl = shapes.write_training_split(tmp_path, n_images=30, seed=5, size=32)
    written = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows = shapes.training_rows(30, 5)
    assert [w["caption_en"] for w in written] == [r["prompt"] for r in rows]
    assert [w["tag"] for w in written] == [shapes.TAGS[i % 6] for i in range(30)]


def test_shapes_train_benchmark_holds_training_prompts_only(tmp_path):
    from soarbench.benchmarks import build_benchmark

    jsonl = shapes.write_training_split(tmp_path, n_images=60, seed=5, size=32)
    captions = {json.loads(line)["caption_en"] for line in jsonl.read_text().splitlines()}
    bench = build_benchmark("shapes_train", train_images=60, train_seed=5, n_per_tag=3)
    assert bench.name == "shapes_train" and bench.source["split"] == "train"
    assert set(bench.prompts) <= captions and len(bench.prompts) == len(set(bench.prompts))
    per_tag = Counter(row["tag"] for row in bench.metadata)
    assert all(1 <= per_tag[t] <= 3 for t in shapes.TAGS)
    # the default draw shares no prompt with the held-out split but the five single objects (one per class: a
    # single object has no combination to hold out)
    trained = build_benchmark("shapes_train")
    shared = set(trained.prompts) & set(build_benchmark("shapes").prompts)
    assert shared == {f"a photo of a {c}" for c in shapes.SHAPE_CLASSES}


def test_extra_benchmarks_are_checked_before_anything_runs():
    def cfg(extra, benchmark="shapes"):
        return {"model": {"path": "m"}, "data": {"jsonl": "d"}, "method": {"name": "sft"}, "budget": {"amount": 1},
                "eval": {"benchmark": benchmark, "extra_benchmarks": extra}}

    with pytest.raises(UserError, match="eval.extra_benchmarks.shapes_trian: unknown benchmark.*'shapes_train'"):
        C.validate_train_config(cfg({"shapes_trian": {}}))
    with pytest.raises(UserError, match="already the main benchmark"):
        C.validate_train_config(cfg({"shapes": {}}))
    with pytest.raises(UserError, match="eval.extra_benchmarks.shapes_train"):
        C.validate_train_config(cfg({"shapes_train": {"n_per_tg": 2}}))
    out = C.validate_train_config(cfg({"shapes_train": {"n_per_tag": 2}}))
    assert out["eval"]["extra_benchmarks"] == {"shapes_train": {"n_per_tag": 2}}


def test_a_flow_grpo_run_logs_its_prompt_mix_and_evaluates_both_splits(tiny_model_dir, shapes_data, tmp_path):
    import reward_plugins  # noqa: F401  (the test rewards)
    from soarbench.harness.train import train

    cfg = {"model": {"path": str(tiny_model_dir), "max_sequence_length": 0},
           "data": {"jsonl": str(shapes_data), "prompt_sampling": "records"},
           "method": {"name": "flow_grpo", "group_size": 2, "batch_size": 6, "num_steps": 2, "lora_r": 4,
                      "lora_alpha": 8, "optimizer_steps_per_epoch": 1, "rewards": {"geneval": 1.0}},
           "train": {"seed": 1, "batch_size": 6, "lr": 1e-3, "threads": 2},
           "budget": {"unit": "optimizer_steps", "amount": 2},
           "eval": {"benchmark": "shapes", "points": 1, "num_steps": 2, "batch_size": 8,
                    "benchmark_options": {"n_per_tag": 1},
                    "extra_benchmarks": {"shapes_train": {"n_per_tag": 1, "train_images": 64, "train_seed": 3}},
                    "extra_num_steps": [1]}}
    train(cfg, tmp_path / "r", log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        mix = {k: v for k, v in row.items() if k.startswith("prompts_")}
        assert sum(mix.values()) == 3 and set(mix) <= {f"prompts_{t}" for t in shapes.TAGS}
    steps = {"shapes": 2, "shapes_train": 2, "shapes@1": 1, "shapes_train@1": 1}  # the few-step endpoint: 1 step
    for bench, num_steps in steps.items():
        summary = json.loads((tmp_path / "r" / "evals" / "step_000002" / bench / "summary.json").read_text())
        assert 0 <= summary["scores"]["geneval"] <= 1
        assert summary["benchmark"]["name"] == bench and summary["sampling"]["num_steps"] == num_steps
    assert sorted(p.name for p in (tmp_path / "r" / "evals" / "step_000002").iterdir()) == sorted(steps)


def test_few_step_endpoints_are_benchmarks_of_their_own_and_checked():
    from soarbench.benchmarks import eval_benchmarks

    ecfg = {"benchmark": "shapes", "benchmark_options": {"n_per_tag": 1}, "num_steps": 40,
            "extra_benchmarks": {"shapes_train": {"n_per_tag": 1}}, "extra_num_steps": [8, 4]}
    got = [(b.name, b.num_steps) for b in eval_benchmarks(ecfg)]
    assert got == [("shapes", 40), ("shapes_train", 40), ("shapes@8", 8), ("shapes_train@8", 8), ("shapes@4", 4),
                   ("shapes_train@4", 4)]
    main, few = eval_benchmarks(ecfg)[0], eval_benchmarks(ecfg)[2]
    assert few.prompts == main.prompts and few.metadata == main.metadata  # the same prompts, fewer steps
    base = {"model": {"path": "m"}, "data": {"jsonl": "d"}, "method": {"name": "sft"}, "budget": {"amount": 1}}
    for bad, expected in (([0], "eval.extra_num_steps = \\[0\\]: expected an integer >= 1"),
                          (["8"], "eval.extra_num_steps.*an array of integers"), ([2.5], "an array of integers")):
        with pytest.raises(UserError, match=expected):
            C.validate_train_config({**base, "eval": {"benchmark": "shapes", "extra_num_steps": bad}})
    assert C.validate_train_config({**base, "eval": {"benchmark": "shapes", "extra_num_steps": [8]}})[
        "eval"]["extra_num_steps"] == [8]
