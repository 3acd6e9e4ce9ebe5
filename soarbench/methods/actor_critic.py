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
  2. The critic's values at the K trained states z_j (j = the first int(T x timestep_fraction) SDE steps, as
     Flow-GRPO trains): one no-grad forward of the critic's backbone per sample and state, read at norm_out's
     inputs (soarbench.models.value_head.backbone_features), then the head. The backbone (option `critic`):
       "diffusion" (default; the paper's "the diffusion model itself functions as a timestep-conditioned value
                   function"): the transformer with a trainable adapter of its own: a second peft LoRA adapter
                   "critic" beside the policy's "default" (same r, alpha and projections; B = 0 at the start, so
                   the critic starts from the base model), or, under full fine-tuning, a trainable copy of the
                   initial transformer (roles.modules["critic"]; its norm_out and proj_out, which the features do
                   not read, stay frozen);
       "head":     the FROZEN reference backbone (role "ref": the LoRA-disabled policy, or a frozen copy of the
                   initial transformer), only the MLP head trains (cheaper; the features are computed once here
                   and reused by the value loss).
     Counted as no-grad forwards and as value_passes.
  3. Advantages from the critic before this epoch's updates, per step and sample (a per-step baseline):
        A[n, j] = sum_k w_k (R_k[n] - V_k(z_j[n], sigma_j, c_n)),   A <- clip(A / (std(A) + 1e-4), +-adv_clip)
     with std the population std of all N x K entries of the epoch gathered over processes (no mean is subtracted:
     the critic is the baseline). Nothing is dropped.
  4. The shuffled samples split into optimizer_steps_per_epoch steps, dealt over the slots like Flow-GRPO; every
     (slot, trained step) is one micro-batch with
        loss = PPO-clip(ratio, A[n, j]) + beta KL(policy || ref)  (soarbench.rl.ppo, as Flow-GRPO)
             + value_loss_weight * sum_k (V_k(z_j) - R_k)^2       (the critic keeps training on fresh rollouts)
     With critic = "diffusion" the value term is a forward+backward of the critic's backbone and head at
     (z_j, sigma_j, c) per sample (counted as fwd_bwd and value_passes); with "head" it reuses step 2's features.
Phase 1 (the first value_pretrain_units epochs): the same rollouts (of the initial, frozen policy), features and
value loss, and no policy term: the policy is not updated (its parameters get no gradient) and no PPO or KL
passes are made.

