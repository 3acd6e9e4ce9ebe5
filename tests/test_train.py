"""The harness on micro runs: counters equal the config's arithmetic, resume resumes, bad budgets are refused."""
from __future__ import annotations

import json

import pytest
import torch

from soarbench.errors import UserError
from soarbench.harness.train import train
from soarbench.models import SD3Adapter


def _cfg(model_dir, data, method_name, **over):
    cfg = {"model": {"path": str(model_dir), "max_sequence_length": 0},
           "data": {"jsonl": str(data)},
           "method": {"name": method_name},
           "train": {"seed": 3, "batch_size": 4, "lr": 1e-3, "threads": 2},
           "budget": {"unit": "fwd_bwd", "amount": 0}}
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_sft_counters_equal_the_arithmetic(tiny_model_dir, shapes_data, tmp_path):
    cfg = _cfg(tiny_model_dir, shapes_data, "sft", budget={"amount": 4 * 5 + 3})  # buys 5 steps of 4
    train(cfg, tmp_path / "r", log=lambda m: None)
    last = _log(tmp_path / "r")[-1]
    assert last["step"] == 5
    b = last["budget"]
    assert (b["fwd_bwd"], b["no_grad_fwd"], b["images"], b["reward_calls"], b["optimizer_steps"]) == (20, 0, 0, 0, 5)
    assert 1 <= b["unique_prompts"] <= 20
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["budget"]["steps"] == 5 and run["budget"]["per_step"]["fwd_bwd"] == 4


def test_soar_counters_equal_the_arithmetic(tiny_model_dir, shapes_data, tmp_path):
    L, B, steps = 2, 4, 3
    cfg = _cfg(tiny_model_dir, shapes_data, "soar", method={"trajectory_length": L},
               budget={"unit": "fwd_bwd_equiv", "amount": steps * (B * (1 + L) + B / 3), "no_grad_fraction": 1 / 3})
    train(cfg, tmp_path / "r", log=lambda m: None)
    log = _log(tmp_path / "r")
    assert [r["step"] for r in log] == [1, 2, 3]
    b = log[-1]["budget"]
    assert (b["fwd_bwd"], b["no_grad_fwd"]) == (steps * B * (1 + L), steps * B)
    assert b["fwd_bwd_equiv"] == pytest.approx(steps * (B * (1 + L) + B / 3))
    assert all(r["loss_aux"] > 0 and r["aux_points"] == B * L for r in log)


def test_resume_continues_exactly(tiny_model_dir, shapes_data, tmp_path):
    base = _cfg(tiny_model_dir, shapes_data, "soar", method={"trajectory_length": 1},
                budget={"unit": "optimizer_steps", "amount": 4})
    train(base, tmp_path / "straight", log=lambda m: None)
    half = {**base, "train": {**base["train"], "checkpoint_every": 2}}
    # stop after 2 steps (a smaller budget), then resume the same folder under the full budget
    train({**half, "budget": {"unit": "optimizer_steps", "amount": 3}}, tmp_path / "resumed", log=lambda m: None)
    # as if the process died after step 3: its checkpoint is lost, its log line is not
    import shutil

    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_000003")
    train(half, tmp_path / "resumed", resume=True, log=lambda m: None)
    a = SD3Adapter.from_pretrained(tmp_path / "straight" / "checkpoints" / "step_000004", max_sequence_length=0)
    b = SD3Adapter.from_pretrained(tmp_path / "resumed" / "checkpoints" / "step_000004", max_sequence_length=0)
    for (name, p), q in zip(a.transformer.named_parameters(), b.transformer.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    la, lb = _log(tmp_path / "straight"), _log(tmp_path / "resumed")
    assert [r["step"] for r in lb] == [1, 2, 3, 4]  # step 3 was redone, and logged once
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)
    assert la[-1]["budget"]["fwd_bwd"] == lb[-1]["budget"]["fwd_bwd"]


