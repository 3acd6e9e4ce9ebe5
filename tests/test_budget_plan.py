"""The budget's plan is closed form: any amount is planned at once (phase by phase, not unit by unit), agrees with
a unit-by-unit walk, and an amount beyond what a run can count is refused in one line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from soarbench.errors import UserError
from soarbench.harness.budget import Budget, UnitCost

SHIPPED = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes" / "sft.toml"


def _phased(first: int, head: UnitCost, steady: UnitCost, calls: list[int]):
    def cost_of(unit: int) -> UnitCost:
        calls.append(unit)
        return head if unit < first else steady
    return cost_of


def _walk(amount: float, cost_of) -> tuple[int, int]:
    """The plan unit by unit, as the harness used to compute it."""
    spent, units, steps = 0.0, 0, 0
    while spent + cost_of(units).fwd_bwd <= amount * (1 + 1e-9):
        spent, units, steps = spent + cost_of(units).fwd_bwd, units + 1, steps + cost_of(units).optimizer_steps
    return units, steps


HEAD, STEADY = UnitCost(fwd_bwd=3, optimizer_steps=1), UnitCost(fwd_bwd=16, optimizer_steps=2)


@pytest.mark.parametrize("amount", [16, 17, 31, 32, 33, 100, 4999])
def test_the_closed_form_plan_equals_the_unit_by_unit_walk(amount):
    for first in (0, 1, 4, 40):
        cost_of = _phased(first, HEAD, STEADY, [])
        assert Budget("fwd_bwd", amount).plan_units(cost_of) == _walk(amount, cost_of), (amount, first)


def test_a_huge_budget_is_planned_with_a_few_dozen_cost_calls():
    calls: list[int] = []
    budget = Budget("fwd_bwd", 1e15)
    # 5 first-phase units of 3, then floor((1e15 (1 + 1e-9) - 15) / 16) = 62500000062499 steady units of 2 steps
    # each (the schedule's relative tolerance of 1e-9, which the run itself applies when it stops)
    assert budget.plan_units(_phased(5, HEAD, STEADY, calls)) == (5 + 62500000062499, 5 + 2 * 62500000062499)
    assert len(calls) < 200
    calls.clear()
    text = budget.arithmetic(STEADY, 1, 1, _phased(5, HEAD, STEADY, calls))
    assert "the first 5 epoch(s) cost 3 fwd_bwd each" in text and "-> 125000000125003 optimizer steps" in text
    assert len(calls) < 400


def test_an_amount_beyond_what_a_run_can_count_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"^config: budget.amount = 1e\+18 fwd_bwd buys 6.25e\+16 units of work "
                                        r"\(16 fwd_bwd each\), more than the 2\*\*53"):
        Budget("fwd_bwd", 1e18).plan_units(lambda u: STEADY)


def test_train_with_an_absurd_budget_answers_at_once(tmp_path):
    # it used to walk the budget unit by unit: 689 s without a word; now the refusal comes before anything loads
    proc = subprocess.run([sys.executable, "-m", "soarbench", "train", "--config", str(SHIPPED), "--set",
                           "budget.amount=1e18", "--set", f"data.jsonl={tmp_path / 'd' / 'train.jsonl'}",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: config: budget.amount = 1e+18")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists() and not (tmp_path / "run").exists()


def test_matched_data_passes_budget_the_training_images_a_method_learns_from():
    """data_images counts one per data sample drawn: SFT's budget in it buys amount / global batch steps, SOAR at
    matched compute (fwd_bwd_equiv) sees the images its ~7x dearer step affords, an online method none."""
    from soarbench.methods import build_method
    from soarbench.methods.base import RunShape

    shape = RunShape(world_size=2, accumulation=2, batch_size=4)  # a global batch of 16
    sft = build_method("sft", {}).plan(shape)
    soar = build_method("soar", {"trajectory_length": 6, "num_rollout_paths": 1}).plan(shape)
    assert (sft.data_images, soar.data_images) == (16, 16)
    assert Budget("data_images", 1520).plan_units(lambda u: sft) == (95, 95)
    # SOAR's step: 16 main + 6 x 16 correction passes (fwd+bwd) + 16 no-grad rollout forwards
    per_step = 16 + 6 * 16 + 16 / 3
    steps = int(11200 // per_step)
    assert Budget("fwd_bwd_equiv", 11200, 1 / 3).plan_units(lambda u: soar) == (steps, steps) == (95, 95)
    grpo = build_method("flow_grpo", {"group_size": 4, "batch_size": 16}).plan(shape)
    assert grpo.data_images == 0
    with pytest.raises(UserError, match="spends no 'data_images'"):
        Budget("data_images", 1520).plan_units(lambda u: grpo)