Inferred choices (not in the paper):
  - the critic's backbone (critic = "diffusion", the default): the paper's own diffusion model as the value
    function, realised as the same transformer with an adapter of its own (a LoRA of the policy's rank, or a
    trainable copy under full fine-tuning), so the critic shares no trained weights with the actor and the
    policy's LoRA never sees the value loss; its learning rate is critic_lr (default train.lr); no EMA.
    critic = "head" keeps the cheaper earlier reconstruction: features of the frozen reference backbone (a
    stationary input while the policy moves, no extra backward, rebuilt from the base model by evaluation);
  - the features: pooled last hidden states (mean over image tokens) and temb read at norm_out, i.e. conditioned
    through the same timestep/AdaLN path as the velocity;
  - head: LayerNorm, a 2-layer SiLU MLP trunk (width value_width), one Linear output per reward; MSE to the raw
    per-reward score, every head trained independently on its own reward (the trunk is shared);
  - A_t = R - V(z_t, t) (no GAE: the reward is terminal and the denoising steps are not discounted), normalised
    by the global std only, clipped like Flow-GRPO's advantages;
  - the critic is trained only at the trained states (the same K steps in both phases, so both phases have the
    same micro-batches per optimizer step); value targets are the rewards of the whole trajectory;
  - critic = "head": the value loss is computed on every process over all processes' samples of its slot row and
    divided by the number of processes, so the head (which the engine does not wrap) gets the same gradient on
    every process without an all-reduce, equal to a one-process run's; critic = "diffusion": each process
    computes its own samples' value loss, and the critic's backbone adapter and head, wrapped together in a
    DistributedDataParallel of their own (soarbench.models.value_head.DiffusionCritic; the engine's wrapper holds
    the policy alone), get the process average like the policy, reduced on the accumulation's last micro-batch;
    multi-process runs need DDP for it (DeepSpeed / FSDP are refused in one line);
  - the value head has its own learning rate (value_lr) and no EMA; it is saved in every checkpoint
    (CHECKPOINT/value_head/, with the diffusion critic's LoRA or transformer beside it) for steering, which
    reads its features from the backbone it was trained on.
The critic option is part of the recorded method version (run.json, checkpoints and evaluations).
Budget: plan(shape) is a phase-2 epoch; `unit_plan(shape, unit)` is the cost of a given epoch (phase 1 makes no
policy fwd_bwd and no KL forwards). The diffusion critic adds n x K fwd_bwd (and n x K value_passes) per epoch, in
both phases, to the head's cost. The loop asks unit_plan before each epoch whether it still fits, and the budget
arithmetic printed at the start counts the cheaper phase-1 epochs as what they are; the meter equals unit_plan
epoch by epoch (tests/test_actor_critic.py, tests/test_method_contract.py).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from soarbench.cost import UnitCost
from soarbench.errors import UserError
from soarbench.methods.base import Ctx, LossOutput, Micro, ParamGroup, RunShape, eval_mode, log_pair, \
    require_frozen_copies
from soarbench.methods.group import Epoch, PPOMethod, PPOOptions
from soarbench.models.sd3 import TextEmbeddings
from soarbench.models.value_head import (CriticExport, DiffusionCritic, ValueHead, backbone_features, feature_dim,
                                         lora_adapter_active, recompute_inside)
from soarbench.rl.rollout import Trajectory

HEAD = "value_head"  # the name of the head in roles.modules and of its checkpoint component
CRITIC = "critic"  # the diffusion critic's LoRA adapter (peft) / its trainable copy in roles.modules
CRITICS = ("diffusion", "head")
VERSION = "1-reconstructed (arXiv 2605.27736; no public code)"


def critic_advantages(rewards: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, eps: float = 1e-4,
                      clip: float = 5.0) -> torch.Tensor:
    """(N, K) advantages from per-reward rewards (N, H), values (N, K, H) and reward weights (H,):
    A = sum_h w_h (R_h - V_h), divided by its population std over all N x K entries (+ eps), clipped."""
    raw = ((rewards[:, None, :].double() - values.double()) * weights.double()).sum(-1)
    return (raw / (raw.std(correction=0) + eps)).clamp(-clip, clip).float()


def value_loss_terms(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, H) squared errors of every head against its own reward."""
    return (predicted.float() - targets.float()) ** 2


@dataclass(frozen=True, kw_only=True)
class ActorCriticOptions(PPOOptions):
    value_pretrain_units: int = 2
    value_loss_weight: float = 1.0
    value_lr: float = 1e-3
    value_width: int = 256
    critic: str = "diffusion"
    critic_lr: float | None = None  # None: train.lr

    min_group = 1  # the critic, not the group, is the baseline: groups of one are allowed
    min_group_why = "(the critic is the baseline)"

    def check(self) -> None:
        super().check()
        if self.value_pretrain_units < 0 or self.value_width < 1 or not self.value_loss_weight > 0:
            raise UserError("[method] value_pretrain_units must be >= 0, value_width >= 1, value_loss_weight > 0")
        if self.critic not in CRITICS:
            raise UserError(f"[method] critic must be \"diffusion\" (the transformer with its own adapter, the "
                            f"paper's) or \"head\" (an MLP on the frozen reference backbone), got '{self.critic}'")
        lr = None if self.critic_lr in (None, "") else self.critic_lr  # "" is how a printed config writes None
        if lr is not None and not float(lr) > 0:
            raise UserError(f"[method] critic_lr must be > 0 (or left out: train.lr), got {lr}")
        object.__setattr__(self, "critic_lr", None if lr is None else float(lr))


class ActorCritic(PPOMethod):
    """Flow-GRPO's sibling: the same rollouts and PPO step, with critic advantages and a value loss."""

    name = "actor_critic"
    version = VERSION  # each instance adds its critic: "...; critic = diffusion"
    Options = ActorCriticOptions

    def __init__(self, **options):
        super().__init__(**options)
        self.pretrain = self.opt.value_pretrain_units
        self.critic = self.opt.critic
        self.version = f"{VERSION}; critic = {self.critic}"
        self.head: ValueHead | None = None
        self._critic_params: list[torch.nn.Parameter] = []  # the diffusion critic's backbone weights that train
        self._critic_net: torch.nn.Module | None = None  # DiffusionCritic (DDP-wrapped over processes), built lazily

    # ---- the contract ---------------------------------------------------------------------------------------
    def unit_plan(self, shape: RunShape, unit: int) -> UnitCost:
        """The cost of epoch `unit` (0-based): phase 1 (value pre-training) before value_pretrain_units."""
        n, K = self.opt.batch_size, self.trained_steps()
        policy = unit >= self.pretrain
        trained = n * K * self.train_cfg() if policy else 0
        ref = trained if self.opt.beta > 0 else 0
        critic = n * K if self.critic == "diffusion" else 0  # the value loss's backbone passes, with gradient
        return self.epoch_cost(shape, no_grad_fwd=n * K + ref, fwd_bwd=trained + critic, value_passes=n * K + critic)

    def plan(self, shape: RunShape) -> UnitCost:
        """A phase-2 epoch (the steady state); unit_plan gives each epoch's own cost, phase 1 included."""
        return self.unit_plan(shape, self.pretrain)

    def roles_needed(self) -> list[str]:
        """Flow-GRPO's KL reference, which the head critic also reads its features from."""
        return ["ref"] if self.opt.beta > 0 or self.critic == "head" else []

    def setup(self, ctx: Ctx) -> list[ParamGroup]:
        """Flow-GRPO's policy (LoRA or full, EMA, KL reference), the critic's backbone (its own adapter, or the
        frozen reference), and the value head as its own parameter group (the critic's adapter another)."""
        groups = super().setup(ctx)
        diffusion = self.critic == "diffusion"
        backbone = ("critic_lora" if self.opt.lora else "critic_transformer") if diffusion else "reference"
        self.head = ValueHead(self.reward_fn.names, feature_dim(ctx.adapter.transformer.config),
                              self.opt.value_width, self.reward_fn.weights, backbone).to(ctx.device)
        groups = groups + [ParamGroup(ctx.roles.add_module(HEAD, self.head), lr=self.opt.value_lr, name="value")]
        if diffusion:
            groups.append(ParamGroup(self._add_critic(ctx), lr=self.opt.critic_lr, name="critic"))
        return groups

    def _add_critic(self, ctx: Ctx) -> list[torch.nn.Parameter]:
        """The diffusion critic's backbone: a LoRA adapter of its own on the policy's peft model, or (full
        fine-tuning) a trainable copy of the initial transformer. Returns its trainable parameters."""
        engine = ctx.engine
        if engine is not None and engine.distributed and engine.name.startswith(("deepspeed", "fsdp")):
            raise UserError(f"[method] actor_critic with critic = \"diffusion\" reduces the critic's gradients with "
                            f"a DDP wrapper of its own, which the {engine.name} engine does not run: use a DDP "
                            f"accelerate config, or critic = \"head\"")
        roles = ctx.roles
        if self.opt.lora:
            from peft import LoraConfig

            from soarbench.models import lora as L

            peft = L.peft_model(roles.base)
            config = peft.peft_config["default"].to_dict()
            peft.add_adapter(CRITIC, LoraConfig(**{k: v for k, v in config.items()
                                                   if k in LoraConfig.__dataclass_fields__}))
            peft.set_adapter("default")  # the policy stays the active adapter
            params = [p for n, p in peft.named_parameters() if "lora_" in n and f".{CRITIC}." in n]
            for n, p in peft.named_parameters():  # the policy's LoRA trains; the critic's is switched on lazily
                if "lora_" in n:
                    p.requires_grad_(f".{CRITIC}." not in n)
        else:
            require_frozen_copies(ctx, "actor_critic", "the critic's trainable copy")
            module = copy.deepcopy(ctx.adapter.transformer).train()
            module.requires_grad_(True)
            for name, p in module.named_parameters():  # the features are read before norm_out: these never train
                if name.startswith(("norm_out.", "proj_out.")):
                    p.requires_grad_(False)
            roles.add_module(CRITIC, module)
            params = [p for p in module.parameters() if p.requires_grad]
        self._critic_params = params
        return params

    def _critic(self, ctx: Ctx) -> torch.nn.Module:
        """The DiffusionCritic module (the critic's backbone and the head): built on first use, after the engine
        wrapped the policy, so that the engine's DDP does not hold the critic's weights; over several processes a
        DDP wrapper of its own reduces the critic's gradients (its weights are the only ones requiring grad while
        it is built)."""
        if self._critic_net is None:
            backbone = ctx.roles.base if self.opt.lora else ctx.roles.modules[CRITIC]
            module = DiffusionCritic(ctx.adapter, backbone, self.head)
            if ctx.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel

                own = {id(p) for p in self._critic_params + list(self.head.parameters())}
                others = [p for p in module.parameters() if p.requires_grad and id(p) not in own]
                for p in others:
                    p.requires_grad_(False)
                for p in self._critic_params:
                    p.requires_grad_(True)
                try:
                    module = DistributedDataParallel(module, device_ids=None, broadcast_buffers=False)
                finally:
                    for p in others:
                        p.requires_grad_(True)
            self._critic_net = module
        for p in self._critic_params:  # peft's adapter switches (the LoRA-disabled "ref") turn the flags off
            p.requires_grad_(True)
        return self._critic_net

    def critic_values(self, ctx: Ctx, z: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings,
                      sync: bool = True) -> torch.Tensor:
        """(B, H) values of the diffusion critic at (z, sigma, text): one forward of its backbone (with gradient
        when enabled: a forward+backward pass) and the head. `sync`: the DDP wrapper reduces this backward's
        gradients (the accumulation's last micro-batch)."""
        net = self._critic(ctx)
        if hasattr(net, "require_backward_grad_sync"):
            net.require_backward_grad_sync = bool(sync)  # read by DDP's forward, as its no_sync() does
        if not self.opt.lora:
            return net(z, sigma, text)
        from soarbench.models import lora as L

        peft = L.peft_model(ctx.roles.base)
        # under gradient checkpointing the blocks are recomputed in the backward, when the policy's adapter is
        # active again: the recomputation switches the critic's adapter on too
        with lora_adapter_active(peft, CRITIC), recompute_inside(peft, lambda: lora_adapter_active(peft, CRITIC)):
            return net(z, sigma, text)

    def observe(self, ctx: Ctx, traj: Trajectory, text: TextEmbeddings) -> dict[str, torch.Tensor]:
        """The critic's features at this share's trained states, before this epoch's updates."""
        critic = ctx.roles.modules.get(CRITIC, ctx.adapter.transformer)
        with eval_mode(ctx.adapter.transformer), eval_mode(critic):
            return {"features": self._features(ctx, traj, traj.trainable_steps()[:, : self.trained_steps()], text)}

    def advantages(self, ctx: Ctx, epoch: Epoch) -> None:
        """A[n, j] = sum_h w_h (R_h - V_h(z_j)) over the epoch, normalised by its std (module docstring)."""
        targets = torch.stack([epoch.scores[n].float() for n in self.reward_fn.names], dim=1)  # (N, H)
        values = self.head(epoch.extra["features"])  # (N, K, H) the critic before this epoch's updates
        weights = torch.tensor([self.reward_fn.weights[n] for n in self.reward_fn.names], device=targets.device)
        epoch.advantages = critic_advantages(targets, values, weights, clip=self.opt.adv_clip)
        epoch.extra.update(targets=targets, values=values, weights=weights)
        epoch.train_policy = ctx.unit >= self.pretrain

    def epoch_logs(self, ctx: Ctx, epoch: Epoch) -> dict[str, float]:
        targets, values = epoch.extra["targets"], epoch.extra["values"]
        reward = (targets * epoch.extra["weights"]).sum(1)
        logs = {"reward_mean": float(reward.mean()), "phase": 1.0 if ctx.unit < self.pretrain else 2.0,
                "value_mse": float(value_loss_terms(values, targets[:, None, :].expand_as(values)).mean())}
        logs.update({f"reward_{name}": float(targets[:, h].mean()) for h, name in enumerate(self.reward_fn.names)})
        return logs

    def _features(self, ctx: Ctx, traj: Trajectory, steps: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        """(B, K, F) critic features at each sample's trained states, one batched backbone forward per column (the
        critic's own backbone, or the frozen reference)."""
        rows = torch.arange(traj.batch_size, device=traj.latents.device)
        columns = []
        with self._backbone(ctx) as net:
            for c in range(steps.shape[1]):
                j = steps[:, c]
                columns.append(backbone_features(ctx.adapter, net, traj.latents[rows, j], traj.sigmas[j].to(
                    traj.latents.device), text).float())
        return torch.stack(columns, dim=1)

    @contextlib.contextmanager
    def _backbone(self, ctx: Ctx):
        """The module the critic's features come from inside the block (no DDP wrapper: no gradient here)."""
        if self.critic == "head":
            with ctx.roles.use("ref") as ref:
                yield ref
        elif self.opt.lora:
            from soarbench.models import lora as L

            with lora_adapter_active(L.peft_model(ctx.roles.base), CRITIC) as peft:
                yield peft
        else:
            yield ctx.roles.modules[CRITIC]

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        epoch, idx, row, text, column = micro.data
        targets = epoch.extra["targets"]
        if epoch.train_policy:
            out = self.policy_terms(ctx, epoch, idx, text, column, epoch.advantages[idx, column])
        else:
            out = LossOutput(loss=torch.zeros((), device=targets.device), logs={})
        # the critic's term last: nothing switches adapters (and the critic's requires_grad) before the backward
        if self.critic == "diffusion":
            # each process its own samples; the critic's DDP wrapper averages like the engine's (module docstring)
            engine = getattr(ctx, "engine", None)
            sync = engine is None or engine.acc.sync_gradients
            traj, j = epoch.traj.select(idx), epoch.steps[idx, column]
            n = len(idx)
            values = self.critic_values(ctx, traj.latents[torch.arange(n, device=j.device), j],
                                        traj.sigmas[j].to(traj.latents.device), text, sync=sync)
            sq, count, W = value_loss_terms(values, targets[idx]), n, 1
        else:
            # the head: replicated over processes, so each carries 1/W of it (see the module docstring)
            W = ctx.world_size
            sq, count = value_loss_terms(self.head(epoch.extra["features"][row, column]), targets[row]), len(row)
        logs = {"value_loss": log_pair(sq.sum(1).sum() / W, count / W)}
        for h, name in enumerate(self.reward_weights):
            logs[f"value_loss_{name}"] = log_pair(sq[:, h].sum() / W, count / W)
        return LossOutput(loss=out.loss + self.opt.value_loss_weight * sq.sum() / W, logs={**out.logs, **logs})

    def export(self, ctx: Ctx) -> dict[str, torch.nn.Module]:
        """The policy's components and the value head (CHECKPOINT/value_head/, read by --steer), with the diffusion
        critic's own LoRA (peft layout) or transformer beside it."""
        head = self.head
        if self.critic == "diffusion" and self.opt.lora:
            from peft import get_peft_model_state_dict

            from soarbench.models import lora as L

            peft = L.peft_model(ctx.roles.base)
            head = CriticExport(self.head, lora_state=get_peft_model_state_dict(peft, adapter_name=CRITIC),
                                lora_config=peft.peft_config[CRITIC].to_dict())
        elif self.critic == "diffusion":
            head = CriticExport(self.head, transformer=ctx.roles.modules[CRITIC])
        return {**super().export(ctx), HEAD: head}

    def describe(self) -> dict:
        return {**super().describe(), "reconstructed": True, "critic": self.critic}
