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

from dataclasses import dataclass, field

import torch

from soarbench.errors import UserError
from soarbench.cost import UnitCost
from soarbench.rng import keyed_generator
from soarbench.methods.base import (Ctx, LossOutput, MethodBase, Micro, ParamGroup, RunShape, log_pair,
                                    deal_steps, eval_mode, require_geneval_rows, samples_per_step)
from soarbench.rl.advantages import group_advantages, nonzero_groups, refill_to_multiple
from soarbench.rl.ppo import clipped_policy_loss, kl_to_reference
from soarbench.rl.rewards import RewardFunction
from soarbench.models.sd3 import TextEmbeddings
from soarbench.rl.rollout import Trajectory, encode_once, initial_noise, random_window, sde_rollout, step_log_prob_under


@dataclass
class Epoch:
    """One epoch's rollouts of ALL processes (gathered), ready for training."""

    traj: Trajectory
    prompts: list[str]
    embeddings: dict  # prompt -> its embedding, shared by the rollout and the training passes
    advantages: torch.Tensor  # (N,)
    parts: list[torch.Tensor]  # the sample indices of each optimizer step
    steps: torch.Tensor  # (N, K) the trained timestep indices of each sample
    logs: dict[str, float] = field(default_factory=dict)


class FlowGRPO(MethodBase):
    name = "flow_grpo"
    source = "prompts"
    same_noise = False  # init_same_noise (a subclass that does not call __init__ keeps the reference's draw)

    def __init__(self, group_size: int = 4, batch_size: int = 16, num_steps: int = 10, guidance: float = 4.5,
                 sde_type: str = "flow_sde", noise_level: float = 0.7, sde_window: int = 0,
                 clip_range: float = 1e-4, beta: float = 0.04, global_std: bool = True, adv_clip: float = 5.0,
                 timestep_fraction: float = 0.99, optimizer_steps_per_epoch: int = 2, cfg_train: bool = True,
                 rewards: dict[str, float] | None = None, reward_options: dict[str, dict] | None = None,
                 lora: bool = True, lora_r: int = 32, lora_alpha: float = 64, ema: bool = True,
                 ema_decay: float = 0.9, ema_every: int = 8, resolution: int = 0, init_same_noise: bool = False):
        # batch_size = images per epoch over all processes = (unique prompts per epoch) x group_size
        if group_size < 2:
            raise UserError(f"[method] group_size must be >= 2 for group-relative advantages, got {group_size}")
        if group_size > batch_size:
            raise UserError(f"[method] group_size = {group_size} is larger than the batch of {batch_size} images "
                            f"per epoch: one group must fit in a batch")
        if batch_size % group_size:
            raise UserError(f"[method] batch_size = {batch_size} images is not a whole number of groups of "
                            f"{group_size}")
        if optimizer_steps_per_epoch < 1 or num_steps < 1:
            raise UserError("[method] optimizer_steps_per_epoch and num_steps must be >= 1")
        if batch_size % optimizer_steps_per_epoch:
            raise UserError(f"[method] the epoch's {batch_size} images do not split into "
                            f"{optimizer_steps_per_epoch} optimizer steps")
        self.k, self.m, self.T, self.g = int(group_size), int(batch_size) // int(group_size), int(num_steps), float(guidance)
        self.variant, self.a, self.window = sde_type, float(noise_level), int(sde_window)
        self.clip, self.beta, self.global_std, self.adv_clip = float(clip_range), float(beta), bool(global_std), float(adv_clip)
        self.fraction, self.opt_steps, self.cfg_train = float(timestep_fraction), int(optimizer_steps_per_epoch), bool(cfg_train)
        self.use_lora, self.lora_r, self.lora_alpha = bool(lora), int(lora_r), float(lora_alpha)
        self.use_ema, self.ema_decay, self.ema_every = bool(ema), float(ema_decay), int(ema_every)
        self.resolution = int(resolution)  # rollout size in pixels; 0: the VAE's sample_size (SD3.5: set 512)
        self.same_noise = bool(init_same_noise)
        self.reward_fn = RewardFunction.from_config(rewards or {"geneval": 1.0}, reward_options or {})

    @property
    def group_size(self) -> int:
        return self.k

    # ---- the contract ---------------------------------------------------------------------------------------
    def trained_steps(self) -> int:
        return self.window if self.window else int(self.T * self.fraction)

    def plan(self, shape: RunShape) -> UnitCost:
        """One epoch (all processes): rollouts, rewards, and the gradient passes of its optimizer steps."""
        n = self.m * self.k
        per_step = samples_per_step(n, self.opt_steps, shape)
        cfg = 2 if self.g != 1.0 else 1
        train_cfg = 2 if (self.cfg_train and self.g != 1.0) else 1
        K = self.trained_steps()
        ref = n * K * train_cfg if self.beta > 0 else 0
        return UnitCost(images=n, unique_prompts=self.m, no_grad_fwd=n * self.T * cfg + ref,
                        fwd_bwd=n * K * train_cfg, reward_calls=n * len(self.reward_fn.names), vae_decodes=n,
                        optimizer_steps=self.opt_steps, micro_batches=shape.accumulation * K,
                        samples_per_step=per_step)

    def setup(self, ctx: Ctx) -> list[ParamGroup]:
        """LoRA (or the whole transformer), the reference role for the KL, the EMA that evaluation uses."""
        roles = ctx.roles
        params = roles.lora(self.lora_r, self.lora_alpha) if self.use_lora else roles.full(("transformer",))
        if self.beta > 0:
            roles.add_role("ref")
        if self.use_ema:
            roles.add_ema(params, self.ema_decay, self.ema_every)
        self.reward_fn.meter = ctx.meter  # reward calls are counted where they are made
        return [ParamGroup(params)]

    def rollout(self, ctx: Ctx, share) -> tuple[list[str], dict, TextEmbeddings, Trajectory]:
        """The policy's SDE rollout of this process's share (in eval mode): (the epoch's prompts over all processes,
        their embeddings, this share's text, the trajectory with per-step log-probs)."""
        adapter = ctx.adapter
        require_geneval_rows(share.metadata, self.reward_fn.names)
        # every process encodes the epoch's distinct prompts once, the same way: rollout and training see the very
        # same embeddings (a ratio of exactly 1 before the first update, also under bf16)
        prompts_all = [p for chunk in ctx.all_gather_objects(share.prompts) for p in chunk]
        embeddings = encode_once(adapter, prompts_all)
        text = TextEmbeddings.cat([embeddings[p] for p in share.prompts])
        shape = adapter.latent_shape(*self._size(adapter))
        # the reference draws every sample's start independently; init_same_noise gives a group one start (as
        # DanceGRPO does), so the rewards within a group differ only by the SDE noise the loss credits
        noise = initial_noise(ctx.seed, ctx.unit, share.ids, share.groups, shape, self.same_noise, ctx.device)
        window = random_window(self.T, self.window, keyed_generator(ctx.seed, ctx.unit, "window")) \
            if self.window else None
        with eval_mode(adapter.transformer), ctx.roles.use("policy") as net:
            traj = sde_rollout(adapter, text, noise, num_steps=self.T, guidance=self.g, variant=self.variant,
                               noise_level=self.a, sde_window=window, transformer=net,
                               noise_fn=lambda i: ctx.randn(shape, share.ids, f"sde_{i}"))
        return prompts_all, embeddings, text, traj

    def unit_logs(self, buffer: Epoch) -> dict[str, float]:
        return buffer.logs

    @torch.no_grad()
    def collect(self, ctx: Ctx, data) -> Epoch:
        share = data.next(ctx)
        adapter = ctx.adapter
        prompts_all, embeddings, _, traj = self.rollout(ctx, share)
        rewards, parts = self.reward_fn(adapter.decode(traj.final_latents), share.prompts, share.metadata)
        # every process needs every sample's reward (advantages) and trajectory (the steps deal samples over slots)
        traj = Trajectory(latents=ctx.all_gather(traj.latents), log_probs=ctx.all_gather(traj.log_probs),
                          sigmas=traj.sigmas, trainable=ctx.all_gather(traj.trainable), variant=traj.variant,
                          noise_level=traj.noise_level)
        reward_all = ctx.all_gather(rewards.to(ctx.device)).cpu()
        groups = torch.tensor([g for chunk in ctx.all_gather_objects(share.groups) for g in chunk])
        prompts = prompts_all
        adv = group_advantages(reward_all, groups, global_std=self.global_std, clip=self.adv_clip)
        keep = nonzero_groups(adv, groups)
        multiple = self.opt_steps * ctx.shape.slots
        kept = refill_to_multiple(keep, multiple, keyed_generator(ctx.seed, ctx.unit, "refill"))
        index = torch.nonzero(kept).flatten()
        order = index[torch.randperm(len(index), generator=keyed_generator(ctx.seed, ctx.unit, "order"))]
        logs = {"reward_mean": float(reward_all.mean()), "kept_fraction": float(keep.float().mean())}
        logs.update({f"reward_{n}": float(ctx.all_gather(v.to(ctx.device)).mean()) for n, v in parts.items()})
        return Epoch(traj=traj, prompts=prompts, embeddings=embeddings, advantages=adv.to(ctx.device),
                     parts=list(order.chunk(self.opt_steps)), steps=traj.trainable_steps()[:, : self.trained_steps()],
                     logs=logs)

    def updates(self, ctx: Ctx, epoch: Epoch):
        def head(idx, row):
            return epoch, idx, TextEmbeddings.cat([epoch.embeddings[epoch.prompts[int(i)]] for i in idx])
        return deal_steps(ctx, epoch.parts, epoch.steps.shape[1], head)

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        epoch, idx, text, column = micro.data
        adapter = ctx.adapter
        traj = epoch.traj.select(idx)
        j = epoch.steps[idx, column]
        guidance = self.g if self.cfg_train else 1.0
        with ctx.roles.use("policy") as net:
            out = step_log_prob_under(adapter, traj, j, text, guidance, transformer=net)
        policy = clipped_policy_loss(out.log_prob, traj.log_probs[torch.arange(len(idx)), j],
                                     epoch.advantages[idx], self.clip)
        n = len(idx)
        per_sample = policy.per_sample
        logs = {"policy_loss": log_pair(per_sample.sum(), n), "approx_kl": log_pair(policy.approx_kl * n, n),
                "clipfrac": log_pair(policy.clipfrac * n, n)}
        if self.beta > 0:
            with torch.no_grad(), ctx.roles.use("ref") as ref_net:
                ref = step_log_prob_under(adapter, traj, j, text, guidance, transformer=ref_net)
            kl = kl_to_reference(out.mean, ref.mean, out.kl_std)
            per_sample = per_sample + self.beta * kl
            logs["kl"] = log_pair(kl.sum(), n)
        return LossOutput(loss=per_sample.sum(), logs=logs)

    def after_update(self, ctx: Ctx, step: int, end_of_unit: bool) -> None:
        if ctx.roles.ema is not None:
            ctx.roles.ema.step(step - 1)  # 0-based index of the optimizer step just taken

    def _size(self, adapter) -> tuple[int, int]:
        size = self.resolution or int(adapter.vae.config.sample_size)
        return size, size

