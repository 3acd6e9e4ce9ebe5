"""DiffusionNFT (arXiv 2509.16117; reference code NVlabs/DiffusionNFT, scripts/train_nft_sd3.py and config/nft.py):
online RL on the forward process, with no likelihoods and no sampler in the loss.

    soarbench train --config benchmarks/shapes/diffusion_nft.toml --out runs/nft

One unit of work is an epoch:
  1. m prompts, each repeated k times (a group); rollouts from the OLD policy (role "old": a second LoRA adapter,
     or a frozen copy under full fine-tuning) with the deterministic second-order DPM solver at CFG `guidance`
     (1: none), `num_steps` steps (soarbench.sampling.dpm). Only the clean latents and the rewards are kept.
  2. R = weighted sum of raw scores; A = (R - group mean) / (global std + 1e-4), clipped to +-adv_clip (5);
     the optimality probability r = clip(0.5 + 0.5 A / adv_clip, 0, 1). No sample is dropped: A = 0 gives r = 1/2.
  3. The samples, shuffled, split into `optimizer_steps_per_epoch` steps, dealt round-robin over the slots; each
     sample trains on K = int(num_steps x timestep_fraction) of the rollout's sigmas (a random per-sample
     permutation), one micro-batch per (slot, k), on FRESH noise: x_t = (1 - t) x0 + t eps. With v_old (role
     "old", no grad), v_theta (policy) and v_ref (role "ref": LoRA disabled, or the frozen initial copy):
        v+ = beta v_theta + (1 - beta) v_old,   v- = (1 + beta) v_old - beta v_theta,   x0+- = x_t - t v+-
        L+- = mean_dims (x0+- - x0)^2 / w+-,   w+- = stop-grad mean_dims |x0+- - x0| (float64, >= 1e-5)
        loss = adv_clip * mean[(r L+ + (1 - r) L-) / beta] + kl_weight * mean mean_dims (v_theta - v_ref)^2
     Each micro-batch returns the SUM of its per-sample terms with weight = its sample count, so the loop's pooled
     mean is the reference's mean over samples and trained timesteps (its loss / (accumulation x K), averaged over
     GPUs). Training forwards are CFG-free, as in the paper.
  4. After the epoch's last optimizer step the old policy moves towards the trained one:
        theta_old <- d theta_old + (1 - d) theta,   d = schedule(optimizer steps so far)
     decay_schedule "linear" (d = min(0.001 step, 0.5); GenEval, PickScore, HPS), "ocr" (d = 0 for step < 75, then
     min(0.0075 (step - 75), 0.999)), or "none" (d = 0: the old policy is the current one each epoch).
     An EMA of the trained weights (decay 0.9 every step, the reference's warm-up) is what evaluation and
     checkpoints use.

Evaluation samples with the [eval] section's guidance; the paper evaluates at CFG 1.0 (the base SD3.5-M scores
GenEval 0.24 there), so a config meant to reproduce it sets eval.guidance = 1.0 and says so.

Where this differs from the reference, on purpose: rollouts pass the model the timestep sigma * 1000 as a float
(the reference's rollout truncates it to an integer, its training pass does not), so rollout and training see the
same timesteps as evaluation; the reference has no full fine-tuning (`lora = false` here keeps frozen copies of
the transformer for "old" and "ref", refused where they cannot exist: under ZeRO-3 / FSDP, or with text encoders
in train.components).

Every draw is keyed by the sample's global index in the epoch (rollout noise, timestep permutation, training noise)
and the shuffle by the epoch, so a step's gradient does not depend on how many processes share the work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from soarbench.cost import UnitCost
from soarbench.errors import UserError, did_you_mean
from soarbench.methods.base import Ctx, LossOutput, Micro, RunShape, log_pair
from soarbench.methods.group import Epoch, GroupOptions, GroupRollout, trained_timesteps
from soarbench.rl.advantages import group_advantages
from soarbench.sampling.dpm import SOLVERS, dpm_rollout
from soarbench.sampling.ode import sampling_sigmas

# (steps held at 0, rate per optimizer step, cap): the reference's decay_type 0, 1 and 2 (return_decay)
DECAY_SCHEDULES = {"none": (0, 0.0, 0.0), "linear": (0, 0.001, 0.5), "ocr": (75, 0.0075, 0.999)}
WEIGHT_FLOOR = 1e-5  # the adaptive weight's clamp


def old_decay(step: int, schedule: str = "linear") -> float:
    """d of the old policy's soft update after `step` optimizer steps (theta_old <- d theta_old + (1 - d) theta)."""
    flat, rate, cap = DECAY_SCHEDULES[schedule]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def optimality_probability(advantages: torch.Tensor, adv_clip: float = 5.0) -> torch.Tensor:
    """r = clip(0.5 + 0.5 clip(A, -c, c) / c, 0, 1): the probability that a sample is 'positive'."""
    a = advantages.clamp(-adv_clip, adv_clip)
    return (0.5 + 0.5 * a / adv_clip).clamp(0.0, 1.0)


