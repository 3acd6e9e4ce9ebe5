"""The group-rollout family's one epoch: Flow-GRPO, DanceGRPO, DiffusionNFT and the actor-critic are written on it.

    class MyMethod(GroupRollout):
        name = "my_method"
        Options = MyOptions                                 # GroupOptions' fields, its own defaults and extra fields
        def plan(self, shape) -> UnitCost                   # self.epoch_cost(shape, no_grad_fwd=..., fwd_bwd=...)
        def sample(self, ctx, share, text, noise)           # the rollout: a Trajectory (SDE) or clean latents (ODE)
        def advantages(self, ctx, epoch)                    # epoch.advantages (and epoch.kept, when it drops samples)
        def trained_columns(self, ctx, epoch) -> (N, K)     # the trained step of each sample, per column
        def extra_logs(self, epoch) -> dict                 # the method's own scalars of the epoch
        def loss(self, ctx, micro) -> LossOutput            # micro.data = (epoch, idx, row, text, column)

One epoch (one unit of work; everything keyed by (seed, epoch, purpose, global sample index), so a step's
gradient does not depend on how many processes share it):
  1. this process's share of m prompts x k images (a group per prompt); the epoch's distinct prompts encoded once
     on every process (`encode_once`: the rollout and the training passes see the very same embeddings); initial
     noise keyed per sample, or per group with `same_noise` (DanceGRPO's init_same_noise);
  2. the rollout in eval mode (`sample`), decoded and scored by the weighted RewardFunction;
  3. rollouts, rewards and each metric's raw scores gathered over processes (advantages are normalised over the
     whole epoch and samples are dealt over all slots); the method's `advantages` and `trained_columns`;
  4. the kept samples shuffled (a draw keyed by the epoch) and split into optimizer_steps_per_epoch steps, each
     dealt round-robin over the slots (`deal_steps`); every (slot, trained column) is one micro-batch.
Setup trains a LoRA (or the whole transformer, refused where a method's frozen copies cannot exist), adds the
roles the method names (`roles_needed`) and the EMA evaluation uses; after each optimizer step the EMA folds in.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from soarbench.cost import UnitCost
from soarbench.errors import UserError
from soarbench.methods.base import (Ctx, LossOutput, MethodBase, ParamGroup, RunShape, deal_steps, eval_mode,
                                    log_pair, require_geneval_rows, samples_per_step, trained_weights)
from soarbench.models.sd3 import TextEmbeddings
from soarbench.rl.ppo import PPOStep, ppo_step
from soarbench.rl.rewards import RewardFunction, parse_weights
from soarbench.rl.rollout import Trajectory, encode_once, initial_noise, random_window, sde_rollout
from soarbench.rng import keyed_generator

def trained_timesteps(seed: int, unit: int, ids, transitions: int, count: int) -> torch.Tensor:
    """(B, count) long: for each global sample index, the first `count` entries of a random permutation of its
    `transitions` trainable steps, keyed by (seed, unit, "timesteps", sample) (DanceGRPO, DiffusionNFT)."""
    rows = [torch.randperm(transitions, generator=keyed_generator(seed, unit, "timesteps", int(i)))[:count]
            for i in ids]
    return torch.stack(rows) if rows else torch.empty((0, count), dtype=torch.long)


@dataclass(frozen=True, kw_only=True)
class GroupOptions:
    """The options every group-rollout method takes (a method's Options subclass sets its own defaults and adds
    its own fields). Read from the config's [method] table; checked when built, each problem in one line."""

    group_size: int = 4  # k images per prompt
    batch_size: int = 16  # images per epoch over all processes = (prompts per epoch) x group_size
    num_steps: int = 10  # sampling steps of a rollout
    guidance: float = 4.5
    adv_clip: float = 5.0
    timestep_fraction: float = 0.99
    optimizer_steps_per_epoch: int = 2
    rewards: dict[str, float] | None = None  # None: {geneval = 1.0}
    reward_options: dict[str, dict] | None = None
    lora: bool = True
    lora_r: int = 32
    lora_alpha: float = 64
    ema: bool = True
    ema_decay: float = 0.9
    ema_every: int = 8
    resolution: int = 0  # rollout size in pixels; 0: the VAE's sample_size (SD3.5: set 512)

    min_group: ClassVar[int] = 2  # the actor-critic's critic is its baseline: groups of one are allowed there
    min_group_why: ClassVar[str] = "for group-relative advantages"

    def __post_init__(self):
        for f in dataclasses.fields(self):  # TOML's 64 for a float option (and 4.0 for an int), nothing else
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif f.type == "int" and isinstance(value, float) and value.is_integer():
                object.__setattr__(self, f.name, int(value))
        self.check()

    def check(self) -> None:
        k, n, steps = self.group_size, self.batch_size, self.optimizer_steps_per_epoch
        if k < self.min_group:
            raise UserError(f"[method] group_size must be >= {self.min_group} {self.min_group_why}, got {k}")
        if k > n:
            raise UserError(f"[method] group_size = {k} is larger than the batch of {n} images per epoch: one "
                            f"group must fit in a batch")
        if n % k:
            raise UserError(f"[method] batch_size = {n} images is not a whole number of groups of {k}")
        if steps < 1 or self.num_steps < 1 or n % steps:
            raise UserError(f"[method] the epoch's {n} images do not split into optimizer_steps_per_epoch = {steps} "
                            f"optimizer steps (both, and num_steps = {self.num_steps}, must be >= 1)")