def test_budget_smaller_than_one_step_is_refused(tiny_model_dir, shapes_data, tmp_path):
    cfg = _cfg(tiny_model_dir, shapes_data, "soar", budget={"amount": 10})
    with pytest.raises(UserError, match="cannot buy one whole step"):
        train(cfg, tmp_path / "r", log=lambda m: None)


def test_existing_run_is_not_overwritten(tiny_model_dir, shapes_data, tmp_path):
    cfg = _cfg(tiny_model_dir, shapes_data, "sft", budget={"amount": 4})
    train(cfg, tmp_path / "r", log=lambda m: None)
    before = (tmp_path / "r" / "train_log.jsonl").read_text()
    with pytest.raises(UserError, match="--resume"):
        train(cfg, tmp_path / "r", log=lambda m: None)
    assert (tmp_path / "r" / "train_log.jsonl").read_text() == before


def test_schedule_stops_when_the_next_unit_does_not_fit_and_evaluates_at_budget_fractions():
    from soarbench.harness.budget import Budget, Counters, StepCost
    from soarbench.harness.train import Schedule

    sched = Schedule(Budget("fwd_bwd", 100), StepCost(fwd_bwd=30), points=4)
    c = Counters()
    passed = []
    while sched.more(c):
        c.fwd_bwd += 30
        passed.append(sched.thresholds_passed(c.fwd_bwd))
    assert c.fwd_bwd == 90 and passed == [1, 2, 3]  # 25, 50, 75 crossed; 100 not reachable in whole units


def test_training_evaluates_at_each_quarter_of_the_budget(tiny_model_dir, shapes_data, tmp_path):
    cfg = _cfg(tiny_model_dir, shapes_data, "sft", budget={"amount": 4 * 8},
               eval={"benchmark": "shapes", "points": 4, "num_steps": 2, "batch_size": 64,
                     "benchmark_options": {"n_per_tag": 1}})
    train(cfg, tmp_path / "r", log=lambda m: None)
    evals = sorted(p.parent.parent.name for p in (tmp_path / "r" / "evals").glob("*/shapes/summary.json"))
    assert evals == ["step_000002", "step_000004", "step_000006", "step_000008"]
    summary = json.loads((tmp_path / "r" / "evals" / "step_000004" / "shapes" / "summary.json").read_text())
    assert summary["model"]["budget_spent"]["fwd_bwd"] == 16 and summary["label"] == "sft@4"
    assert (tmp_path / "r" / "done.json").is_file()


def test_two_process_run_keeps_replicas_in_sync_and_counts_both_ranks(tiny_model_dir, shapes_data, tmp_path):
    """torchrun with 2 CPU processes (gloo): explicit gradient averaging, disjoint shards, global counters."""
    import os
    import subprocess
    import sys

    (tmp_path / "cfg.toml").write_text(
        f'[model]\npath = "{tiny_model_dir}"\nmax_sequence_length = 0\n[data]\njsonl = "{shapes_data}"\n'
        '[method]\nname = "soar"\ntrajectory_length = 2\n[train]\nseed = 5\nbatch_size = 2\nthreads = 1\n'
        'device = "cpu"\ncheckpoint_every = 1\n[budget]\nunit = "optimizer_steps"\namount = 3\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "soarbench", "train", "--config", str(tmp_path / "cfg.toml"),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a divergence between the ranks would fail the run
    log = _log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3]
    b = log[-1]["budget"]
    assert (b["fwd_bwd"], b["no_grad_fwd"]) == (3 * 2 * 2 * (1 + 2), 3 * 2 * 2)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2


def test_diverged_replicas_are_caught():
    from soarbench.harness.distributed import World
    from soarbench.harness.train import _check_replicas

    class TwoRanks(World):
        def all_gather_objects(self, obj):
            return [obj, obj + 1.0]  # the other rank holds different weights

    with pytest.raises(RuntimeError, match="diverged"):
        _check_replicas(TwoRanks(rank=0, world_size=2), [torch.ones(3)], step=7)
    _check_replicas(World(), [torch.ones(3)], step=7)  # single process: nothing to compare
