"""Deterministic ODE samplers on the flow grid: the multistep second-order DPM-Solver (DiffusionNFT's rollout
sampler) and Euler, with classifier-free guidance g (default 1: no guidance, one forward per step).

    from soarbench.sampling.dpm import dpm_rollout
    latents = dpm_rollout(adapter, text, noise, num_steps=10, guidance=1.0, solver="dpm2")   # (B, C, H, W)

Notation (rectified flow, SD3): x_s = (1 - s) x0 + s eps, s = 1 is noise, v = eps - x0. On the grid
s_0 = 1 > s_1 > ... > s_T = 0 (the scheduler's own sigmas, `ode.sampling_sigmas`), step i maps x_i to x_{i+1}
with the data prediction D_i = x_i - s_i v_i. With alpha = 1 - s and lambda = log(alpha / s):

  euler (= DDIM with eta 0 = first-order DPM-Solver):
        x_{i+1} = x_i + (s_{i+1} - s_i) v_i = (s_{i+1} / s_i) x_i + (alpha_{i+1} - s_{i+1} alpha_i / s_i) D_i
  dpm2 (DPM-Solver++(2M), Lu et al. 2022, arXiv 2211.01095):
        h = lambda_{i+1} - lambda_i,  h' = lambda_i - lambda_{i-1},  D' = D_i + (h / (2 h')) (D_i - D_{i-1})
        x_{i+1} = (s_{i+1} / s_i) x_i + (alpha_{i+1} - s_{i+1} alpha_i / s_i) D'
    (the exponential-integrator coefficient alpha_{i+1} (1 - e^{-h}) written without exponentials).

As in the reference (NVlabs/DiffusionNFT, flow_grpo/diffusers_patch/solver.py, solver "dpm2"), the first step
(there is no previous D) and the last step (s_{i+1} = 0, where lambda is infinite) are first order. At
s_{i-1} = 1 the previous lambda is -inf, so h' is infinite and the correction vanishes: the second step of a
grid that starts at 1 is first order too (the reference reaches the same value through inf arithmetic). The
coefficients are computed in float64 and the state is kept in fp32.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from soarbench.errors import did_you_mean
from soarbench.models.sd3 import SD3Adapter, TextEmbeddings
from soarbench.sampling.ode import Velocity, cfg_velocity, sampling_sigmas

SOLVERS = ("dpm2", "euler")


def check_solver(solver: str) -> None:
    """A UserError naming the valid solvers for anything else."""
    if solver not in SOLVERS:
        raise did_you_mean("solver", solver, SOLVERS)


def _lam(s: float) -> float:
    """log(alpha / sigma): -inf at sigma = 1, +inf at sigma = 0."""
    if s >= 1.0:
        return -math.inf
    if s <= 0.0:
        return math.inf
    return math.log((1.0 - s) / s)


def second_order_ratio(s_prev: float, s: float, s_next: float) -> float:
    """h / (2 h'): the weight of (D_i - D_{i-1}) in the second-order data prediction; 0 where the step is first
    order (no finite previous lambda, or the next sigma is 0)."""
    if s_prev >= 1.0 or s_next <= 0.0:
        return 0.0
    h, h_prev = _lam(s_next) - _lam(s), _lam(s) - _lam(s_prev)
    return h / (2.0 * h_prev)


def solver_step(x: torch.Tensor, d: torch.Tensor, d_prev: torch.Tensor | None, s_prev: float | None, s: float,
                s_next: float, solver: str = "dpm2") -> torch.Tensor:
    """One step from sigma s to s_next < s given the state x, its data prediction d = x - s v, and (dpm2) the
    previous step's data prediction d_prev at s_prev (None on the first step). Returns fp32."""
    check_solver(solver)
    x, d = x.float(), d.float()
    if solver == "dpm2" and d_prev is not None and s_prev is not None:
        ratio = second_order_ratio(float(s_prev), float(s), float(s_next))
        if ratio:
            d = d + ratio * (d - d_prev.float())
    s, s_next = float(s), float(s_next)
    keep = s_next / s  # the weight of x (1 at s = s_next)
    toward = (1.0 - s_next) - s_next * (1.0 - s) / s
    return keep * x + toward * d


def ode_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
               sigmas: torch.Tensor, solver: str = "dpm2") -> torch.Tensor:
    """Integrate from sigmas[0] down to sigmas[-1] with `velocity(z, sigma (1,)) -> v`; returns fp32 latents."""
    check_solver(solver)
    grid = [float(s) for s in sigmas.detach().double().cpu()]
    z = noise.float()
    d_prev = None
    for i in range(len(grid) - 1):
        sigma = sigmas[i].reshape(1).to(noise.device, torch.float32)
        v = velocity(z, sigma).float()
        d = z - grid[i] * v
        z = solver_step(z, d, d_prev, grid[i - 1] if i else None, grid[i], grid[i + 1], solver)
        d_prev = d
    return z


@torch.no_grad()
def dpm_rollout(adapter: SD3Adapter, text: TextEmbeddings, noise: torch.Tensor, num_steps: int = 10,
                guidance: float = 1.0, solver: str = "dpm2", velocity: Velocity | None = None) -> torch.Tensor:
    """Clean latents (B, C, H, W) from `noise` on the scheduler's grid of `num_steps` steps; counts the images.

    `velocity` is the network (default: the adapter's; DiffusionNFT passes `ctx.velocity_of("old")`)."""
    check_solver(solver)
    sigmas = sampling_sigmas(adapter.scheduler_config, num_steps).to(noise.device)
    null = adapter.null_embeddings() if guidance != 1.0 else None

    network = velocity or adapter.velocity

    def guided(z, sigma):
        return cfg_velocity(network, z, sigma, text, null, guidance)

    out = ode_sample(guided, noise, sigmas, solver)
    adapter.meter.add("images", noise.shape[0])
    return out