@dataclass
class Epoch:
    """One epoch's rollouts of ALL processes (gathered, in global sample order), ready for training."""

    prompts: list[str]
    groups: torch.Tensor  # (N,) each sample's group
    rewards: torch.Tensor  # (N,) the weighted reward (CPU)
    scores: dict[str, torch.Tensor]  # metric -> (N,) its raw score (the reward's parts)
    embeddings: dict[str, TextEmbeddings] | None  # prompt -> embedding; None: encoded per micro-batch
    traj: Trajectory | None = None  # SDE rollouts, with their per-step log-probs
    latents: torch.Tensor | None = None  # ODE rollouts: (N, C, H, W) fp32 clean latents
    advantages: torch.Tensor | None = None  # (N,) or per trained column (N, K)
    kept: torch.Tensor | None = None  # (N,) bool: the samples trained (None: all)
    steps: torch.Tensor | None = None  # (N, K) each sample's trained step per column
    batches: list[torch.Tensor] = field(default_factory=list)  # the sample indices of each optimizer step
    extra: dict[str, Any] = field(default_factory=dict)  # the method's own (critic features, sigmas, ...)
    train_policy: bool = True  # False: the actor-critic's value pre-training
    logs: dict[str, float] = field(default_factory=dict)


class GroupRollout(MethodBase):
    """The shared epoch (module docstring); a method supplies what differs."""

    source = "prompts"
    Options: ClassVar[type[GroupOptions]] = GroupOptions
    # the rollout and training passes share one embedding per distinct prompt (False: DiffusionNFT encodes each
    # batch's prompts as its reference does)
    shared_embeddings: ClassVar[bool] = True
    # full fine-tuning keeps these frozen copies of the transformer (None: none to refuse under sharding)
    frozen_copies: ClassVar[str | None] = None

    def __init__(self, **options):
        self.opt = self.Options(**options)
        # names and weights are checked now; the scorers (and their weights) load when the run starts (setup)
        self.reward_weights = parse_weights(self.opt.rewards or {"geneval": 1.0})
        self.reward_fn: RewardFunction | None = None

    @property
    def group_size(self) -> int:
        return self.opt.group_size

    @property
    def same_noise(self) -> bool:
        """One initial noise per group (the option init_same_noise, where a method has it) or one per sample."""
        return bool(getattr(self.opt, "init_same_noise", False))

    @property
    def prompts_per_epoch(self) -> int:
        return self.opt.batch_size // self.opt.group_size

    def trained_steps(self) -> int:
        """K: the trained steps (columns) of each sample."""
        return int(self.opt.num_steps * self.opt.timestep_fraction)

    def epoch_cost(self, shape: RunShape, no_grad_fwd: int, fwd_bwd: int, value_passes: int = 0) -> UnitCost:
        """One epoch's cost over all processes: the rollouts (CFG doubles each step's forwards), one reward call
        per image and metric, one decode per image, plus the method's training passes."""
        o, n = self.opt, self.opt.batch_size
        per_step = samples_per_step(n, o.optimizer_steps_per_epoch, shape)
        return UnitCost(images=n, unique_prompts=self.prompts_per_epoch,
                        no_grad_fwd=n * o.num_steps * self.cfg_factor(o.guidance) + no_grad_fwd, fwd_bwd=fwd_bwd,
                        reward_calls=n * len(self.reward_weights), vae_decodes=n, value_passes=value_passes,
                        optimizer_steps=o.optimizer_steps_per_epoch,
                        micro_batches=shape.accumulation * self.trained_steps(), samples_per_step=per_step)

    @staticmethod
    def cfg_factor(guidance: float) -> int:
        return 2 if guidance != 1.0 else 1

    # ---- setup --------------------------------------------------------------------------------------------------
    def roles_needed(self) -> list[str]:
        """The frozen roles ("ref", "old") the method computes with, added after the policy."""
        return []

    def setup(self, ctx: Ctx) -> list[ParamGroup]:
        """LoRA (or the whole transformer), the method's roles, the EMA evaluation uses, the reward models."""
        o, roles = self.opt, ctx.roles
        params = trained_weights(ctx, self.name, o.lora, o.lora_r, o.lora_alpha, self.frozen_copies)
        for role in self.roles_needed():
            roles.add_role(role)
        if o.ema:
            self.add_ema(roles, params)
        self.reward_fn = RewardFunction.from_config(self.reward_weights, o.reward_options or {})
        self.reward_fn.meter = ctx.meter  # reward calls are counted where they are made
        return [ParamGroup(params)]

    def add_ema(self, roles, params) -> None:
        roles.add_ema(params, self.opt.ema_decay, self.opt.ema_every)

    # ---- one epoch ----------------------------------------------------------------------------------------------
    def rollout_size(self, adapter) -> tuple[int, int]:
        size = self.opt.resolution or int(adapter.vae.config.sample_size)
        return size, size

    def sample(self, ctx: Ctx, share, text: TextEmbeddings, noise: torch.Tensor) -> Trajectory | torch.Tensor:
        raise NotImplementedError

    def observe(self, ctx: Ctx, rollout, text: TextEmbeddings) -> dict[str, torch.Tensor]:
        """Per-sample tensors of this process's share to gather into epoch.extra (the critic's features)."""
        return {}

    def advantages(self, ctx: Ctx, epoch: Epoch) -> None:
        raise NotImplementedError

    def trained_columns(self, ctx: Ctx, epoch: Epoch) -> torch.Tensor:
        """(N, K): the first K trainable steps of each SDE rollout (Flow-GRPO)."""
        return epoch.traj.trainable_steps()[:, : self.trained_steps()]

    def epoch_logs(self, ctx: Ctx, epoch: Epoch) -> dict[str, float]:
        """reward_mean, the method's own scalars (`extra_logs`), then reward_<metric> for each metric."""
        return {"reward_mean": float(epoch.rewards.mean()), **self.extra_logs(epoch),
                **{f"reward_{name}": float(v.mean()) for name, v in epoch.scores.items()}}

    def extra_logs(self, epoch: Epoch) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def collect(self, ctx: Ctx, data) -> Epoch:
        share = data.next(ctx)
        adapter = ctx.adapter
        require_geneval_rows(share.metadata, self.reward_weights)
        prompts = [p for chunk in ctx.all_gather_objects(share.prompts) for p in chunk]
        if self.shared_embeddings:
            embeddings = encode_once(adapter, prompts)
            text = TextEmbeddings.cat([embeddings[p] for p in share.prompts])
        else:
            embeddings, text = None, adapter.encode_prompts(share.prompts)
        shape = adapter.latent_shape(*self.rollout_size(adapter))
        noise = initial_noise(ctx.seed, ctx.unit, share.ids, share.groups, shape, self.same_noise, ctx.device)
        with eval_mode(adapter.transformer):
            rollout = self.sample(ctx, share, text, noise)
        local = self.observe(ctx, rollout, text)
        sde = isinstance(rollout, Trajectory)
        rewards, scores = self.reward_fn(adapter.decode(rollout.final_latents if sde else rollout), share.prompts,
                                         share.metadata)
        # every process needs every sample: advantages are normalised over the epoch, samples dealt over all slots
        epoch = Epoch(prompts=prompts, rewards=ctx.all_gather(rewards.to(ctx.device)).cpu(),
                      groups=torch.tensor([g for chunk in ctx.all_gather_objects(share.groups) for g in chunk]),
                      scores={name: ctx.all_gather(v.to(ctx.device)) for name, v in scores.items()},
                      embeddings=embeddings, extra={name: ctx.all_gather(v) for name, v in local.items()})
        if sde:
            epoch.traj = rollout.map_batch(ctx.all_gather)
        else:
            epoch.latents = ctx.all_gather(rollout.float())
        self.advantages(ctx, epoch)
        epoch.steps = self.trained_columns(ctx, epoch)
        index = torch.arange(len(prompts)) if epoch.kept is None else torch.nonzero(epoch.kept).flatten()
        order = index[torch.randperm(len(index), generator=keyed_generator(ctx.seed, ctx.unit, "order"))]
        epoch.batches = list(order.chunk(self.opt.optimizer_steps_per_epoch))
        epoch.logs = self.epoch_logs(ctx, epoch)
        return epoch

    def unit_logs(self, buffer: Epoch) -> dict[str, float]:
        return buffer.logs

    def updates(self, ctx: Ctx, epoch: Epoch):
        def head(idx, row):  # row: every process's samples of the slot (for modules the engine does not wrap)
            return epoch, idx, row, self.training_text(ctx, epoch, idx)
        return deal_steps(ctx, epoch.batches, epoch.steps.shape[1], head)

    def training_text(self, ctx: Ctx, epoch: Epoch, idx: torch.Tensor) -> TextEmbeddings:
        prompts = [epoch.prompts[int(i)] for i in idx]
        if epoch.embeddings is None:
            return ctx.adapter.encode_prompts(prompts)
        return TextEmbeddings.cat([epoch.embeddings[p] for p in prompts])

    def after_update(self, ctx: Ctx, step: int, end_of_unit: bool) -> None:
        if ctx.roles.ema is not None:
            ctx.roles.ema.step(step - 1)  # 0-based index of the optimizer step just taken


