"""Flow-GRPO (arXiv 2505.05470; reference code yifan123/flow_grpo): online RL with group-relative advantages and
a clipped PPO objective.

    soarbench train --config benchmarks/shapes/flow_grpo.toml --out runs/grpo

One unit of work is an epoch:
  1. m prompts, each repeated k times (a group); CFG rollouts with the SDE step (flow_sde with noise level a, or
     cps; optionally the "Fast" window of SDE steps with ODE elsewhere), per-step log-probs in fp32. Every
     sample's initial and per-step noise is keyed by its global index in the epoch.
  2. rewards = weighted sum of raw scores from the metric registry (GenEval: partial credit), gathered over all
     processes; A = (r - group mean) / (global std + 1e-4), clipped to +-5; groups whose advantage is 0 are
     dropped, then dropped samples are put back (chosen at random) until the kept count is a multiple of
     optimizer_steps_per_epoch x slots (slots = processes x accumulation), as the reference refills;
  3. the kept samples, shuffled, split into the epoch's optimizer steps; each step's samples are dealt round-robin
     over the slots, and every (slot, trained timestep) is one micro-batch:
     ratio = exp(logp_theta - logp_old), loss = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))
     + beta * mean((mean_theta - mean_ref)^2) / (2 std^2), the reference being role "ref" (LoRA disabled).
A step's gradient is the pooled mean over its samples and timesteps, so it does not depend on how many processes
share the work (only the refill's multiple does, and only when groups are dropped).
"""
from __future__ import annotations

from dataclasses import dataclass

from soarbench.cost import UnitCost
from soarbench.methods.base import Ctx, LossOutput, Micro, RunShape
from soarbench.methods.group import Epoch, PPOMethod, PPOOptions
from soarbench.rl.advantages import group_advantages, nonzero_groups, refill_to_multiple
from soarbench.rng import keyed_generator


@dataclass(frozen=True, kw_only=True)
class FlowGRPOOptions(PPOOptions):
    global_std: bool = True
    # the reference draws every sample's start independently; init_same_noise gives a group one start (as
    # DanceGRPO does), so the rewards within a group differ only by the SDE noise the loss credits
    init_same_noise: bool = False


class FlowGRPO(PPOMethod):
    name = "flow_grpo"
    Options = FlowGRPOOptions

    def plan(self, shape: RunShape) -> UnitCost:
        """One epoch (all processes): rollouts, rewards, and the gradient passes of its optimizer steps."""
        trained = self.opt.batch_size * self.trained_steps() * self.train_cfg()
        return self.epoch_cost(shape, no_grad_fwd=trained if self.opt.beta > 0 else 0, fwd_bwd=trained)

    def advantages(self, ctx: Ctx, epoch: Epoch) -> None:
        """Group-relative advantages; groups whose advantage is 0 are dropped, then refilled at random to a
        multiple of optimizer steps x slots (the reference's refill)."""
        adv = group_advantages(epoch.rewards, epoch.groups, global_std=self.opt.global_std, clip=self.opt.adv_clip)
        nonzero = nonzero_groups(adv, epoch.groups)
        multiple = self.opt.optimizer_steps_per_epoch * ctx.shape.slots
        epoch.kept = refill_to_multiple(nonzero, multiple, keyed_generator(ctx.seed, ctx.unit, "refill"))
        epoch.advantages = adv.to(ctx.device)
        epoch.extra["nonzero"] = nonzero

    def extra_logs(self, epoch: Epoch) -> dict[str, float]:
        return {"kept_fraction": float(epoch.extra["nonzero"].float().mean())}

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        epoch, idx, _, text, column = micro.data
        return self.policy_terms(ctx, epoch, idx, text, column, epoch.advantages[idx])
