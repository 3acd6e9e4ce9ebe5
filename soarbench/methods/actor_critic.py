"""Explicit Critic Guidance: the state-aligned latent actor-critic (arXiv 2605.27736), RECONSTRUCTED.

The paper publishes no code. It gives the components: a timestep-conditioned critic V(z_t, t, c) built on the
diffusion backbone that predicts the final reward from the noisy latent without decoding, conditioned through the
timestep/AdaLN path; value pre-training on rollouts of the frozen policy, then trajectory-level PPO on the SDE
rollout's steps with critic advantages; one value head per reward; test-time steering along the value gradient.
Everything else below is inferred, and the method's recorded version says "reconstructed".

    soarbench train --config benchmarks/shapes/actor_critic.toml --out runs/ac
    accelerate launch --config_file configs/accelerate/ddp.yaml -m soarbench train \\
        --config benchmarks/sd35m/actor_critic.toml --out runs/sd35m-ac
    soarbench eval --model runs/ac/checkpoints/step_000040 --benchmark shapes --steer value=2.0 --out evals/ac-steer

One unit of work is an epoch of m prompts x k images (the data layout of Flow-GRPO; groups play no role in the
advantages):
  1. SDE rollouts of the policy with per-step log-probs (soarbench.rl.rollout.sde_rollout, Flow-GRPO's flow_sde
     step), rewards per reward function (RewardFunction: the raw score of each metric and their weighted sum).
  2. The critic's features at the K trained states z_j (j = the first int(T x timestep_fraction) SDE steps, as
     Flow-GRPO trains): one forward of the FROZEN reference backbone (role "ref": the LoRA-disabled policy, or a
     frozen copy of the initial transformer under full fine-tuning) per sample and state, read at norm_out's
     inputs (soarbench.models.value_head.backbone_features). Counted as no-grad forwards and as value_passes.
  3. Advantages from the critic before this epoch's updates, per step and sample (a per-step baseline):
        A[n, j] = sum_k w_k (R_k[n] - V_k(z_j[n], sigma_j, c_n)),   A <- clip(A / (std(A) + 1e-4), +-adv_clip)
     with std the population std of all N x K entries of the epoch gathered over processes (no mean is subtracted:
     the critic is the baseline). Nothing is dropped.
  4. The shuffled samples split into optimizer_steps_per_epoch steps, dealt over the slots like Flow-GRPO; every
     (slot, trained step) is one micro-batch with
        loss = PPO-clip(ratio, A[n, j]) + beta KL(policy || ref)  (soarbench.rl.ppo, as Flow-GRPO)
             + value_loss_weight * sum_k (V_k(z_j) - R_k)^2       (the critic keeps training on fresh rollouts)
Phase 1 (the first value_pretrain_units epochs): the same rollouts (of the initial, frozen policy), features and
value loss, and no policy term: the policy is not updated (its parameters get no gradient) and no PPO or KL
passes are made.

Inferred choices (not in the paper):
  - critic features from the frozen reference backbone (a frozen trunk keeps the critic's inputs stationary while
    the policy moves, costs no extra backward, and lets evaluation rebuild it from the base model); pooled last
    hidden states (mean over image tokens) and temb, i.e. conditioned through the same timestep/AdaLN path;
  - head: LayerNorm, a 2-layer SiLU MLP trunk (width value_width), one Linear output per reward; MSE to the raw
    per-reward score, every head trained independently on its own reward (the trunk is shared);
  - A_t = R - V(z_t, t) (no GAE: the reward is terminal and the denoising steps are not discounted), normalised
    by the global std only, clipped like Flow-GRPO's advantages;
  - the critic is trained only at the trained states (the same K steps in both phases, so both phases have the
    same micro-batches per optimizer step); value targets are the rewards of the whole trajectory;
  - the value loss is computed on every process over all processes' samples of its slot row and divided by the
    number of processes, so the head (which the engine does not wrap) gets the same gradient on every process
    without an all-reduce, equal to a one-process run's;
  - the value head has its own learning rate (value_lr) and no EMA; it is saved in every checkpoint
    (CHECKPOINT/value_head/) for steering.
Budget: plan(shape) is a phase-2 epoch; `unit_plan(shape, unit)` is the cost of a given epoch (phase 1 makes no
fwd_bwd and no KL forwards). The loop asks unit_plan before each epoch whether it still fits, and the budget
arithmetic printed at the start counts the cheaper phase-1 epochs as what they are; the meter equals unit_plan
epoch by epoch (tests/test_actor_critic.py, tests/test_method_contract.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from soarbench.errors import UserError
from soarbench.harness.budget import UnitCost
from soarbench.harness.rng import keyed_generator
from soarbench.methods.base import Ctx, LossOutput, Micro, ParamGroup, RunShape, deal_steps, log_pair, samples_per_step
from soarbench.methods.flow_grpo import FlowGRPO, eval_mode
from soarbench.models.sd3 import TextEmbeddings
from soarbench.models.value_head import ValueHead, backbone_features, feature_dim
from soarbench.rl.ppo import clipped_policy_loss, kl_to_reference
from soarbench.rl.rewards import RewardFunction
from soarbench.rl.rollout import Trajectory, step_log_prob_under

HEAD = "value_head"  # the name of the head in roles.modules and of its checkpoint component


@dataclass
class Epoch:
    """One epoch's rollouts of ALL processes (gathered), with the critic's features and advantages."""

    traj: Trajectory
    prompts: list[str]
    embeddings: dict  # prompt -> its embedding (shared by the rollout and the training passes)
    steps: torch.Tensor  # (N, K) the trained step indices of each sample
    features: torch.Tensor  # (N, K, F) critic features at the trained states
    targets: torch.Tensor  # (N, H) raw reward per head
    advantages: torch.Tensor  # (N, K)
    parts: list[torch.Tensor]  # the sample indices of each optimizer step
    policy: bool  # phase 2: train the policy too
    logs: dict[str, float] = field(default_factory=dict)


def critic_advantages(rewards: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, eps: float = 1e-4,
                      clip: float = 5.0) -> torch.Tensor:
    """(N, K) advantages from per-reward rewards (N, H), values (N, K, H) and reward weights (H,):
    A = sum_h w_h (R_h - V_h), divided by its population std over all N x K entries (+ eps), clipped."""
    raw = ((rewards[:, None, :].double() - values.double()) * weights.double()).sum(-1)
    return (raw / (raw.std(correction=0) + eps)).clamp(-clip, clip).float()


def value_loss_terms(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, H) squared errors of every head against its own reward."""
    return (predicted.float() - targets.float()) ** 2


