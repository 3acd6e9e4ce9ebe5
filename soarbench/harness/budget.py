"""The matched budget: exact counters of what a run spends, and the declared amount each method may spend.

Counters (all global, summed over ranks, at sample level):
  images          generated images (rollouts that reach an image; 0 for SFT and SOAR)
  unique_prompts  distinct captions / prompts trained on
  no_grad_fwd     transformer forwards without gradient (a CFG pair counts 2)
  fwd_bwd         transformer forward+backward passes (a CFG pair counts 2)
  reward_calls    reward-model calls (0 for SFT and SOAR)
  optimizer_steps
  wall_s          measured seconds of training (evaluation excluded)
  fwd_bwd_equiv   fwd_bwd + no_grad_fraction * no_grad_fwd (a forward costs about a third of forward+backward)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from soarbench.errors import UserError

UNITS = ("images", "unique_prompts", "no_grad_fwd", "fwd_bwd", "reward_calls", "optimizer_steps", "wall_s",
         "fwd_bwd_equiv")


@dataclass
class Counters:
    images: int = 0
    unique_prompts: int = 0
    no_grad_fwd: int = 0
    fwd_bwd: int = 0
    reward_calls: int = 0
    optimizer_steps: int = 0
    wall_s: float = 0.0
    no_grad_fraction: float = 1 / 3
    _seen: set = field(default_factory=set, repr=False)

    @property
    def fwd_bwd_equiv(self) -> float:
        return self.fwd_bwd + self.no_grad_fraction * self.no_grad_fwd

    def add_prompts(self, prompts) -> None:
        self._seen.update(prompts)
        self.unique_prompts = len(self._seen)

    def value(self, unit: str) -> float:
        return float(getattr(self, unit))

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k != "no_grad_fraction"}
        d["fwd_bwd_equiv"] = self.fwd_bwd_equiv
        return d

    def state_dict(self) -> dict:
        return {**self.as_dict(), "seen": sorted(self._seen), "no_grad_fraction": self.no_grad_fraction}

    @classmethod
    def from_state(cls, state: dict) -> "Counters":
        c = cls(**{k: state[k] for k in ("images", "unique_prompts", "no_grad_fwd", "fwd_bwd", "reward_calls",
                                          "optimizer_steps", "wall_s", "no_grad_fraction")})
        c._seen = set(state.get("seen", []))
        return c


@dataclass
class StepCost:
    """What one optimizer step spends, from the config's arithmetic (global, all ranks)."""

    images: int = 0
    unique_prompts: int = 0  # an upper bound: a step sees at most this many new prompts
    no_grad_fwd: int = 0
    fwd_bwd: int = 0
    reward_calls: int = 0
    optimizer_steps: int = 1

    def value(self, unit: str, no_grad_fraction: float) -> float:
        if unit == "fwd_bwd_equiv":
            return self.fwd_bwd + no_grad_fraction * self.no_grad_fwd
        if unit == "wall_s":
            return float("nan")
        return float(getattr(self, unit))


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

    def steps_affordable(self, cost: StepCost) -> int | None:
        """Whole steps the budget buys (None for wall-clock budgets, decided while running)."""
        per_step = cost.value(self.unit, self.no_grad_fraction)
        if math.isnan(per_step):
            return None
        if per_step <= 0:
            raise UserError(f"config: a step of this method spends no '{self.unit}'; budget it in another unit "
                            f"(fwd_bwd, fwd_bwd_equiv, optimizer_steps or wall_s)")
        steps = int(math.floor(self.amount / per_step + 1e-9))
        if steps < 1:
            raise UserError(f"config: budget.amount = {self.amount:g} {self.unit} cannot buy one whole step "
                            f"(one step costs {per_step:g} {self.unit})")
        return steps

    def arithmetic(self, cost: StepCost, world_size: int, batch_per_rank: int) -> str:
        """What one unit of work (a step, or an online method's epoch of optimizer steps) spends, and how
        many units the budget buys."""
        units = self.steps_affordable(cost)
        per_unit = cost.value(self.unit, self.no_grad_fraction)
        name = "step" if cost.optimizer_steps == 1 else f"epoch ({cost.optimizer_steps} optimizer steps)"
        lines = [
            f"budget: {self.amount:g} {self.unit}",
            f"  per {name}: {world_size} rank(s) x batch {batch_per_rank}; images {cost.images}, "
            f"fwd+bwd {cost.fwd_bwd}, no-grad fwd {cost.no_grad_fwd}, reward calls {cost.reward_calls}",
        ]
        if units is None:
            lines.append("  steps: as many as fit in the wall-clock budget")
        else:
            left = self.amount - units * per_unit
            lines.append(f"  one {name.split(' ')[0]} = {per_unit:g} {self.unit} -> {units * cost.optimizer_steps} "
                         f"optimizer steps ({left:g} {self.unit} left unspent)")
        return "\n".join(lines)
