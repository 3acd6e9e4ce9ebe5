"""Flow-GRPO (arXiv 2505.05470): online RL with group-relative advantages and a clipped PPO objective.

Per epoch (see shared/specs/flow_grpo.md):
  1. m prompts, each repeated k times (a group); CFG rollouts with the SDE step (flow_sde with noise level a, or
     cps; optionally the "Fast" window of SDE steps with ODE elsewhere), per-step log-probs in fp32;
  2. rewards = weighted sum of raw scores from the metric registry (GenEval: partial credit);
     A = (r - group mean) / (global std + 1e-4), clipped to +-5; groups whose advantage is 0 are dropped;
  3. for each kept sample and each trained timestep (the first int(T * 0.99), or the window):
     ratio = exp(logp_theta - logp_old), loss = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))
     + beta * mean((mean_theta - mean_ref)^2) / (2 std^2), the reference being the net with LoRA disabled.
The harness owns the loop (harness/online.py); this file holds the rollout-to-loss arithmetic.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from soarbench.errors import UserError
from soarbench.harness.budget import StepCost
from soarbench.methods.base import LossOutput, StepContext
from soarbench.models.sd3 import TextEmbeddings
from soarbench.rl import lora as L
from soarbench.rl.advantages import group_advantages, nonzero_groups
from soarbench.rl.ppo import clipped_policy_loss, kl_to_reference
from soarbench.rl.rewards import RewardFunction
from soarbench.rl.rollout import Trajectory, random_window, sde_rollout, step_log_prob_under


@dataclass
class Epoch:
    """One epoch's rollouts on this rank, ready for training."""

    traj: Trajectory
    text: TextEmbeddings
    advantages: torch.Tensor  # (B,)
    keep: torch.Tensor  # (B,) bool: sample's group has a non-zero advantage
    steps: torch.Tensor  # (B, K) the trained timestep indices of each sample
    images: int = 0
    no_grad_fwd: int = 0
    reward_calls: int = 0
    logs: dict[str, float] = field(default_factory=dict)


