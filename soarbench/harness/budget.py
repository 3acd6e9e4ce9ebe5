"""The matched budget: what one unit of a method's work costs (its plan), what a run actually spent (the meter's
global counters), and when to stop and evaluate (the schedule).

Counters (all global, summed over ranks, at sample level):
  images           generated images (rollouts that reach a clean latent; 0 for SFT and SOAR)
  unique_prompts   distinct captions / prompts trained on
  no_grad_fwd      transformer forwards without gradient (a CFG pair counts 2)
  fwd_bwd          transformer forward+backward passes (a CFG pair counts 2)
  reward_calls     reward-model forwards without gradient, per image (0 for SFT and SOAR)
  reward_fwd_bwd   reward-model forward+backward passes, per image (differentiable rewards)
  vae_decodes      VAE decodes, per image (with or without gradient)
  value_passes     critic evaluations, per sample and state (actor-critic: each is one backbone forward, which is
                   also counted in no_grad_fwd, so fwd_bwd_equiv already prices it; 0 for every other method)
  optimizer_steps
  wall_s           measured seconds of training (evaluation and checkpoints excluded)
  device_s         wall_s times the number of devices: the GPU-seconds a run spent
  fwd_bwd_equiv    fwd_bwd + no_grad_fraction * no_grad_fwd (a forward costs about a third of forward+backward)

A method declares the cost of one unit of its work ONCE (`UnitCost`, from `Method.plan`); the meter inside the
model adapter and the reward functions counts what is actually spent; a test asserts meter == plan for every
registered method.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable

from soarbench.errors import UserError

COUNTED = ("images", "no_grad_fwd", "fwd_bwd", "reward_calls", "reward_fwd_bwd", "vae_decodes", "value_passes")
UNITS = ("images", "unique_prompts", "no_grad_fwd", "fwd_bwd", "reward_calls", "reward_fwd_bwd", "vae_decodes",
         "value_passes", "optimizer_steps", "wall_s", "device_s", "fwd_bwd_equiv")
MEASURED = ("wall_s", "device_s")  # decided while running: no unit cost can be planned in these


@dataclass
class Counters:
    images: int = 0
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
class UnitCost:
    """What one unit of a method's work spends over all ranks (a step, or an online method's epoch of
    `optimizer_steps` steps), from the config's arithmetic, before anything runs.

    `micro_batches` is the number of backward passes each rank makes per optimizer step (the engine's gradient
    accumulation); it must not change during a run."""

    images: int = 0
    unique_prompts: int = 0  # an upper bound: a unit sees at most this many new prompts
    no_grad_fwd: int = 0
    fwd_bwd: int = 0
    reward_calls: int = 0
    reward_fwd_bwd: int = 0
    vae_decodes: int = 0
    value_passes: int = 0  # critic evaluations (each also a no-grad backbone forward in no_grad_fwd)
    optimizer_steps: int = 1
    micro_batches: int = 1
    samples_per_step: int = 0  # the global batch of one optimizer step (recorded in run.json)

    def value(self, unit: str, no_grad_fraction: float) -> float:
        if unit == "fwd_bwd_equiv":
            return self.fwd_bwd + no_grad_fraction * self.no_grad_fwd
        if unit in MEASURED:
            return float("nan")
        return float(getattr(self, unit))

    def counted(self) -> dict[str, int]:
        """The per-unit amounts the meter must reproduce."""
        return {name: getattr(self, name) for name in COUNTED} | {"optimizer_steps": self.optimizer_steps}


StepCost = UnitCost  # the name of the first three methods' per-step cost


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
        if self.steps_affordable(cost_of(0)) is None:  # also refuses a budget below the first unit
            return None
        spent, units, steps = 0.0, 0, 0
        while True:
            cost = cost_of(units)
            per_unit = cost.value(self.unit, self.no_grad_fraction)
            if per_unit <= 0:
                raise UserError(f"config: unit {units} of this method's work spends no '{self.unit}'; budget it in "
                                "another unit (fwd_bwd, fwd_bwd_equiv, optimizer_steps or wall_s)")
            if spent + per_unit > self.amount * (1 + 1e-9):
                return units, steps
            spent, units, steps = spent + per_unit, units + 1, steps + cost.optimizer_steps

    def arithmetic(self, cost: UnitCost, world_size: int, accumulation: int,
                   cost_of: Callable[[int], UnitCost] | None = None) -> str:
        """What one unit of work spends and how many units the budget buys, printed before anything runs.
        `cost` is the steady-state unit; `cost_of(u)` the cost of unit u where a first phase differs."""
        cost_of = cost_of or (lambda u: cost)
        planned = self.plan_units(cost_of)
        per_unit = cost.value(self.unit, self.no_grad_fraction)
        name = "step" if cost.optimizer_steps == 1 else f"epoch ({cost.optimizer_steps} optimizer steps)"
        lines = [
            f"budget: {self.amount:g} {self.unit}",
            f"  per {name}: global batch {cost.samples_per_step} per optimizer step = {world_size} process(es) x "
            f"{accumulation} accumulation slot(s); images {cost.images}, fwd+bwd {cost.fwd_bwd}, no-grad fwd "
            f"{cost.no_grad_fwd}, reward calls {cost.reward_calls}, reward fwd+bwd {cost.reward_fwd_bwd}, "
            f"VAE decodes {cost.vae_decodes}" + (f", value passes {cost.value_passes}" if cost.value_passes else ""),
        ]
        if planned is None:
            lines.append("  steps: as many as fit in the wall-clock budget")
            return "\n".join(lines)
        units, steps = planned
        first = next((u for u in range(units) if cost_of(u) == cost), units)  # a first phase of other units
        if first:
            head = cost_of(0)
            lines.append(f"  the first {first} {name.split(' ')[0]}(s) cost "
                         f"{head.value(self.unit, self.no_grad_fraction):g} {self.unit} each (a phase of their own: "
                         f"fwd+bwd {head.fwd_bwd}, no-grad fwd {head.no_grad_fwd})")
        spent = sum(cost_of(u).value(self.unit, self.no_grad_fraction) for u in range(units))
        lines.append(f"  one {name.split(' ')[0]} = {per_unit:g} {self.unit} -> {steps} optimizer steps in {units} "
                     f"unit(s) ({self.amount - spent:g} {self.unit} left unspent)")
        return "\n".join(lines)


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