@dataclass(frozen=True, kw_only=True)
class PPOOptions(GroupOptions):
    """Flow-GRPO's SDE rollouts and PPO step (its defaults), shared with the actor-critic."""

    sde_type: str = "flow_sde"
    noise_level: float = 0.7
    sde_window: int = 0  # 3: Flow-GRPO-Fast's window of SDE steps (0: every step stochastic)
    clip_range: float = 1e-4
    beta: float = 0.04
    cfg_train: bool = True

    def check(self) -> None:
        super().check()
        if self.sde_window == 0 and int(self.num_steps * self.timestep_fraction) < 1:
            raise UserError(f"[method] timestep_fraction = {self.timestep_fraction} of {self.num_steps} steps "
                            f"trains no step")


class PPOMethod(GroupRollout):
    """SDE rollouts with per-step log-probs and the PPO-clip (+ KL) step loss: Flow-GRPO and the actor-critic."""

    def trained_steps(self) -> int:
        return self.opt.sde_window if self.opt.sde_window else int(self.opt.num_steps * self.opt.timestep_fraction)

    def train_cfg(self) -> int:
        """Forwards per trained (sample, step): 2 when the recomputation batches [uncond; cond] as the rollout."""
        return self.cfg_factor(training_guidance(self.opt))

    def roles_needed(self) -> list[str]:
        return ["ref"] if self.opt.beta > 0 else []

    def sample(self, ctx: Ctx, share, text, noise) -> Trajectory:
        """The policy's SDE rollout of this process's share, with per-step log-probs (fp32); a "Fast" window is
        drawn once per epoch."""
        o = self.opt
        window = random_window(o.num_steps, o.sde_window, keyed_generator(ctx.seed, ctx.unit, "window")) \
            if o.sde_window else None
        shape = noise.shape[1:]
        return sde_rollout(ctx.adapter, text, noise, num_steps=o.num_steps, guidance=o.guidance, variant=o.sde_type,
                           noise_level=o.noise_level, sde_window=window, velocity=ctx.velocity_of("policy"),
                           noise_fn=lambda i: ctx.randn(shape, share.ids, f"sde_{i}"))

    def policy_terms(self, ctx: Ctx, epoch: Epoch, idx, text, column, advantages) -> LossOutput:
        """The PPO-clip (+ beta KL to "ref") loss of the micro-batch's recorded step (a sum over its samples)."""
        o = self.opt
        traj = epoch.traj.select(idx)
        step = ppo_step(ctx.adapter, traj, epoch.steps[idx, column], text, training_guidance(o),
                        advantages, o.clip_range, o.beta, policy=ctx.velocity_of("policy"),
                        reference=ctx.velocity_of("ref") if o.beta > 0 else None)
        return LossOutput(loss=step.total.sum(), logs=ppo_logs(step, len(idx)))


def training_guidance(opt) -> float:
    """The CFG scale the log-probs are recomputed with: the rollouts' with cfg_train (so the first ratio is 1), else
    1 (the conditional velocity alone)."""
    return opt.guidance if opt.cfg_train else 1.0


def ppo_logs(step: PPOStep, n: int) -> dict[str, tuple[float, float]]:
    """The PPO step's log entries (policy loss, approx KL, clip fraction, and the KL term when there is one)."""
    policy = step.policy
    logs = {"policy_loss": log_pair(policy.per_sample.sum(), n), "approx_kl": log_pair(policy.approx_kl * n, n),
            "clipfrac": log_pair(policy.clipfrac * n, n)}
    if step.kl is not None:
        logs["kl"] = log_pair(step.kl.sum(), n)
    return logs