class FlowGRPO:
    name = "flow_grpo"
    online = True

    def __init__(self, group_size: int = 4, batch_size: int = 16, num_steps: int = 10, guidance: float = 4.5,
                 sde_type: str = "flow_sde", noise_level: float = 0.7, sde_window: int = 0,
                 clip_range: float = 1e-4, beta: float = 0.04, global_std: bool = True, adv_clip: float = 5.0,
                 timestep_fraction: float = 0.99, optimizer_steps_per_epoch: int = 2, cfg_train: bool = True,
                 rewards: dict[str, float] | None = None, reward_options: dict[str, dict] | None = None,
                 lora: bool = True, lora_r: int = 32, lora_alpha: float = 64, ema: bool = True,
                 ema_decay: float = 0.9, ema_every: int = 8, micro_batch: int = 0, resolution: int = 0):
        # batch_size = images per epoch over all ranks = (unique prompts per epoch) x group_size
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
        self.use_ema, self.ema_decay, self.ema_every, self.micro = bool(ema), float(ema_decay), int(ema_every), int(micro_batch)
        self.resolution = int(resolution)  # rollout size in pixels; 0: the VAE's sample_size (SD3.5: set 512)
        self.reward_fn = RewardFunction.from_config(rewards or {"geneval": 1.0}, reward_options or {})
        self.model = None  # the peft model (LoRA) or the transformer (full fine-tune)
        self.reference = None  # a frozen copy for full fine-tuning with beta > 0
        self.ema: L.EMA | None = None

    # ---- the harness's hooks ---------------------------------------------------------------------------
    def trained_steps(self) -> int:
        return self.window if self.window else int(self.T * self.fraction)

    def cost(self, world_size: int) -> StepCost:
        """One epoch (all ranks): rollouts, rewards, and the gradient passes of its optimizer steps."""
        n, cfg = self.m * self.k, 2 if self.g != 1.0 else 1
        train_cfg = 2 if (self.cfg_train and self.g != 1.0) else 1
        k = self.trained_steps()
        ref = n * k * train_cfg if self.beta > 0 else 0
        return StepCost(images=n, unique_prompts=self.m, no_grad_fwd=n * self.T * cfg + ref,
                        fwd_bwd=n * k * train_cfg, reward_calls=n * len(self.reward_fn.names),
                        optimizer_steps=self.opt_steps)

    def setup(self, adapter, device) -> list[torch.nn.Parameter]:
        """Attach LoRA (or unfreeze the transformer) and return the parameters the optimizer trains."""
        if self.use_lora:
            adapter.transformer.requires_grad_(False)
            self.model = L.add_lora(adapter.transformer, r=self.lora_r, alpha=self.lora_alpha)
            params = L.lora_parameters(self.model)
        else:
            if self.beta > 0:
                self.reference = copy.deepcopy(adapter.transformer).requires_grad_(False).eval()
            self.model = adapter.transformer.requires_grad_(True)
            params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        if self.use_ema:
            self.ema = L.EMA(params, decay=self.ema_decay, every=self.ema_every)
        return params

    def export_transformer(self):
        """What a checkpoint saves as its transformer: the EMA weights (what evaluation uses), LoRA merged."""
        ctx = self.ema.swap() if self.ema is not None else _null()
        with ctx:
            return L.merged_copy(self.model) if self.use_lora else copy.deepcopy(self.model)

    def eval_weights(self):
        return self.ema.swap() if self.ema is not None else _null()

    def state_dict(self) -> dict[str, Any]:
        state = {"ema": self.ema.state_dict() if self.ema is not None else None}
        state["lora"] = L.lora_state_dict(self.model) if self.use_lora else None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.use_lora and state.get("lora") is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(L.peft_model(self.model), state["lora"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    # ---- rollouts --------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, ctx: StepContext, group_ids: list[int], prompts: list[str], metadata: list[dict | None],
                gather) -> Epoch:
        adapter = ctx.adapter
        if any(m is None for m in metadata) and "geneval" in self.reward_fn.names:
            raise UserError("data: the GenEval reward needs GenEval rows (tag, include) on every training line")
        text = adapter.encode_prompts(prompts)
        shape = adapter.latent_shape(*self._size(adapter))
        gen = ctx.generator
        noise = torch.randn((len(prompts), *shape), generator=gen, device=gen.device).to(adapter.device)
        window = random_window(self.T, self.window, gen) if self.window else None
        was = adapter.transformer.training
        adapter.transformer.eval()
        traj = sde_rollout(adapter, text, noise, num_steps=self.T, guidance=self.g, variant=self.variant,
                           noise_level=self.a, sde_window=window, generator=gen)
        adapter.transformer.train(was)
        from soarbench.evaluate import to_pil

        images = to_pil(adapter.decode(traj.final_latents))
        rewards, parts = self.reward_fn(images, prompts, metadata)
        # advantages use every rank's rewards: gather (group id, reward) pairs
        pairs = [p for chunk in gather(list(zip(group_ids, rewards.tolist()))) for p in chunk]
        all_groups = [g for g, _ in pairs]
        adv_all = group_advantages(torch.tensor([r for _, r in pairs]), all_groups, global_std=self.global_std,
                                   clip=self.adv_clip)
        keep_all = nonzero_groups(adv_all, all_groups)
        offset = _rank_offset(gather, len(prompts))
        adv = adv_all[offset:offset + len(prompts)].to(adapter.device)
        keep = keep_all[offset:offset + len(prompts)].to(adapter.device)
        steps = traj.trainable_steps()[:, : self.trained_steps()]
        cfg = 2 if self.g != 1.0 else 1
        logs = {"reward_mean": float(torch.tensor([r for _, r in pairs]).mean()),
                "kept_fraction": float(keep_all.float().mean())}
        logs.update({f"reward_{n}": float(v.mean()) for n, v in parts.items()})
        return Epoch(traj=traj, text=text, advantages=adv, keep=keep, steps=steps, images=len(prompts),
                     no_grad_fwd=len(prompts) * self.T * cfg, reward_calls=len(prompts) * len(self.reward_fn.names),
                     logs=logs)

    def _size(self, adapter) -> tuple[int, int]:
        size = self.resolution or int(adapter.vae.config.sample_size)
        return size, size

    # ---- the loss on one micro-batch at one trained timestep column --------------------------------------
    def loss(self, ctx: StepContext, epoch: Epoch, idx: torch.Tensor, column: int) -> LossOutput:
        adapter = ctx.adapter
        traj, text = epoch.traj.select(idx), epoch.text[idx]
        j = epoch.steps[idx, column]
        guidance = self.g if self.cfg_train else 1.0
        out = step_log_prob_under(adapter, traj, j, text, guidance)
        policy = clipped_policy_loss(out.log_prob, traj.log_probs[torch.arange(len(idx)), j],
                                     epoch.advantages[idx], self.clip)
        loss = policy.loss
        n = len(idx)
        passes = n * (2 if guidance != 1.0 else 1)
        logs = {"policy_loss": float(policy.loss.detach()), "approx_kl": float(policy.approx_kl),
                "clipfrac": float(policy.clipfrac)}
        ref_passes = 0
        if self.beta > 0:
            with torch.no_grad():
                if self.use_lora:
                    with L.adapters_disabled(self.model):
                        ref = step_log_prob_under(adapter, traj, j, text, guidance)
                else:
                    ref = step_log_prob_under(adapter, traj, j, text, guidance, transformer=self.reference)
            kl = kl_to_reference(out.mean, ref.mean, out.kl_std).mean()
            loss = loss + self.beta * kl
            logs["kl"] = float(kl.detach())
            ref_passes = passes
        return LossOutput(loss=loss, logs=logs, fwd_bwd=passes, no_grad_fwd=ref_passes)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _rank_offset(gather, n_local: int) -> int:
    """Where this rank's samples start in the gathered list (ranks hold equal shares, in rank order)."""
    sizes = gather(n_local)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return sum(sizes[:rank])
