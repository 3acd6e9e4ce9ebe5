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

import torch

from soarbench.errors import UserError, did_you_mean
from soarbench.cost import UnitCost
from soarbench.rng import keyed_generator
from soarbench.methods.base import (Ctx, LossOutput, MethodBase, Micro, ParamGroup, RunShape, log_pair,
                                    deal_steps, eval_mode, require_geneval_rows, samples_per_step)
from soarbench.models.sd3 import TextEmbeddings
from soarbench.rl.advantages import group_zscore
from soarbench.rl.ppo import clipped_policy_loss
from soarbench.rl.rewards import RewardFunction, parse_weights
from soarbench.rl.lora import EMA
from soarbench.methods.flow_grpo import Epoch  # the same epoch of gathered rollouts
from soarbench.rl.rollout import encode_once, initial_noise, Trajectory, sde_rollout, step_log_prob_under
from soarbench.sampling.ode import sampling_sigmas
from soarbench.sampling.sde import SDE_VARIANTS

SIGMA_GRIDS = ("linspace", "scheduler")
EMA_SCHEDULES = ("step", "epoch")


class ConstantEMA(EMA):
    """The reference's EMA: e <- d e + (1 - d) p with the constant d = decay (no warm-up)."""

    def decay_at(self, step: int) -> float:
        return self.decay


def reference_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The reference's model input int(sigma * 1000) / 1000, in float32 as it computes it (sigma >= 0)."""
    return torch.floor(sigma.float() * 1000) / 1000


class RoundedTimesteps:
    """The adapter, except that its velocity sees the reference's rounded timestep (every other attribute is the
    adapter's own): the rollout and the recomputation round alike, the step arithmetic keeps the exact sigma."""

    def __init__(self, adapter):
        self._adapter = adapter

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def velocity(self, z, sigma, text, transformer=None):
        return self._adapter.velocity(z, reference_timestep(sigma).to(sigma.device), text, transformer)


def dance_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """(N + 1,) fp32: shift t / (1 + (shift - 1) t) at t = linspace(1, 0, N + 1), the reference's `sd3_time_shift`."""
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def trained_timesteps(seed: int, unit: int, ids, transitions: int, count: int) -> torch.Tensor:
    """(B, count) long: for each global sample index, the first `count` entries of a random permutation of its
    `transitions` trainable steps, keyed by (seed, unit, "timesteps", sample)."""
    rows = [torch.randperm(transitions, generator=keyed_generator(seed, unit, "timesteps", int(i)))[:count]
            for i in ids]
    return torch.stack(rows) if rows else torch.empty((0, count), dtype=torch.long)


