"""Flow-GRPO's per-step objective: the PPO-clip policy loss and the KL penalty (arXiv 2505.05470, yifan123/flow_grpo).

For one trained step of each of B trajectories, with log p_old recorded at rollout and r = exp(log p - log p_old):

    L_policy = mean_n max(-A_n r_n, -A_n clip(r_n, 1 - eps, 1 + eps)),      eps = clip_range (1e-4)

Its gradient is -A r d(log p) wherever the unclipped term is the max, and 0 where the clipped term is: once the
ratio has moved past 1 +- eps in the direction the advantage rewards (A > 0 and r > 1 + eps, or A < 0 and
r < 1 - eps). A move in the wrong direction is never clipped, so it can always be undone.

KL to the reference policy (the same network with the LoRA off), per sample:

    KL_n = mean over C*H*W of (mean_n - mean_ref_n)^2 / (2 std_n^2)

where mean is the SDE step's deterministic part. Flow-GRPO's std here is its diffusion coefficient, not the
step's std (see rollout.kl_std); the total loss is L_policy + beta mean_n KL_n. `ppo_step` is that whole per-step
loss on recorded trajectories (Flow-GRPO, the actor-critic, and DanceGRPO with beta = 0).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from soarbench.models.sd3 import TextEmbeddings
from soarbench.rl.rollout import Trajectory, step_log_prob_under
from soarbench.sampling.ode import Velocity


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar: mean of per_sample, differentiable
    per_sample: torch.Tensor  # (B,) max(-A r, -A clip(r)), differentiable (for pooling over ranks)
    ratio: torch.Tensor  # (B,) detached
    approx_kl: torch.Tensor  # scalar, detached: 0.5 mean (log p - log p_old)^2, the reference's diagnostic
    clipfrac: torch.Tensor  # scalar, detached: fraction of samples with |r - 1| > eps


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float = 1e-4) -> PolicyLoss:
    """PPO-clip on (B,) log-probs; `old_log_prob` and `advantages` are constants (detached here)."""
    if not log_prob.shape == old_log_prob.shape == advantages.shape or log_prob.dim() != 1:
        raise ValueError(f"expected three (B,) tensors, got {tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, "
                         f"{tuple(advantages.shape)}")
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        approx_kl = 0.5 * (log_ratio**2).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return PolicyLoss(per_sample.mean(), per_sample, ratio.detach(), approx_kl, clipfrac)


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """(B,) per-sample mean over non-batch elements of (mean - ref_mean)^2 / (2 std^2); ref_mean is a constant.

    `std` is a number, one value per sample ((B,) or (B, 1, ..., 1)) or per element.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and reference mean {tuple(ref_mean.shape)} differ in shape")
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if std.dim() == 1:
        std = std.reshape(-1, *([1] * (mean.dim() - 1)))
    sq = (mean.float() - ref_mean.detach().float()) ** 2 / (2 * std**2)
    return sq.flatten(1).mean(dim=1)


class PPOStep(NamedTuple):
    total: torch.Tensor  # (B,) PPO-clip + beta KL per sample, differentiable
    policy: PolicyLoss
    kl: torch.Tensor | None  # (B,) the KL to the reference (None when beta == 0: no reference forward)


def ppo_step(adapter, traj: Trajectory, step_index: torch.Tensor, text: TextEmbeddings, guidance: float,
             advantages: torch.Tensor, clip_range: float, beta: float = 0.0, policy: Velocity | None = None,
             reference: Velocity | None = None) -> PPOStep:
    """The per-sample loss of one recorded step j of each trajectory: its log-prob recomputed under `policy` (with
    gradient), PPO-clip against the recorded log-prob with the (B,) advantages, and with beta > 0 the KL to the
    step's mean under `reference` (no gradient)."""
    out = step_log_prob_under(adapter, traj, step_index, text, guidance, velocity=policy)
    loss = clipped_policy_loss(out.log_prob, traj.log_prob_at(step_index), advantages, clip_range)
    if beta <= 0:
        return PPOStep(loss.per_sample, loss, None)
    with torch.no_grad():
        ref = step_log_prob_under(adapter, traj, step_index, text, guidance, velocity=reference)
    kl = kl_to_reference(out.mean, ref.mean, out.kl_std)
    return PPOStep(loss.per_sample + beta * kl, loss, kl)
