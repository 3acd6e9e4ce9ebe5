"""The matched budget: what one unit of a method's work costs (its plan), what a run actually spent (the meter's
global counters), and when to stop and evaluate (the schedule).

The counters and a unit's cost (`UnitCost`, what a method declares in its plan) are in soarbench/cost.py.

A method declares the cost of one unit of its work ONCE (`UnitCost`, from `Method.plan`); the meter inside the
model adapter and the reward functions counts what is actually spent; a test asserts meter == plan for every
registered method.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from soarbench.cost import COUNTED, MEASURED, UNITS, StepCost, UnitCost  # noqa: F401 (the budget's names)
from soarbench.errors import UserError


@dataclass
class Counters:
    images: int = 0
    data_images: int = 0
    unique_prompts: int = 0
    no_grad_fwd: int = 0
    fwd_bwd: int = 0
    reward_calls: int = 0
    reward_fwd_bwd: int = 0
    vae_decodes: int = 0
    value_passes: int = 0
    optimizer_steps: int = 0
    wall_s: float = 0.0
    devices: int = 1
    no_grad_fraction: float = 1 / 3
    _seen: set = field(default_factory=set, repr=False)

    @property
    def fwd_bwd_equiv(self) -> float:
        return self.fwd_bwd + self.no_grad_fraction * self.no_grad_fwd

    @property
    def device_s(self) -> float:
        return self.wall_s * self.devices

    def add(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            setattr(self, name, getattr(self, name) + int(n))

    def add_prompts(self, prompts) -> None:
        self._seen.update(prompts)
        self.unique_prompts = len(self._seen)

    def value(self, unit: str) -> float:
        return float(getattr(self, unit))

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k not in ("no_grad_fraction",
                                                                                          "devices")}
        d["fwd_bwd_equiv"] = self.fwd_bwd_equiv
        d["device_s"] = self.device_s
        return d

    def state_dict(self) -> dict:
        return {**self.as_dict(), "seen": sorted(self._seen), "no_grad_fraction": self.no_grad_fraction,
                "devices": self.devices}

    @classmethod
    def from_state(cls, state: dict) -> "Counters":
        names = [f.name for f in fields(cls) if not f.name.startswith("_")]
        c = cls(**{k: state[k] for k in names if k in state})
        c._seen = set(state.get("seen", []))
        return c


@dataclass
class Budget:
    unit: str
    amount: float
    no_grad_fraction: float = 1 / 3

    @classmethod
    def from_config(cls, section: dict) -> "Budget":
        unit = section.get("unit", "fwd_bwd")
        if unit not in UNITS:
            from soarbench.errors import did_you_mean

            raise did_you_mean("budget unit", unit, UNITS)
        if "amount" not in section:
            raise UserError("config: [budget] needs 'amount' (how much of the unit each method may spend)")
        amount = float(section["amount"])
        if not amount > 0:
            raise UserError(f"config: budget.amount must be > 0, got {section['amount']}")
        return cls(unit=unit, amount=amount, no_grad_fraction=float(section.get("no_grad_fraction", 1 / 3)))

    def steps_affordable(self, cost: UnitCost) -> int | None:
        """Whole units the budget buys (None for wall-clock budgets, decided while running)."""
        per_unit = cost.value(self.unit, self.no_grad_fraction)
        if math.isnan(per_unit):
            return None
        if per_unit <= 0:
            raise UserError(f"config: a unit of this method's work spends no '{self.unit}'; budget it in another "
                            f"unit (fwd_bwd, fwd_bwd_equiv, optimizer_steps or wall_s)")
        units = int(math.floor(self.amount / per_unit + 1e-9))
        if units < 1:
            raise UserError(f"config: budget.amount = {self.amount:g} {self.unit} cannot buy one whole step "
                            f"(one {'step' if cost.optimizer_steps == 1 else 'epoch'} costs {per_unit:g} "
                            f"{self.unit})")
        return units

    def plan_units(self, cost_of: Callable[[int], UnitCost]) -> tuple[int, int] | None:
        """(units, optimizer steps) the budget buys when unit u (0-based) costs cost_of(u); None for wall-clock
        budgets. A method with a phase of its own (e.g. value pre-training) costs less per unit there."""
        plan = self._plan(cost_of)
        return None if plan is None else (plan.units, plan.steps)

    def _plan(self, cost_of: Callable[[int], UnitCost]) -> "_Plan | None":
        """The plan in closed form, phase by phase: a method's unit cost is constant within a phase (a first phase
        of its own, then the steady state), so each phase buys floor(left / per unit) units at once, and a phase's
        end is found by bisection (a few dozen calls of cost_of, whatever the amount). Walking unit by unit, a
        budget of 1e18 planned for hours before printing anything."""
        if self.steps_affordable(cost_of(0)) is None:  # also refuses a budget below the first unit
            return None
        limit = self.amount * (1 + 1e-9)
        spent, units, steps = 0.0, 0, 0
        while True:
            cost = cost_of(units)
            per_unit = cost.value(self.unit, self.no_grad_fraction)
            if per_unit <= 0:
                raise UserError(f"config: unit {units} of this method's work spends no '{self.unit}'; budget it in "
                                "another unit (fwd_bwd, fwd_bwd_equiv, optimizer_steps or wall_s)")
            afford = math.floor((limit - spent) / per_unit)
            if afford > MAX_PLANNED_UNITS:
                raise UserError(f"config: budget.amount = {self.amount:g} {self.unit} buys {afford:.3g} units of work "
                                f"({per_unit:g} {self.unit} each), more than the 2**53 a run can count exactly: give "
                                f"an amount a run can spend")
            for _ in range(3):  # floor() of a quotient can round a unit past the limit: never plan one over it
                if afford > 0 and spent + afford * per_unit > limit:
                    afford -= 1
            if afford <= 0:
                return _Plan(units, steps, spent)
            run = _same_cost_run(cost_of, units, cost, afford)
            spent, units, steps = spent + run * per_unit, units + run, steps + run * cost.optimizer_steps

    def arithmetic(self, cost: UnitCost, world_size: int, accumulation: int,
                   cost_of: Callable[[int], UnitCost] | None = None) -> str:
        """What one unit of work spends and how many units the budget buys, printed before anything runs.
        `cost` is the steady-state unit; `cost_of(u)` the cost of unit u where a first phase differs."""
        cost_of = cost_of or (lambda u: cost)
        planned = self._plan(cost_of)
        per_unit = cost.value(self.unit, self.no_grad_fraction)
        name = "step" if cost.optimizer_steps == 1 else f"epoch ({cost.optimizer_steps} optimizer steps)"
        lines = [
            f"budget: {self.amount:g} {self.unit}",
            f"  per {name}: global batch {cost.samples_per_step} per optimizer step = {world_size} process(es) x "
            f"{accumulation} accumulation slot(s); images {cost.images}, data images {cost.data_images}, fwd+bwd "
            f"{cost.fwd_bwd}, no-grad fwd {cost.no_grad_fwd}, reward calls {cost.reward_calls}, reward fwd+bwd "
            f"{cost.reward_fwd_bwd}, VAE decodes {cost.vae_decodes}"
            + (f", value passes {cost.value_passes}" if cost.value_passes else ""),
        ]
        if planned is None:
            lines.append("  steps: as many as fit in the wall-clock budget")
            return "\n".join(lines)
        units, steps = planned.units, planned.steps
        first = _first_unit_costing(cost_of, cost, units)  # a first phase of other units
        if first:
            head = cost_of(0)
            lines.append(f"  the first {first} {name.split(' ')[0]}(s) cost "
                         f"{head.value(self.unit, self.no_grad_fraction):g} {self.unit} each (a phase of their own: "
                         f"fwd+bwd {head.fwd_bwd}, no-grad fwd {head.no_grad_fwd})")
        lines.append(f"  one {name.split(' ')[0]} = {per_unit:g} {self.unit} -> {steps} optimizer steps in {units} "
                     f"unit(s) ({self.amount - planned.spent:g} {self.unit} left unspent)")
        return "\n".join(lines)


# More units than this and the float counters stop counting units exactly (2**53): no such run can be meant.
MAX_PLANNED_UNITS = 2**53


@dataclass(frozen=True)
class _Plan:
    units: int
    steps: int
    spent: float  # what the planned units spend, in the budget's unit


def _same_cost_run(cost_of: Callable[[int], UnitCost], start: int, cost: UnitCost, most: int) -> int:
    """How many units from `start` (at most `most`; unit `start` costs `cost`) cost `cost`: a phase, once left,
    does not return, so its end is found by bisection."""
    if cost_of(start + most - 1) == cost:
        return most
    low, high = 1, most - 1  # the run is at least `low` and at most `high` units long
    while low < high:
        mid = (low + high + 1) // 2
        if cost_of(start + mid - 1) == cost:
            low = mid
        else:
            high = mid - 1
    return low


def _first_unit_costing(cost_of: Callable[[int], UnitCost], cost: UnitCost, units: int) -> int:
    """The first of `units` units that costs `cost` (the steady state), or `units` when none does; by bisection,
    the steady state being a suffix."""
    if not units or cost_of(units - 1) != cost:
        return units
    low, high = 0, units - 1
    while low < high:
        mid = (low + high) // 2
        if cost_of(mid) == cost:
            high = mid
        else:
            low = mid + 1
    return low


class Schedule:
    """When to stop and when to evaluate, both read off the budget actually spent.

    A run continues while the next unit of work still fits, using the plan's per-unit cost (an upper bound where
    samples can be dropped, so Flow-GRPO spends what its dropped groups saved on further epochs). Evaluations
    fall where the spent budget first reaches 1/points .. 1 of the amount, so methods with different step costs
    are compared at the same budget fractions, and at the end.
    """

    def __init__(self, budget: Budget, cost: UnitCost | Callable[[int], UnitCost], points: int):
        self.budget, self.points = budget, max(int(points), 0)
        self.cost_of = cost if callable(cost) else (lambda unit: cost)

    def more(self, counters: Counters, unit: int = 0) -> bool:
        """Whether unit `unit` (0-based; its cost may differ in a first phase) still fits."""
        spent = counters.value(self.budget.unit)
        per_unit = self.cost_of(unit).value(self.budget.unit, self.budget.no_grad_fraction)
        if math.isnan(per_unit):
            return spent < self.budget.amount
        return spent + per_unit <= self.budget.amount * (1 + 1e-9)

    def thresholds_passed(self, spent: float) -> int:
        return sum(spent >= self.budget.amount * k / self.points * (1 - 1e-9) for k in range(1, self.points + 1))
