"""One SDE step function with five variants, shared by SOAR's stochastic rollout paths, Flow-GRPO and DanceGRPO.

x is the state at sigma0, v the (CFG) velocity there, sigma1 < sigma0 the next sigma, dt = sigma1 - sigma0 < 0,
a the noise level, eps ~ N(0, I). Everything is computed in fp32. Formulas (the SOAR and Flow-GRPO
reference code: github.com/Tencent-Hunyuan/HY-SOAR, github.com/yifan123/flow_grpo):
  simple:   x' = x + v dt + a sqrt(|dt|) eps
  sde:      x0_hat = x - sigma0 v;  x' = (1 - sigma1) x0_hat + sigma1 eps          (a unused)
  flow_sde: s = a sqrt(sigma0 / (1 - sigma0));
            mean = x (1 + s^2 dt / (2 sigma0)) + v (1 + s^2 (1 - sigma0) / (2 sigma0)) dt;  x' = mean + s sqrt(-dt) eps
  cps:      s = sigma1 sin(a pi / 2); x0_hat = x - sigma0 v; x1_hat = x + (1 - sigma0) v;
            x' = (1 - sigma1) x0_hat + sqrt(sigma1^2 - s^2) x1_hat + s eps
  dance:    (DanceGRPO, arXiv 2505.07818, `flux_step` of XueZeyue/DanceGRPO; a = eta) D = sigma0 - sigma1 = -dt;
            x0_hat = x - sigma0 v;  score = -(x - (1 - sigma0) x0_hat) / sigma0^2;
            mean = x - D v + a^2 D score / 2;  x' = mean + a sqrt(D) eps
At sigma0 = 1 flow_sde's denominator 1 - sigma0 is replaced by 1 - `sigma_next_at_one` (the grid's second
sigma), as Flow-GRPO does. The log-probability is the Gaussian log-density of x' under N(mean, std^2), averaged
over all non-batch elements (Flow-GRPO's form); for cps it is -||x' - mean||^2 averaged likewise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SDE_VARIANTS = ("simple", "sde", "flow_sde", "cps", "dance")


@dataclass
class SDEStep:
    sample: torch.Tensor  # x'
    mean: torch.Tensor  # the deterministic part
    std: torch.Tensor  # per-sample std of the Gaussian noise term, broadcastable to x


def _b(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=ref.device)
    if t.dim() == 0:
        t = t.expand(ref.shape[0])
    return t.reshape(-1, *([1] * (ref.dim() - 1)))


def sde_step(variant: str, x: torch.Tensor, v: torch.Tensor, sigma0, sigma1, noise_level: float,
             eps: torch.Tensor | None = None, generator: torch.Generator | None = None,
             sigma_next_at_one: float | None = None) -> SDEStep:
    if variant not in SDE_VARIANTS:
        raise ValueError(f"unknown SDE variant '{variant}' (valid: {', '.join(SDE_VARIANTS)})")
    x, v = x.float(), v.float()
    s0, s1 = _b(sigma0, x), _b(sigma1, x)
    dt = s1 - s0
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    eps = eps.float()
    a = noise_level
    if variant == "simple":
        mean = x + v * dt
        std = a * dt.abs().sqrt()
    elif variant == "sde":
        mean = (1 - s1) * (x - s0 * v)
        std = s1
    elif variant == "flow_sde":
        denom = 1 - s0
        if sigma_next_at_one is not None:
            denom = torch.where(s0 >= 1.0, torch.full_like(denom, 1 - sigma_next_at_one), denom)
        s = a * torch.sqrt(s0 / denom)
        mean = x * (1 + s**2 * dt / (2 * s0)) + v * (1 + s**2 * (1 - s0) / (2 * s0)) * dt
        std = s * torch.sqrt(-dt)
    elif variant == "dance":
        drop = -dt  # D > 0
        x0_hat = x - s0 * v
        score = -(x - (1 - s0) * x0_hat) / s0**2
        mean = x - drop * v + 0.5 * a**2 * drop * score
        std = a * drop.sqrt()
    else:  # cps
        s = s1 * math.sin(a * math.pi / 2)
        x0_hat = x - s0 * v
        x1_hat = x + (1 - s0) * v
        mean = (1 - s1) * x0_hat + torch.sqrt((s1**2 - s**2).clamp(min=0)) * x1_hat
        std = s
    std = std.expand_as(s0) if torch.is_tensor(std) else torch.full_like(s0, float(std))
    return SDEStep(sample=mean + std * eps, mean=mean, std=std)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over elements of log N(sample; mean, std^2), fp32."""
    sample, mean, std = sample.float(), mean.float(), std.float()
    std = std.expand_as(sample)
    logp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).mean(dim=1)


def cps_log_prob(sample: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """CPS's simplified log-probability: -||x' - mean||^2, averaged over elements."""
    return -((sample.float() - mean.float()) ** 2).flatten(1).mean(dim=1)


def step_log_prob(variant: str, step: SDEStep) -> torch.Tensor:
    if variant == "cps":
        return cps_log_prob(step.sample, step.mean)
    return gaussian_log_prob(step.sample, step.mean, step.std)
