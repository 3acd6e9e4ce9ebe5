"""The harness on micro runs: counters equal the config's arithmetic, resume resumes, bad budgets are refused."""
from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize("decay", [{"decay_steps": 3}, {"decay_fraction": 0.5}])
def test_learning_rate_warms_up_holds_and_decays_linearly(tiny_model_dir, shapes_data, tmp_path, decay):
    # 6 steps, 2 of warmup and the last 3 decaying: by hand, the factors are 1/2, 1, 1, 1, 2/3, 1/3
    cfg = _cfg(tiny_model_dir, shapes_data, "sft", budget={"amount": 4 * 6}, train={"warmup_steps": 2, **decay})
    train(cfg, tmp_path / "r", log=lambda m: None)
    assert [row["lr"] for row in _log(tmp_path / "r")] == pytest.approx(
        [1e-3 * f for f in (1 / 2, 1, 1, 1, 2 / 3, 1 / 3)])


def test_decay_needs_a_known_number_of_steps_and_fits_in_them(tiny_model_dir, shapes_data, tmp_path):
    cfg = _cfg(tiny_model_dir, shapes_data, "sft", budget={"unit": "wall_s", "amount": 5}, train={"decay_steps": 3})
    with pytest.raises(UserError, match="decay_steps"):
        train(cfg, tmp_path / "r", log=lambda m: None)
    cfg = _cfg(tiny_model_dir, shapes_data, "sft", budget={"amount": 4 * 2}, train={"decay_steps": 3})
    with pytest.raises(UserError, match=r"decay_steps \(3\) is more than the budget's 2"):
        train(cfg, tmp_path / "r2", log=lambda m: None)
    cfg = _cfg(tiny_model_dir, shapes_data, "sft", budget={"amount": 4 * 2},
               train={"decay_steps": 1, "decay_fraction": 0.5})
    with pytest.raises(UserError, match="not both"):
        train(cfg, tmp_path / "r3", log=lambda m: None)


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
        assert torch.equal(p, q), name  # bit for bit: every draw is keyed, the text cache is batching-free
    la, lb = _log(tmp_path / "straight"), _log(tmp_path / "resumed")
    assert [r["step"] for r in lb] == [1, 2, 3, 4]  # step 3 was redone, and logged once
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
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


def test_a_first_phase_of_cheaper_units_is_priced_unit_by_unit():
    """Units 0 and 1 (a pre-training phase) cost 10 with 1 optimizer step, later ones 30 with 2: 100 buys
    10 + 10 + 30 + 30 = 80 (a fifth unit would reach 110), i.e. 4 units and 1 + 1 + 2 + 2 = 6 optimizer steps."""
    from soarbench.harness.budget import Budget, Counters, UnitCost
    from soarbench.harness.train import Schedule

    def cost_of(unit):
        return UnitCost(fwd_bwd=10, optimizer_steps=1) if unit < 2 else UnitCost(fwd_bwd=30, optimizer_steps=2)

    budget = Budget("fwd_bwd", 100)
    assert budget.plan_units(cost_of) == (4, 6)
    text = budget.arithmetic(cost_of(2), 1, 1, cost_of)
    assert "the first 2 epoch(s) cost 10 fwd_bwd each" in text and "-> 6 optimizer steps in 4 unit(s)" in text
    assert "(20 fwd_bwd left unspent)" in text
    sched, c, unit = Schedule(budget, cost_of, points=0), Counters(), 0
    while sched.more(c, unit):
        c.fwd_bwd += cost_of(unit).fwd_bwd
        unit += 1
    assert (unit, c.fwd_bwd) == (4, 80)


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


def _torchrun(tmp_path, method: str, port: int) -> Path:
    import os
    import subprocess
    import sys

    (tmp_path / "cfg.toml").write_text(
        f'[model]\npath = "{tmp_path.parent / "model"}"\nmax_sequence_length = 0\n'
        f'[data]\njsonl = "{tmp_path.parent / "train.jsonl"}"\n[method]\n{method}\n'
        '[train]\nseed = 5\nbatch_size = 2\nthreads = 1\ndevice = "cpu"\ncheckpoint_every = 1\n'
        '[budget]\nunit = "optimizer_steps"\namount = 2\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "soarbench", "train", "--config",
                           str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)
    # the harness compares the ranks' weights at every checkpoint: a divergence fails the run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2
    return tmp_path / "run"


@pytest.fixture()
def ddp_dir(tiny_model_dir, shapes_data, tmp_path):
    """A folder holding links to the micro model and data, so the config needs no absolute paths of fixtures."""
    (tmp_path / "model").symlink_to(tiny_model_dir)
    (tmp_path / "train.jsonl").symlink_to(shapes_data)
    (tmp_path / "images").symlink_to(shapes_data.parent / "images")
    (tmp_path / "job").mkdir()
    return tmp_path / "job"


def test_two_process_soar_keeps_replicas_in_sync_and_counts_both_ranks(ddp_dir):
    """torchrun with 2 CPU processes (gloo): explicit gradient averaging, disjoint shards, global counters."""
    run = _torchrun(ddp_dir, 'name = "soar"\ntrajectory_length = 2', 29517)
    log = _log(run)
    assert [r["step"] for r in log] == [1, 2]
    b = log[-1]["budget"]
    assert (b["fwd_bwd"], b["no_grad_fwd"]) == (2 * 2 * 2 * (1 + 2), 2 * 2 * 2)


def test_two_process_flow_grpo_starts_from_identical_lora(ddp_dir):
    """LoRA's random init differs by rank unless broadcast: the replica check would fail the run."""
    run = _torchrun(ddp_dir, 'name = "flow_grpo"\ngroup_size = 2\nbatch_size = 4\nnum_steps = 3\nlora_r = 4\n'
                             'lora_alpha = 8', 29518)
    b = _log(run)[-1]["budget"]
    assert b["images"] == 4 and b["reward_calls"] == 4  # one epoch: 2 prompts x 2 images over both ranks


def test_diverged_replicas_are_caught():
    """train.check_replicas: a process whose weights differ from the others' stops the run."""
    from soarbench.harness.engine import Engine

    class TwoRanks(Engine):
        def __init__(self, offset):
            self.offset = offset

        distributed = True
        shards_parameters = False

        def all_gather_objects(self, obj):
            return [obj, obj + self.offset]  # the other rank's parameter checksum

    with pytest.raises(RuntimeError, match="diverged"):
        TwoRanks(1.0).check_replicas([torch.ones(3)], step=7)
    TwoRanks(0.0).check_replicas([torch.ones(3)], step=7)  # equal replicas pass
