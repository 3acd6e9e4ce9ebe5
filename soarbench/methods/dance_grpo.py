"""DanceGRPO (arXiv 2505.07818; reference code XueZeyue/DanceGRPO, fastvideo/train_grpo_flux.py): GRPO on an SDE
sampler, with one shared initial noise per group, a random subset of timesteps, and no KL or reference model.

    soarbench train --config benchmarks/shapes/dance_grpo.toml --out runs/dance

One unit of work is an epoch:
  1. m prompts, each repeated k times (a group). Rollouts on the grid s_0..s_N = shift(linspace(1, 0, N + 1))
     (shift 3, N = 16; `sigma_grid = "scheduler"` uses the scheduler's own sampling sigmas instead) with the
     "dance" SDE step of soarbench.sampling.sde (D = s_i - s_{i+1}, eta = 0.3):
         x0_hat = x - s_i v;  score = -(x - (1 - s_i) x0_hat) / s_i^2
         x' = x - D v + eta^2 D score / 2 + eta sqrt(D) eps,      log p = mean over elements of log N(x'; mean, std^2)
     The last transition is never trained, and the image decoded is that step's x0_hat (the reference's
     `pred_original`), so the last step is taken as the deterministic Euler step to sigma 0, which is the same
     thing. With `init_same_noise` (default) every sample of a group starts from the SAME initial noise, keyed by
     (seed, epoch, group): the reference shares one draw per process and sampling call; keying it by group keeps
     the "same start within a group" that makes the group comparison about the SDE noise alone, and keeps the run
     independent of how many processes share the groups. Per-step noise is keyed per sample.
  2. rewards (weighted raw scores from the metric registry), gathered over processes;
     A = clip((r - mean_g) / (std_g + 1e-8), -5, 5), std_g the unbiased std of the group (no sample is dropped).
  3. each sample trains a random subset of its first N - 1 transitions: a permutation keyed by (seed, epoch,
     sample), its first int((N - 1) x timestep_fraction) entries (9 of 15). The samples, shuffled, split into
     `optimizer_steps_per_epoch` steps, dealt round-robin over the slots; every (slot, trained column) is one
     micro-batch with PPO-clip loss max(-A ratio, -A clip(ratio, 1 - 1e-4, 1 + 1e-4)) pooled over samples and
     timesteps (the reference's division by accumulation x trained timesteps). There is no KL term and no
     reference forward. Only the first step of an epoch is strictly on-policy (ratio exactly 1).
LoRA (default, r 32) or full fine-tuning (`lora = false`, the reference's FLUX recipe); optional EMA for evaluation:
`ema_schedule = "step"` folds the weights in every `ema_every` optimizer steps with the warm-up decay
min((1 + k) / (10 + k), ema_decay); `"epoch"` is the reference's (train_grpo_flux.py, FSDP_EMA): the constant
`ema_decay` (0.995) once per epoch, after its last optimizer step. `round_timestep = true` feeds the model the
reference's timestep int(sigma * 1000) / 1000 in the rollouts and the recomputation alike (train_grpo_flux.py);
the SDE arithmetic keeps the exact sigmas.

Each epoch's distinct prompts are encoded once and the same embeddings serve the rollouts and the recomputation,
and `rollout_batch_size` (0: a process's whole share per sampling call; the reference uses 1) lets the rollouts run
in the training micro-batch's size: with kernels whose rounding depends on the batch, that keeps the ratio of an
epoch's first step at exactly 1 under bf16. Logged per step: policy_loss, approx_kl (0.5 mean log-ratio^2),
clipfrac, ratio_dev (mean |ratio - 1|, 0 on-policy), reward_mean, reward_std and reward_<metric>.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from soarbench.cost import UnitCost
from soarbench.errors import UserError, did_you_mean
from soarbench.methods.base import Ctx, LossOutput, Micro, RunShape, log_pair
from soarbench.methods.group import (Epoch, GroupOptions, GroupRollout, ppo_logs, trained_timesteps,
                                     training_guidance)
from soarbench.models.roles import Roles
from soarbench.rl.advantages import group_zscore
from soarbench.models.lora import EMA
from soarbench.rl.ppo import ppo_step
from soarbench.rl.rollout import Trajectory, initial_noise, sde_rollout  # initial_noise: DanceGRPO's shared start
from soarbench.sampling.ode import sampling_sigmas
from soarbench.sampling.sde import SDE_VARIANTS

__all__ = ["DanceGRPO", "ConstantEMA", "dance_sigmas", "initial_noise", "rounded_timesteps", "trained_timesteps"]

SIGMA_GRIDS = ("linspace", "scheduler")
EMA_SCHEDULES = ("step", "epoch")


class ConstantEMA(EMA):
    """The reference's EMA: e <- d e + (1 - d) p with the constant d = decay (no warm-up)."""

    def decay_at(self, step: int) -> float:
        return self.decay