class DanceGRPO(MethodBase):
    name = "dance_grpo"
    source = "prompts"

    def __init__(self, group_size: int = 12, batch_size: int = 48, num_steps: int = 16, guidance: float = 4.5,
                 eta: float = 0.3, sde_type: str = "dance", sigma_grid: str = "linspace", shift: float = 3.0,
                 init_same_noise: bool = True, clip_range: float = 1e-4, adv_clip: float = 5.0,
                 adv_eps: float = 1e-8, timestep_fraction: float = 0.6, optimizer_steps_per_epoch: int = 1,
                 cfg_train: bool = True, rewards: dict[str, float] | None = None,
                 reward_options: dict[str, dict] | None = None, lora: bool = True, lora_r: int = 32,
                 lora_alpha: float = 64, ema: bool = False, ema_decay: float = 0.995, ema_every: int = 1,
                 resolution: int = 0, rollout_batch_size: int = 0, ema_schedule: str = "step",
                 round_timestep: bool = False):
        # batch_size = images per epoch over all processes = (unique prompts per epoch) x group_size
        if group_size < 2:
            raise UserError(f"[method] group_size must be >= 2 (the unbiased std of a group of one is undefined), "
                            f"got {group_size}")
        if batch_size % group_size:
            raise UserError(f"[method] batch_size = {batch_size} images is not a whole number of groups of "
                            f"{group_size}")
        if sde_type not in SDE_VARIANTS:
            raise did_you_mean("[method] sde_type", str(sde_type), SDE_VARIANTS)
        if sigma_grid not in SIGMA_GRIDS:
            raise did_you_mean("[method] sigma_grid", str(sigma_grid), SIGMA_GRIDS)
        if not eta > 0:
            raise UserError(f"[method] eta must be > 0 (the SDE's noise level), got {eta}")
        trained = int((num_steps - 1) * timestep_fraction)
        if num_steps < 2 or not 0 < timestep_fraction <= 1 or trained < 1:
            raise UserError(f"[method] num_steps = {num_steps} and timestep_fraction = {timestep_fraction} train "
                            f"int((num_steps - 1) x fraction) = {trained} timesteps; need at least 1")
        if ema_schedule not in EMA_SCHEDULES:
            raise did_you_mean("[method] ema_schedule", str(ema_schedule), EMA_SCHEDULES)
        if rollout_batch_size < 0:
            raise UserError(f"[method] rollout_batch_size must be >= 0 (0: a process's whole share), "
                            f"got {rollout_batch_size}")
        if optimizer_steps_per_epoch < 1 or batch_size % optimizer_steps_per_epoch:
            raise UserError(f"[method] the epoch's {batch_size} images do not split into "
                            f"optimizer_steps_per_epoch = {optimizer_steps_per_epoch} optimizer steps")
        self.k, self.m, self.T = int(group_size), int(batch_size) // int(group_size), int(num_steps)
        self.g, self.variant, self.eta = float(guidance), sde_type, float(eta)
        self.grid, self.shift = sigma_grid, float(shift)
        self.same_noise, self.clip = bool(init_same_noise), float(clip_range)
        self.adv_clip, self.adv_eps = float(adv_clip), float(adv_eps)
        self.fraction, self.K, self.opt_steps = float(timestep_fraction), trained, int(optimizer_steps_per_epoch)
        self.cfg_train = bool(cfg_train)  # false: train the conditional velocity alone (ratios then start off 1)
        self.use_lora, self.lora_r, self.lora_alpha = bool(lora), int(lora_r), float(lora_alpha)
        self.use_ema, self.ema_decay, self.ema_every = bool(ema), float(ema_decay), int(ema_every)
        self.ema_schedule, self.round_timestep = str(ema_schedule), bool(round_timestep)
        self.resolution = int(resolution)  # rollout size in pixels; 0: the VAE's sample_size (SD3.5: set 512)
        # images per sampling call; 0: this process's whole share at once. The reference samples one at a time and
        # trains one at a time; equal batch sizes keep bf16 ratios at exactly 1 where kernels depend on the batch.
        self.rollout_batch = int(rollout_batch_size)
        # names and weights are checked now; the scorers (and their weights) load when the run starts (setup)
        self.reward_weights = parse_weights(rewards or {"geneval": 1.0})
        self.reward_options = dict(reward_options or {})
        self.reward_fn: RewardFunction | None = None

    @property
    def group_size(self) -> int:
        return self.k

    # ---- the contract ---------------------------------------------------------------------------------------
    def plan(self, shape: RunShape) -> UnitCost:
        """One epoch (all processes): N-step rollouts, rewards, and K trained timesteps per sample. No reference."""
        n = self.m * self.k
        per_step = samples_per_step(n, self.opt_steps, shape)
        cfg = 2 if self.g != 1.0 else 1
        train_cfg = 2 if (self.cfg_train and self.g != 1.0) else 1
        return UnitCost(images=n, unique_prompts=self.m, no_grad_fwd=n * self.T * cfg,
                        fwd_bwd=n * self.K * train_cfg, reward_calls=n * len(self.reward_weights), vae_decodes=n,
                        optimizer_steps=self.opt_steps, micro_batches=shape.accumulation * self.K,
                        samples_per_step=per_step)

    def setup(self, ctx: Ctx) -> list[ParamGroup]:
        """LoRA (or the whole transformer) and the optional EMA; no reference role (DanceGRPO has no KL)."""
        roles = ctx.roles
        params = roles.lora(self.lora_r, self.lora_alpha) if self.use_lora else roles.full(("transformer",))
        if self.use_ema:
            roles.add_ema(params, self.ema_decay, self.ema_every)
            if self.ema_schedule == "epoch":  # the reference's: constant decay, once per epoch
                roles.ema = ConstantEMA(params, decay=self.ema_decay, every=1)
        self.reward_fn = RewardFunction.from_config(self.reward_weights, self.reward_options)
        self.reward_fn.meter = ctx.meter  # reward calls are counted where they are made
        return [ParamGroup(params)]

    def sigmas(self, adapter) -> torch.Tensor:
        if self.grid == "scheduler":
            return sampling_sigmas(adapter.scheduler_config, self.T)
        return dance_sigmas(self.T, self.shift)

    def unit_logs(self, buffer: Epoch) -> dict[str, float]:
        return buffer.logs

    @torch.no_grad()
    def collect(self, ctx: Ctx, data) -> Epoch:
        share = data.next(ctx)
        adapter = self.model(ctx)
        require_geneval_rows(share.metadata, self.reward_weights)
        prompts = [p for chunk in ctx.all_gather_objects(share.prompts) for p in chunk]
        table = encode_once(adapter, prompts)
        text = TextEmbeddings.cat([table[p] for p in share.prompts])
        shape = adapter.latent_shape(*self._size(adapter))
        noise = initial_noise(ctx.seed, ctx.unit, share.ids, share.groups, shape, self.same_noise, ctx.device)
        chunk, count = self.rollout_batch or len(share.ids), len(share.ids)
        parts = []
        with eval_mode(adapter.transformer), ctx.roles.use("policy") as net:
            for lo in range(0, count, chunk):
                ids = share.ids[lo:lo + chunk]
                # steps 0 .. N-2 stochastic (trainable); the last is the Euler step to sigma 0 (see the docstring)
                parts.append(sde_rollout(adapter, text[lo:lo + chunk], noise[lo:lo + chunk], num_steps=self.T,
                                         guidance=self.g, variant=self.variant, noise_level=self.eta,
                                         sde_window=(0, self.T - 1), transformer=net, sigmas=self.sigmas(adapter),
                                         noise_fn=lambda i, ids=ids: ctx.randn(shape, ids, f"sde_{i}")))
        traj = Trajectory.cat(parts)
        rewards, parts = self.reward_fn(adapter.decode(traj.final_latents), share.prompts, share.metadata)
        # every process needs every sample's reward (advantages) and trajectory (the steps deal samples over slots)
        traj = Trajectory(latents=ctx.all_gather(traj.latents), log_probs=ctx.all_gather(traj.log_probs),
                          sigmas=traj.sigmas, trainable=ctx.all_gather(traj.trainable), variant=traj.variant,
                          noise_level=traj.noise_level)
        reward_all = ctx.all_gather(rewards.to(ctx.device)).cpu()
        groups = torch.tensor([g for chunk in ctx.all_gather_objects(share.groups) for g in chunk])
        adv = group_zscore(reward_all, groups, eps=self.adv_eps, clip=self.adv_clip)
        n = len(prompts)
        order = torch.randperm(n, generator=keyed_generator(ctx.seed, ctx.unit, "order"))
        # the gathered samples are in global-index order (each process holds a contiguous block)
        columns = trained_timesteps(ctx.seed, ctx.unit, range(n), self.T - 1, self.K)
        steps = traj.trainable_steps().cpu().gather(1, columns)
        logs = {"reward_mean": float(reward_all.mean()), "reward_std": float(reward_all.std(correction=0))}
        logs.update({f"reward_{k}": float(ctx.all_gather(v.to(ctx.device)).mean()) for k, v in parts.items()})
        return Epoch(traj=traj, prompts=prompts, embeddings=table, advantages=adv.to(ctx.device),
                     parts=list(order.chunk(self.opt_steps)), steps=steps.to(ctx.device), logs=logs)

    def updates(self, ctx: Ctx, epoch: Epoch):
        def head(idx, row):
            return epoch, idx, TextEmbeddings.cat([epoch.embeddings[epoch.prompts[int(i)]] for i in idx])
        return deal_steps(ctx, epoch.parts, self.K, head)

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        epoch, idx, text, column = micro.data
        traj = epoch.traj.select(idx)
        j = epoch.steps[idx, column]
        guidance = self.g if self.cfg_train else 1.0
        with ctx.roles.use("policy") as net:
            out = step_log_prob_under(self.model(ctx), traj, j, text, guidance, transformer=net)
        policy = clipped_policy_loss(out.log_prob, traj.log_prob_at(j), epoch.advantages[idx], self.clip)
        n = len(idx)
        logs = {"policy_loss": log_pair(policy.per_sample.sum(), n), "approx_kl": log_pair(policy.approx_kl * n, n),
                "clipfrac": log_pair(policy.clipfrac * n, n),
                "ratio_dev": log_pair((policy.ratio - 1).abs().sum(), n)}  # mean |ratio - 1|: 0 when on-policy
        return LossOutput(loss=policy.per_sample.sum(), logs=logs)

    def after_update(self, ctx: Ctx, step: int, end_of_unit: bool) -> None:
        if ctx.roles.ema is None:
            return
        if self.ema_schedule == "epoch":
            if end_of_unit:
                ctx.roles.ema.step(ctx.unit)  # every = 1 and a constant decay: the index only names the epoch
        else:
            ctx.roles.ema.step(step - 1)  # 0-based index of the optimizer step just taken

    def model(self, ctx: Ctx):
        """The adapter the rollouts and the recomputation call (its timestep rounded with `round_timestep`)."""
        return RoundedTimesteps(ctx.adapter) if self.round_timestep else ctx.adapter

    def _size(self, adapter) -> tuple[int, int]:
        size = self.resolution or int(adapter.vae.config.sample_size)
        return size, size
