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

from dataclasses import dataclass, field

import torch

from soarbench.errors import UserError, did_you_mean
from soarbench.cost import UnitCost
from soarbench.rng import keyed_generator
from soarbench.methods.base import (Ctx, LossOutput, MethodBase, Micro, ParamGroup, RunShape, log_pair,
                                    deal_steps, eval_mode, require_frozen_copies, require_geneval_rows,
                                    samples_per_step)
from soarbench.rl.advantages import group_advantages
from soarbench.rl.rewards import RewardFunction
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


@dataclass
class Epoch:
    """One epoch's rollouts of ALL processes (gathered), ready for training."""

    latents: torch.Tensor  # (N, C, H, W) fp32 clean latents of the old policy's rollouts
    prompts: list[str]
    advantages: torch.Tensor  # (N,) clipped A
    r: torch.Tensor  # (N,) optimality probability
    sigmas: torch.Tensor  # (T,) the rollout's sigmas (1 ... > 0), the training timesteps
    steps: torch.Tensor  # (N, K) each sample's trained sigma indices (a keyed permutation's first K)
    parts: list[torch.Tensor]  # the sample indices of each optimizer step
    logs: dict[str, float] = field(default_factory=dict)


class DiffusionNFT(MethodBase):
    name = "diffusion_nft"
    source = "prompts"

    def __init__(self, group_size: int = 4, batch_size: int = 16, num_steps: int = 10, guidance: float = 1.0,
                 solver: str = "dpm2", beta: float = 1.0, kl_weight: float = 1e-4, adv_clip: float = 5.0,
                 global_std: bool = True, timestep_fraction: float = 0.99, optimizer_steps_per_epoch: int = 1,
                 decay_schedule: str = "linear", rewards: dict[str, float] | None = None,
                 reward_options: dict[str, dict] | None = None, lora: bool = True, lora_r: int = 32,
                 lora_alpha: float = 64, ema: bool = True, ema_decay: float = 0.9, ema_every: int = 1,
                 resolution: int = 0):
        # batch_size = images per epoch over all processes = (unique prompts per epoch) x group_size
        if group_size < 2:
            raise UserError(f"[method] group_size must be >= 2: the advantage compares a prompt's images with each "
                            f"other (got {group_size})")
        if group_size > batch_size or batch_size % group_size:
            raise UserError(f"[method] batch_size = {batch_size} images per epoch is not a whole number of groups "
                            f"of group_size = {group_size}")
        if solver not in SOLVERS:
            raise did_you_mean("[method] solver", solver, SOLVERS)
        if decay_schedule not in DECAY_SCHEDULES:
            raise did_you_mean("[method] decay_schedule", decay_schedule, DECAY_SCHEDULES)
        if num_steps < 1 or int(num_steps * timestep_fraction) < 1 or timestep_fraction > 1:
            raise UserError(f"[method] num_steps = {num_steps} x timestep_fraction = {timestep_fraction} must train "
                            f"at least one and at most all of the rollout's timesteps")
        if not beta > 0:
            raise UserError(f"[method] beta must be > 0 (the loss divides by it), got {beta}")
        if adv_clip <= 0 or kl_weight < 0:
            raise UserError(f"[method] adv_clip must be > 0 and kl_weight >= 0, got {adv_clip} and {kl_weight}")
        if optimizer_steps_per_epoch < 1 or batch_size % optimizer_steps_per_epoch:
            raise UserError(f"[method] the epoch's {batch_size} images do not split into "
                            f"optimizer_steps_per_epoch = {optimizer_steps_per_epoch} steps")
        self.k, self.m = int(group_size), int(batch_size) // int(group_size)
        self.T, self.g = int(num_steps), float(guidance)
        self.solver, self.beta, self.kl_weight, self.adv_clip = solver, float(beta), float(kl_weight), float(adv_clip)
        self.global_std, self.fraction = bool(global_std), float(timestep_fraction)
        self.opt_steps, self.decay_schedule = int(optimizer_steps_per_epoch), decay_schedule
        self.use_lora, self.lora_r, self.lora_alpha = bool(lora), int(lora_r), float(lora_alpha)
        self.use_ema, self.ema_decay, self.ema_every = bool(ema), float(ema_decay), int(ema_every)
        self.resolution = int(resolution)  # rollout size in pixels; 0: the VAE's sample_size (SD3.5: set 512)
        self.reward_fn = RewardFunction.from_config(rewards or {"geneval": 1.0}, reward_options or {})

    @property
    def group_size(self) -> int:
        return self.k

    def trained_steps(self) -> int:
        return int(self.T * self.fraction)

    # ---- the contract ---------------------------------------------------------------------------------------
    def plan(self, shape: RunShape) -> UnitCost:
        """One epoch (all processes): old-policy rollouts, rewards, and per trained (sample, timestep) one policy
        forward+backward, one old-policy forward and (kl_weight > 0) one reference forward."""
        n = self.m * self.k
        per_step = samples_per_step(n, self.opt_steps, shape)
        K = self.trained_steps()
        cfg = 2 if self.g != 1.0 else 1
        return UnitCost(images=n, unique_prompts=self.m,
                        no_grad_fwd=n * self.T * cfg + n * K * (2 if self.kl_weight > 0 else 1),
                        fwd_bwd=n * K, reward_calls=n * len(self.reward_fn.names), vae_decodes=n,
                        optimizer_steps=self.opt_steps, micro_batches=shape.accumulation * K,
                        samples_per_step=per_step)

    def setup(self, ctx: Ctx) -> list[ParamGroup]:
        """The trained LoRA (or transformer), the old policy as a copy of it, the reference, the EMA."""
        roles = ctx.roles
        if self.use_lora:
            params = roles.lora(self.lora_r, self.lora_alpha)  # before "old" exists: the trained adapter only
        else:
            require_frozen_copies(ctx, "diffusion_nft", "the old policy and the reference")
            params = roles.full(("transformer",))
        roles.add_role("old")  # a copy of the policy: v_old == v_theta until the first soft update
        if self.kl_weight > 0:
            roles.add_role("ref")
        if self.use_ema:
            roles.add_ema(params, self.ema_decay, self.ema_every)
        self.reward_fn.meter = ctx.meter  # reward calls are counted where they are made
        return [ParamGroup(params)]

    def unit_logs(self, buffer: Epoch) -> dict[str, float]:
        return buffer.logs

    @torch.no_grad()
    def collect(self, ctx: Ctx, data) -> Epoch:
        share = data.next(ctx)
        adapter = ctx.adapter
        require_geneval_rows(share.metadata, self.reward_fn.names)
        text = adapter.encode_prompts(share.prompts)
        size = self.resolution or int(adapter.vae.config.sample_size)
        noise = ctx.randn(adapter.latent_shape(size, size), share.ids, "rollout_noise")
        with eval_mode(adapter.transformer), ctx.roles.use("old") as net:
            x0 = dpm_rollout(adapter, text, noise, num_steps=self.T, guidance=self.g, solver=self.solver,
                             transformer=net)
        rewards, parts = self.reward_fn(adapter.decode(x0), share.prompts, share.metadata)
        # every process needs every sample (advantages; the steps deal samples over slots)
        latents = ctx.all_gather(x0.float())
        reward_all = ctx.all_gather(rewards.to(ctx.device).float()).cpu()
        groups = torch.tensor([g for chunk in ctx.all_gather_objects(share.groups) for g in chunk])
        prompts = [p for chunk in ctx.all_gather_objects(share.prompts) for p in chunk]
        adv = group_advantages(reward_all, groups, global_std=self.global_std, clip=self.adv_clip)
        n, K = len(prompts), self.trained_steps()
        order = torch.randperm(n, generator=keyed_generator(ctx.seed, ctx.unit, "order"))
        steps = torch.stack([torch.randperm(self.T, generator=keyed_generator(ctx.seed, ctx.unit, "timesteps", i))[:K]
                             for i in range(n)])
        sigmas = sampling_sigmas(adapter.scheduler_config, self.T)[: self.T]
        r = optimality_probability(adv, self.adv_clip)
        logs = {"reward_mean": float(reward_all.mean()), "advantage_abs_mean": float(adv.abs().mean())}
        logs.update({f"reward_{k}": float(ctx.all_gather(v.to(ctx.device).float()).mean()) for k, v in parts.items()})
        return Epoch(latents=latents, prompts=prompts, advantages=adv.to(ctx.device), r=r.to(ctx.device),
                     sigmas=sigmas.to(ctx.device), steps=steps.to(ctx.device), parts=list(order.chunk(self.opt_steps)),
                     logs=logs)

    def updates(self, ctx: Ctx, epoch: Epoch):
        def head(idx, row):
            return epoch, idx, ctx.adapter.encode_prompts([epoch.prompts[int(i)] for i in idx])
        return deal_steps(ctx, epoch.parts, epoch.steps.shape[1], head)

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        epoch, idx, text, column = micro.data
        x0 = epoch.latents[idx]
        t = epoch.sigmas[epoch.steps[idx, column]]
        eps = ctx.randn(x0.shape[1:], idx.tolist(), f"train_noise_{column}")
        tt = t.reshape(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps
        with torch.no_grad():
            v_old = ctx.velocity(x_t, t, text, role="old")
        v_theta = ctx.velocity(x_t, t, text, role="policy")
        v_ref = None
        if self.kl_weight > 0:
            with torch.no_grad():
                v_ref = ctx.velocity(x_t, t, text, role="ref")
        terms = nft_terms(x0, x_t, t, v_theta, v_old, epoch.r[idx], self.beta, v_ref, self.adv_clip, self.kl_weight)
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
            ctx.roles.soft_update("old", old_decay(step, self.decay_schedule))