def reference_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The reference's model input int(sigma * 1000) / 1000, in float32 as it computes it (sigma >= 0)."""
    return torch.floor(sigma.float() * 1000) / 1000


def rounded_timesteps(velocity):
    """`velocity` fed the reference's rounded timestep: the rollout and the recomputation round alike, while the
    SDE step's arithmetic keeps the exact sigma."""
    def rounded(z, sigma, text):
        return velocity(z, reference_timestep(sigma).to(sigma.device), text)
    return rounded


def dance_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """(N + 1,) fp32: shift t / (1 + (shift - 1) t) at t = linspace(1, 0, N + 1), the reference's `sd3_time_shift`."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


@dataclass(frozen=True, kw_only=True)
class DanceGRPOOptions(GroupOptions):
    group_size: int = 12
    batch_size: int = 48
    num_steps: int = 16
    eta: float = 0.3
    sde_type: str = "dance"
    sigma_grid: str = "linspace"
    shift: float = 3.0
    init_same_noise: bool = True
    clip_range: float = 1e-4
    adv_eps: float = 1e-8
    timestep_fraction: float = 0.6
    optimizer_steps_per_epoch: int = 1
    cfg_train: bool = True  # false: train the conditional velocity alone (ratios then start off 1)
    ema: bool = False
    ema_decay: float = 0.995
    ema_every: int = 1
    # images per sampling call; 0: this process's whole share at once. The reference samples one at a time and
    # trains one at a time; equal batch sizes keep bf16 ratios at exactly 1 where kernels depend on the batch.
    rollout_batch_size: int = 0
    ema_schedule: str = "step"
    round_timestep: bool = False

    min_group_why = "(the unbiased std of a group of one is undefined)"

    def check(self) -> None:
        super().check()
        if self.sde_type not in SDE_VARIANTS:
            raise did_you_mean("[method] sde_type", str(self.sde_type), SDE_VARIANTS)
        if self.sigma_grid not in SIGMA_GRIDS:
            raise did_you_mean("[method] sigma_grid", str(self.sigma_grid), SIGMA_GRIDS)
        if not self.eta > 0:
            raise UserError(f"[method] eta must be > 0 (the SDE's noise level), got {self.eta}")
        trained = int((self.num_steps - 1) * self.timestep_fraction)
        if self.num_steps < 2 or not 0 < self.timestep_fraction <= 1 or trained < 1:
            raise UserError(f"[method] num_steps = {self.num_steps} and timestep_fraction = {self.timestep_fraction} "
                            f"train int((num_steps - 1) x fraction) = {trained} timesteps; need at least 1")
        if self.ema_schedule not in EMA_SCHEDULES:
            raise did_you_mean("[method] ema_schedule", str(self.ema_schedule), EMA_SCHEDULES)
        if self.rollout_batch_size < 0:
            raise UserError(f"[method] rollout_batch_size must be >= 0 (0: a process's whole share), "
                            f"got {self.rollout_batch_size}")


class DanceGRPO(GroupRollout):
    name = "dance_grpo"
    Options = DanceGRPOOptions

    @property
    def K(self) -> int:
        return self.trained_steps()

    def trained_steps(self) -> int:
        """K = int((N - 1) x timestep_fraction): the last transition is never trained."""
        return int((self.opt.num_steps - 1) * self.opt.timestep_fraction)

    # ---- the contract ---------------------------------------------------------------------------------------
    def plan(self, shape: RunShape) -> UnitCost:
        """One epoch (all processes): N-step rollouts, rewards, and K trained timesteps per sample. No reference."""
        o = self.opt
        return self.epoch_cost(shape, no_grad_fwd=0,
                               fwd_bwd=o.batch_size * self.K * self.cfg_factor(training_guidance(o)))

    def add_ema(self, roles: Roles, params) -> None:
        if self.opt.ema_schedule == "epoch":  # the reference's: constant decay, once per epoch
            roles.ema = ConstantEMA(params, decay=self.opt.ema_decay, every=1)
        else:
            super().add_ema(roles, params)

    def sigmas(self, adapter) -> torch.Tensor:
        if self.opt.sigma_grid == "scheduler":
            return sampling_sigmas(adapter.scheduler_config, self.opt.num_steps)
        return dance_sigmas(self.opt.num_steps, self.opt.shift)

    def velocity(self, ctx: Ctx):
        """The policy's velocity the rollouts and the recomputation call (its timestep rounded with
        `round_timestep`)."""
        policy = ctx.velocity_of("policy")
        return rounded_timesteps(policy) if self.opt.round_timestep else policy

    def sample(self, ctx: Ctx, share, text, noise) -> Trajectory:
        """Steps 0 .. N-2 stochastic (trainable); the last is the Euler step to sigma 0 (see the docstring); in
        sampling calls of rollout_batch_size images."""
        o, shape = self.opt, noise.shape[1:]
        chunk, count = o.rollout_batch_size or len(share.ids), len(share.ids)
        velocity, sigmas = self.velocity(ctx), self.sigmas(ctx.adapter)
        parts = []
        for lo in range(0, count, chunk):
            ids = share.ids[lo:lo + chunk]
            parts.append(sde_rollout(ctx.adapter, text[lo:lo + chunk], noise[lo:lo + chunk], num_steps=o.num_steps,
                                     guidance=o.guidance, variant=o.sde_type, noise_level=o.eta,
                                     sde_window=(0, o.num_steps - 1), velocity=velocity, sigmas=sigmas,
                                     noise_fn=lambda i, ids=ids: ctx.randn(shape, ids, f"sde_{i}")))
        return Trajectory.cat(parts)

    def advantages(self, ctx: Ctx, epoch: Epoch) -> None:
        epoch.advantages = group_zscore(epoch.rewards, epoch.groups, eps=self.opt.adv_eps,
                                        clip=self.opt.adv_clip).to(ctx.device)

    def trained_columns(self, ctx: Ctx, epoch: Epoch) -> torch.Tensor:
        """A keyed random subset of each sample's first N - 1 transitions."""
        columns = trained_timesteps(ctx.seed, ctx.unit, range(len(epoch.prompts)), self.opt.num_steps - 1, self.K)
        return epoch.traj.trainable_steps().cpu().gather(1, columns).to(ctx.device)

    def extra_logs(self, epoch: Epoch) -> dict[str, float]:
        return {"reward_std": float(epoch.rewards.std(correction=0))}

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        epoch, idx, _, text, column = micro.data
        o = self.opt
        step = ppo_step(ctx.adapter, epoch.traj.select(idx), epoch.steps[idx, column], text,
                        training_guidance(o), epoch.advantages[idx], o.clip_range,
                        policy=self.velocity(ctx))
        logs = ppo_logs(step, len(idx))
        logs["ratio_dev"] = log_pair((step.policy.ratio - 1).abs().sum(), len(idx))  # mean |ratio - 1|: 0 on-policy
        return LossOutput(loss=step.total.sum(), logs=logs)

    def after_update(self, ctx: Ctx, step: int, end_of_unit: bool) -> None:
        if ctx.roles.ema is None:
            return
        if self.opt.ema_schedule == "epoch":
            if end_of_unit:
                ctx.roles.ema.step(ctx.unit)  # every = 1 and a constant decay: the index only names the epoch
        else:
            ctx.roles.ema.step(step - 1)  # 0-based index of the optimizer step just taken
