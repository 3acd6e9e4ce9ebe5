"""The Euler ODE sampler with classifier-free guidance on the shifted SD3 schedule (the evaluation sampler).

The sigma schedule is the scheduler's own (`FlowMatchEulerDiscreteScheduler.set_timesteps`), so soarbench's
images match diffusers' StableDiffusion3Pipeline for the same initial noise (a test checks this).
CFG: v = v_uncond + g (v_cond - v_uncond), with the empty prompt's embedding as the unconditional branch.

Samplers reach the network through one door, a `Velocity`: v(z, sigma, text) -> the model's velocity. The default
is the adapter's own (`SD3Adapter.velocity`, the policy); a training method passes `ctx.velocity_of(role)`, which
computes with that role's weights (soarbench.models.roles): no sampler knows which module it calls.
"""
from __future__ import annotations

from typing import Callable

import torch

from soarbench.models.guidance import Velocity, cfg_velocity  # noqa: F401  (samplers' one door, and CFG)
from soarbench.models.sd3 import SD3Adapter, TextEmbeddings



def sampling_sigmas(scheduler_config: dict, num_steps: int) -> torch.Tensor:
    """num_steps + 1 sigmas from 1 down to 0, exactly as the model's scheduler places them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_steps, device="cpu")
    return sched.sigmas.float()


@torch.no_grad()
def euler_sample(adapter: SD3Adapter, text: TextEmbeddings, noise: torch.Tensor, num_steps: int = 40,
                 guidance: float = 4.5, on_step: Callable[[int], None] | None = None,
                 steer: Callable[[torch.Tensor, torch.Tensor, TextEmbeddings], torch.Tensor] | None = None,
                 velocity: Velocity | None = None) -> torch.Tensor:
    """Integrate dz/dsigma = v from sigma = 1 to 0; returns clean model latents.

    `steer(z, sigma, text)` (value guidance, soarbench.models.value_head.ValueSteering) is added to each step as
    z' = z + (s' - s) v + |s' - s| steer(z, s, text): sigma decreases, so the latent moves along what steer returns
    (scale x the value gradient). Without it the update is exactly the plain Euler step. `velocity` is the network
    (default: the adapter's; a method passes `ctx.velocity_of(role)`)."""
    velocity = velocity or adapter.velocity
    sigmas = sampling_sigmas(adapter.scheduler_config, num_steps).to(noise.device)
    null = adapter.null_embeddings()
    z = noise.float()
    for i in range(num_steps):
        s0, s1 = sigmas[i], sigmas[i + 1]
        v = cfg_velocity(velocity, z, s0.reshape(1), text, null, guidance)
        if steer is not None:
            push = steer(z, s0.reshape(1), text)  # at z_t, before the step
            z = z + (s1 - s0) * v
            z = z + (s0 - s1) * push
        else:
            z = z + (s1 - s0) * v
        if on_step is not None:
            on_step(i)
    return z