class ActorCritic(FlowGRPO):
    name = "actor_critic"
    version = "1-reconstructed (arXiv 2605.27736; no public code)"
    source = "prompts"

    def __init__(self, group_size: int = 4, batch_size: int = 16, num_steps: int = 10, guidance: float = 4.5,
                 sde_type: str = "flow_sde", noise_level: float = 0.7, sde_window: int = 0,
                 clip_range: float = 1e-4, beta: float = 0.04, adv_clip: float = 5.0,
                 timestep_fraction: float = 0.99, optimizer_steps_per_epoch: int = 2, cfg_train: bool = True,
                 rewards: dict[str, float] | None = None, reward_options: dict[str, dict] | None = None,
                 lora: bool = True, lora_r: int = 32, lora_alpha: float = 64, ema: bool = True,
                 ema_decay: float = 0.9, ema_every: int = 8, resolution: int = 0, value_pretrain_units: int = 2,
                 value_loss_weight: float = 1.0, value_lr: float = 1e-3, value_width: int = 256):
        # batch_size = images per epoch over all processes = (prompts per epoch) x group_size; group_size 1 is
        # allowed (Flow-GRPO's __init__, which needs groups of >= 2, is not called): the critic is the baseline
        if group_size < 1 or batch_size < 1 or batch_size % group_size:
            raise UserError(f"[method] batch_size = {batch_size} images is not a whole number of groups of "
                            f"{group_size} (both >= 1)")
        if optimizer_steps_per_epoch < 1 or num_steps < 1 or batch_size % optimizer_steps_per_epoch:
            raise UserError(f"[method] the epoch's {batch_size} images do not split into "
                            f"{optimizer_steps_per_epoch} optimizer steps (both, and num_steps, must be >= 1)")
        if value_pretrain_units < 0 or value_width < 1 or not value_loss_weight > 0:
            raise UserError("[method] value_pretrain_units must be >= 0, value_width >= 1, value_loss_weight > 0")
        # the attributes Flow-GRPO's inherited helpers read (setup, trained_steps, after_update, _size)
        self.k, self.m, self.T, self.g = int(group_size), int(batch_size) // int(group_size), int(num_steps), float(guidance)
        self.variant, self.a, self.window = sde_type, float(noise_level), int(sde_window)
        self.clip, self.beta, self.adv_clip = float(clip_range), float(beta), float(adv_clip)
        self.fraction, self.opt_steps, self.cfg_train = float(timestep_fraction), int(optimizer_steps_per_epoch), bool(cfg_train)
        self.use_lora, self.lora_r, self.lora_alpha = bool(lora), int(lora_r), float(lora_alpha)
        self.use_ema, self.ema_decay, self.ema_every = bool(ema), float(ema_decay), int(ema_every)
        self.resolution = int(resolution)
        self.reward_fn = RewardFunction.from_config(rewards or {"geneval": 1.0}, reward_options or {})
        if self.trained_steps() < 1:
            raise UserError(f"[method] timestep_fraction = {timestep_fraction} of {num_steps} steps trains no step")
        self.pretrain, self.value_weight = int(value_pretrain_units), float(value_loss_weight)
        self.value_lr, self.value_width = float(value_lr), int(value_width)
        self.head: ValueHead | None = None

    # ---- the contract ---------------------------------------------------------------------------------------
    def unit_plan(self, shape: RunShape, unit: int) -> UnitCost:
        """The cost of epoch `unit` (0-based): phase 1 (value pre-training) before value_pretrain_units."""
        n, K = self.m * self.k, self.trained_steps()
        per_step = samples_per_step(n, self.opt_steps, shape)
        cfg = 2 if self.g != 1.0 else 1
        train_cfg = 2 if (self.cfg_train and self.g != 1.0) else 1
        policy = unit >= self.pretrain
        fwd_bwd = n * K * train_cfg if policy else 0
        ref = n * K * train_cfg if (policy and self.beta > 0) else 0
        return UnitCost(images=n, unique_prompts=self.m, no_grad_fwd=n * self.T * cfg + n * K + ref,
                        fwd_bwd=fwd_bwd, reward_calls=n * len(self.reward_fn.names), vae_decodes=n,
                        value_passes=n * K, optimizer_steps=self.opt_steps, micro_batches=shape.accumulation * K,
                        samples_per_step=per_step)

    def plan(self, shape: RunShape) -> UnitCost:
        """A phase-2 epoch (the steady state); unit_plan gives each epoch's own cost, phase 1 included."""
        return self.unit_plan(shape, self.pretrain)

    def setup(self, ctx: Ctx) -> list[ParamGroup]:
        """Flow-GRPO's policy (LoRA or full, EMA, KL reference), the frozen reference backbone for the critic's
        features, and the value head as its own parameter group."""
        groups = super().setup(ctx)
        if self.beta <= 0:
            ctx.roles.add_role("ref")  # the critic's backbone (LoRA: the adapters disabled; full: a frozen copy)
        self.head = ValueHead(self.reward_fn.names, feature_dim(ctx.adapter.transformer.config), self.value_width,
                              self.reward_fn.weights).to(ctx.device)
        return groups + [ParamGroup(ctx.roles.add_module(HEAD, self.head), lr=self.value_lr, name="value")]

    @torch.no_grad()
    def collect(self, ctx: Ctx, data) -> Epoch:
        share = data.next(ctx)
        adapter = ctx.adapter
        prompts_all, embeddings, text, traj = self.rollout(ctx, share)  # Flow-GRPO's rollout
        steps = traj.trainable_steps()[:, : self.trained_steps()]
        with eval_mode(adapter.transformer):
            features = self._features(ctx, traj, steps, text)
        _, parts = self.reward_fn(adapter.decode(traj.final_latents), share.prompts, share.metadata)
        targets = torch.stack([parts[n].to(ctx.device) for n in self.reward_fn.names], dim=1)  # (B, H)
        # every process needs every sample: advantages are normalised globally, samples are dealt over all slots,
        # and every process trains the (unwrapped) value head on the same global batch
        traj = Trajectory(latents=ctx.all_gather(traj.latents), log_probs=ctx.all_gather(traj.log_probs),
                          sigmas=traj.sigmas, trainable=ctx.all_gather(traj.trainable), variant=traj.variant,
                          noise_level=traj.noise_level)
        steps, features, targets = ctx.all_gather(steps), ctx.all_gather(features), ctx.all_gather(targets.float())
        values = self.head(features)  # (N, K, H) the critic before this epoch's updates
        weights = torch.tensor([self.reward_fn.weights[n] for n in self.reward_fn.names], device=targets.device)
        adv = critic_advantages(targets, values, weights, clip=self.adv_clip)
        n = len(prompts_all)
        order = torch.randperm(n, generator=keyed_generator(ctx.seed, ctx.unit, "order"))
        reward = (targets * weights).sum(1)
        logs = {"reward_mean": float(reward.mean()), "phase": 1.0 if ctx.unit < self.pretrain else 2.0,
                "value_mse": float(value_loss_terms(values, targets[:, None, :].expand_as(values)).mean())}
        logs.update({f"reward_{name}": float(targets[:, h].mean()) for h, name in enumerate(self.reward_fn.names)})
        return Epoch(traj=traj, prompts=prompts_all, embeddings=embeddings, steps=steps, features=features,
                     targets=targets, advantages=adv, parts=list(order.chunk(self.opt_steps)),
                     policy=ctx.unit >= self.pretrain, logs=logs)

    def _features(self, ctx: Ctx, traj: Trajectory, steps: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        """(B, K, F) critic features at each sample's trained states, one batched backbone forward per column."""
        rows = torch.arange(traj.batch_size, device=traj.latents.device)
        columns = []
        with ctx.roles.use("ref") as ref:
            for c in range(steps.shape[1]):
                j = steps[:, c]
                columns.append(backbone_features(ctx.adapter, ref, traj.latents[rows, j], traj.sigmas[j].to(
                    traj.latents.device), text).float())
        return torch.stack(columns, dim=1)

    def updates(self, ctx: Ctx, epoch: Epoch):
        def head(idx, row):  # row: every process's samples of the slot, for the head the engine does not wrap
            return epoch, idx, row, TextEmbeddings.cat([epoch.embeddings[epoch.prompts[int(i)]] for i in idx])
        return deal_steps(ctx, epoch.parts, epoch.steps.shape[1], head)

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        epoch, idx, row, text, column = micro.data
        W = ctx.world_size
        # the critic: replicated over processes, so each carries 1/W of it (see the module docstring)
        sq = value_loss_terms(self.head(epoch.features[row, column]), epoch.targets[row])  # (R, H)
        loss = self.value_weight * sq.sum() / W
        logs = {"value_loss": log_pair(sq.sum(1).sum() / W, len(row) / W)}
        for h, name in enumerate(self.reward_fn.names):
            logs[f"value_loss_{name}"] = log_pair(sq[:, h].sum() / W, len(row) / W)
        if not epoch.policy:
            return LossOutput(loss=loss, logs=logs)
        traj = epoch.traj.select(idx)
        j = epoch.steps[idx, column]
        guidance = self.g if self.cfg_train else 1.0
        with ctx.roles.use("policy") as net:
            out = step_log_prob_under(ctx.adapter, traj, j, text, guidance, transformer=net)
        n = len(idx)
        policy = clipped_policy_loss(out.log_prob, traj.log_probs[torch.arange(n), j], epoch.advantages[idx, column],
                                     self.clip)
        per_sample = policy.per_sample
        logs.update({"policy_loss": log_pair(per_sample.sum(), n), "approx_kl": log_pair(policy.approx_kl * n, n),
                     "clipfrac": log_pair(policy.clipfrac * n, n)})
        if self.beta > 0:
            with torch.no_grad(), ctx.roles.use("ref") as ref_net:
                ref = step_log_prob_under(ctx.adapter, traj, j, text, guidance, transformer=ref_net)
            kl = kl_to_reference(out.mean, ref.mean, out.kl_std)
            per_sample = per_sample + self.beta * kl
            logs["kl"] = log_pair(kl.sum(), n)
        return LossOutput(loss=loss + per_sample.sum(), logs=logs)

    def export(self, ctx: Ctx) -> dict[str, torch.nn.Module]:
        """The policy's components and the value head (CHECKPOINT/value_head/, read by --steer)."""
        return {**super().export(ctx), HEAD: self.head}

    def describe(self) -> dict:
        return {**super().describe(), "reconstructed": True}
