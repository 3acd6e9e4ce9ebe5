"""Classifier-free guidance over the one door to the network, a `Velocity`.

A Velocity is v(z, sigma, text) -> the model's velocity: the adapter's own (`SD3Adapter.velocity`), or a role's
(`Roles.velocity`, `Ctx.velocity_of(role)`). The samplers (soarbench.sampling) and the rollouts (soarbench.rl)
take one and never see a module; the guided velocity is computed here, from one batched call.
"""
from __future__ import annotations

from typing import Callable

import torch

from soarbench.models.sd3 import TextEmbeddings

# v(z (B, C, H, W), sigma ((1,) or (B,)), text (B prompts)) -> velocity (B, C, H, W): the one door to the network
Velocity = Callable[[torch.Tensor, torch.Tensor, TextEmbeddings], torch.Tensor]


def cfg_velocity(velocity: Velocity, z: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings,
                 null: TextEmbeddings | None, guidance: float, detach_uncond: bool = False) -> torch.Tensor:
    """The guided velocity (fp32) from one batched `velocity` call over [uncond; cond] (cond only when
    guidance == 1, where `null` may be None).

    `detach_uncond` makes the unconditional branch a constant under autograd (Flow-GRPO's training pass), so
    d v = g d v_cond; the values are the same either way."""
    if guidance == 1.0:
        return velocity(z, sigma, text).float()
    n = z.shape[0]
    both = TextEmbeddings.cat([null.repeat(n), text])
    v = velocity(torch.cat([z, z]), torch.cat([sigma.expand(n), sigma.expand(n)]), both)
    v_uncond, v_cond = v.float().chunk(2)
    if detach_uncond:
        v_uncond = v_uncond.detach()
    return v_uncond + guidance * (v_cond - v_uncond)
