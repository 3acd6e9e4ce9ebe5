"""Rectified-flow arithmetic shared by every method: the shifted training grid, timestep sampling, loss weights.

SD3 convention: z_sigma = (1 - sigma) z0 + sigma z1, sigma = 1 is pure noise, target velocity v = z1 - z0.
The training grid has `num_train_timesteps` (1000) entries; entry i has unshifted s = (N - i) / N and
sigma = shift * s / (1 + (shift - 1) * s), exactly FlowMatchEulerDiscreteScheduler's training sigmas.
"""
from __future__ import annotations

import math

import torch

WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "uniform")


def training_sigmas(shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    s = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float64) / num_train_timesteps
    return (shift * s / (1 + (shift - 1) * s)).float()


def grid_index(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Unshifted time t in [0, 1] (1 = noise) -> grid index, as the reference maps it."""
    return torch.clamp(torch.floor((1 - t) * num_train_timesteps), 0, num_train_timesteps - 1).long()


def snap_to_grid(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The grid sigma nearest to each continuous sigma (used for the conditioning timestep only)."""
    idx = (sigma.reshape(-1, 1) - sigmas.to(sigma).reshape(1, -1)).abs().argmin(dim=1)
    return sigmas.to(sigma)[idx].reshape(sigma.shape)


def sample_unshifted_t(n: int, scheme: str, generator: torch.Generator | None = None, logit_mean: float = 0.0,
                       logit_std: float = 1.0, mode_scale: float = 1.29, device="cpu") -> torch.Tensor:
    """Training time density: logit-normal, SD3's "mode", or uniform (cosmap / sigma_sqrt sample uniformly)."""
    if scheme == "logit_normal":
        u = torch.randn(n, generator=generator, device=device) * logit_std + logit_mean
        return torch.sigmoid(u)
    u = torch.rand(n, generator=generator, device=device)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme in ("cosmap", "sigma_sqrt", "uniform"):
        return u
    raise ValueError(f"unknown weighting scheme '{scheme}' (valid: {', '.join(WEIGHTING_SCHEMES)})")


def loss_weight(sigma: torch.Tensor, scheme: str) -> torch.Tensor:
    """w(sigma) of the flow-matching loss: 1 for logit_normal / mode / uniform."""
    if scheme == "sigma_sqrt":
        return sigma.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma.float() + 2 * sigma.float() ** 2))
    return torch.ones_like(sigma, dtype=torch.float32)


def interpolate(z0: torch.Tensor, z1: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The on-trajectory point z_sigma = (1 - sigma) z0 + sigma z1 (sigma broadcast per sample)."""
    s = sigma.reshape(-1, *([1] * (z0.dim() - 1))).to(z0)
    return (1 - s) * z0 + s * z1


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def expand_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (ref.dim() - 1))).to(ref.dtype)