@dataclass
class NFTTerms:
    """Per-sample (B,) terms of the NFT loss; `total` carries the gradient."""

    total: torch.Tensor  # adv_clip (r L+ + (1 - r) L-) / beta + kl_weight * kl
    policy: torch.Tensor  # adv_clip (r L+ + (1 - r) L-) / beta
    positive: torch.Tensor  # L+
    negative: torch.Tensor  # L-
    kl: torch.Tensor  # mean_dims (v_theta - v_ref)^2 (zeros without a reference)


def _dims_mean(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())), keepdim=keepdim)


def _adaptive_branch(x0_branch: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """mean_dims (x0_branch - x0)^2 / w, w = stop-grad mean_dims |x0_branch - x0| in float64, clamped >= 1e-5."""
    with torch.no_grad():
        w = _dims_mean((x0_branch.detach().double() - x0.double()).abs(), keepdim=True).clamp(min=WEIGHT_FLOOR)
    return _dims_mean((x0_branch - x0) ** 2 / w)


def nft_terms(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, v_theta: torch.Tensor, v_old: torch.Tensor,
              r: torch.Tensor, beta: float, v_ref: torch.Tensor | None = None, adv_clip: float = 5.0,
              kl_weight: float = 1e-4) -> NFTTerms:
    """The NFT loss's per-sample terms (see the module docstring); t is (B,) sigmas, velocities (B, C, H, W)."""
    x0, x_t, v_theta, v_old = x0.float(), x_t.float(), v_theta.float(), v_old.float().detach()
    tt = t.float().reshape(-1, *([1] * (x0.dim() - 1)))
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    positive = _adaptive_branch(x_t - tt * v_pos, x0)
    negative = _adaptive_branch(x_t - tt * v_neg, x0)
    r = r.to(positive.dtype)
    policy = adv_clip * (r * positive + (1.0 - r) * negative) / beta
    if v_ref is not None:
        kl = _dims_mean((v_theta - v_ref.float().detach()) ** 2)
    else:
        kl = torch.zeros_like(policy)
    return NFTTerms(total=policy + kl_weight * kl, policy=policy, positive=positive, negative=negative, kl=kl)


@dataclass(frozen=True, kw_only=True)
class DiffusionNFTOptions(GroupOptions):
    guidance: float = 1.0
    solver: str = "dpm2"
    beta: float = 1.0
    kl_weight: float = 1e-4
    global_std: bool = True
    optimizer_steps_per_epoch: int = 1
    decay_schedule: str = "linear"
    ema_every: int = 1

    def check(self) -> None:
        super().check()
        if self.solver not in SOLVERS:
            raise did_you_mean("[method] solver", self.solver, SOLVERS)
        if self.decay_schedule not in DECAY_SCHEDULES:
            raise did_you_mean("[method] decay_schedule", self.decay_schedule, DECAY_SCHEDULES)
        if int(self.num_steps * self.timestep_fraction) < 1 or self.timestep_fraction > 1:
            raise UserError(f"[method] num_steps = {self.num_steps} x timestep_fraction = {self.timestep_fraction} "
                            f"must train at least one and at most all of the rollout's timesteps")
        if not self.beta > 0:
            raise UserError(f"[method] beta must be > 0 (the loss divides by it), got {self.beta}")
        if self.adv_clip <= 0 or self.kl_weight < 0:
            raise UserError(f"[method] adv_clip must be > 0 and kl_weight >= 0, got {self.adv_clip} and "
                            f"{self.kl_weight}")


class DiffusionNFT(GroupRollout):
    name = "diffusion_nft"
    Options = DiffusionNFTOptions
    shared_embeddings = False  # each batch's prompts encoded with it, as the reference does
    frozen_copies = "the old policy and the reference"

    # ---- the contract ---------------------------------------------------------------------------------------
    def plan(self, shape: RunShape) -> UnitCost:
        """One epoch (all processes): old-policy rollouts, rewards, and per trained (sample, timestep) one policy
        forward+backward, one old-policy forward and (kl_weight > 0) one reference forward."""
        trained = self.opt.batch_size * self.trained_steps()
        return self.epoch_cost(shape, no_grad_fwd=trained * (2 if self.opt.kl_weight > 0 else 1), fwd_bwd=trained)

    def roles_needed(self) -> list[str]:
        """The old policy (a copy of the policy: v_old == v_theta until the first soft update) and the reference."""
        return ["old"] + (["ref"] if self.opt.kl_weight > 0 else [])

    def sample(self, ctx: Ctx, share, text, noise) -> torch.Tensor:
        """The old policy's ODE rollout: clean latents."""
        o = self.opt
        return dpm_rollout(ctx.adapter, text, noise, num_steps=o.num_steps, guidance=o.guidance, solver=o.solver,
                           velocity=ctx.velocity_of("old"))

    def advantages(self, ctx: Ctx, epoch: Epoch) -> None:
        o = self.opt
        adv = group_advantages(epoch.rewards, epoch.groups, global_std=o.global_std, clip=o.adv_clip)
        epoch.advantages = adv.to(ctx.device)
        epoch.extra["r"] = optimality_probability(adv, o.adv_clip).to(ctx.device)
        epoch.extra["sigmas"] = sampling_sigmas(ctx.adapter.scheduler_config, o.num_steps)[: o.num_steps].to(ctx.device)

    def trained_columns(self, ctx: Ctx, epoch: Epoch) -> torch.Tensor:
        """Each sample's trained sigma indices: a keyed permutation's first K."""
        return trained_timesteps(ctx.seed, ctx.unit, range(len(epoch.prompts)), self.opt.num_steps,
                                 self.trained_steps()).to(ctx.device)

    def extra_logs(self, epoch: Epoch) -> dict[str, float]:
        return {"advantage_abs_mean": float(epoch.advantages.abs().mean())}

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        epoch, idx, _, text, column = micro.data
        x0 = epoch.latents[idx]
        t = epoch.extra["sigmas"][epoch.steps[idx, column]]
        eps = ctx.randn(x0.shape[1:], idx.tolist(), f"train_noise_{column}")
        tt = t.reshape(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps
        with torch.no_grad():
            v_old = ctx.velocity(x_t, t, text, role="old")
        v_theta = ctx.velocity(x_t, t, text, role="policy")
        v_ref = None
        if self.opt.kl_weight > 0:
            with torch.no_grad():
                v_ref = ctx.velocity(x_t, t, text, role="ref")
        o = self.opt
        terms = nft_terms(x0, x_t, t, v_theta, v_old, epoch.extra["r"][idx], o.beta, v_ref, o.adv_clip, o.kl_weight)
        n = len(idx)
        logs = {"policy_loss": log_pair(terms.policy.sum(), n), "positive_loss": log_pair(terms.positive.sum(), n),
                "negative_loss": log_pair(terms.negative.sum(), n),
                "old_deviate": log_pair(_dims_mean((v_theta.detach().float() - v_old.float()) ** 2).sum(), n)}
        if v_ref is not None:
            logs["kl"] = log_pair(terms.kl.sum(), n)
        return LossOutput(loss=terms.total.sum(), logs=logs)

    def after_update(self, ctx: Ctx, step: int, end_of_unit: bool) -> None:
        if ctx.roles.ema is not None:
            ctx.roles.ema.step(step)  # the reference passes its step count after the increment (1-based)
        if end_of_unit:
            ctx.roles.soft_update("old", old_decay(step, self.opt.decay_schedule))
