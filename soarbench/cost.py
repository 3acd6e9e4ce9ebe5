"""What a run spends, counter by counter, and what one unit of a method's work costs (part of the method
contract: a method's `plan` returns a `UnitCost`; soarbench/harness/budget.py plans and schedules with it).

Counters (all global, summed over ranks, at sample level):
  images           generated images (rollouts that reach a clean latent; 0 for SFT and SOAR)
  data_images      training-set images learned from (one per data sample drawn: SFT, SOAR, SePPO; 0 for the
                   online methods, which learn from their own rollouts); "matched data passes" budgets in it
  unique_prompts   distinct captions / prompts trained on
  no_grad_fwd      transformer forwards without gradient (a CFG pair counts 2)
  fwd_bwd          transformer forward+backward passes (a CFG pair counts 2)
  reward_calls     reward-model forwards without gradient, per image (0 for SFT and SOAR)
  reward_fwd_bwd   reward-model forward+backward passes, per image (differentiable rewards)
  vae_decodes      VAE decodes, per image (with or without gradient)
  value_passes     critic evaluations, per sample and state (actor-critic: each is one backbone forward, also
                   counted in no_grad_fwd, or in fwd_bwd when it trains the diffusion critic's own adapter, so
                   fwd_bwd_equiv already prices it; 0 for every other method)
  optimizer_steps
  wall_s           measured seconds of training (evaluation and checkpoints excluded)
  device_s         wall_s times the number of devices: the GPU-seconds a run spent
  fwd_bwd_equiv    fwd_bwd + no_grad_fraction * no_grad_fwd (a forward costs about a third of forward+backward)
"""
from __future__ import annotations

from dataclasses import dataclass

COUNTED = ("images", "data_images", "no_grad_fwd", "fwd_bwd", "reward_calls", "reward_fwd_bwd", "vae_decodes",
           "value_passes")
UNITS = ("images", "data_images", "unique_prompts", "no_grad_fwd", "fwd_bwd", "reward_calls", "reward_fwd_bwd",
         "vae_decodes", "value_passes", "optimizer_steps", "wall_s", "device_s", "fwd_bwd_equiv")
MEASURED = ("wall_s", "device_s")  # decided while running: no unit cost can be planned in these


@dataclass
class UnitCost:
    """What one unit of a method's work spends over all ranks (a step, or an online method's epoch of
    `optimizer_steps` steps), from the config's arithmetic, before anything runs.

    `micro_batches` is the number of backward passes each rank makes per optimizer step (the engine's gradient
    accumulation); it must not change during a run."""

    images: int = 0
    data_images: int = 0
    unique_prompts: int = 0  # an upper bound: a unit sees at most this many new prompts
    no_grad_fwd: int = 0
    fwd_bwd: int = 0
    reward_calls: int = 0
    reward_fwd_bwd: int = 0
    vae_decodes: int = 0
    value_passes: int = 0  # critic evaluations (each also a backbone pass in no_grad_fwd or fwd_bwd)
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
