"""SFT: the rectified-flow (flow-matching) loss on the data, SD3's recipe.

  t0 ~ the weighting scheme's density (logit-normal by default), sigma0 = grid[floor((1 - t0) * 1000)]
  z_on = (1 - sigma0) z0 + sigma0 z1,  loss = mean_b  w(sigma0) * mean((v_theta(z_on) - (z1 - z0))^2)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from soarbench import flow
from soarbench.harness.budget import StepCost
from soarbench.methods.base import Batch, LossOutput, StepContext, global_mean, pooled_loss


@dataclass
class FlowMatchingDraw:
    """The random draws of one flow-matching step; SOAR reuses them so lambda = 0 reproduces SFT exactly."""

    z1: torch.Tensor
    t0: torch.Tensor
    sigma0: torch.Tensor
    z_on: torch.Tensor


def draw_flow_matching(ctx: StepContext, z0: torch.Tensor, scheme: str, logit_mean: float,
                       logit_std: float, mode_scale: float) -> FlowMatchingDraw:
    gen = ctx.generator
    z1 = torch.randn(z0.shape, generator=gen, device=gen.device, dtype=torch.float32).to(z0.device)
    t0 = flow.sample_unshifted_t(z0.shape[0], scheme, gen, logit_mean, logit_std, mode_scale,
                                 device=gen.device).to(z0.device)
    sigma0 = ctx.sigmas[flow.grid_index(t0)]
    return FlowMatchingDraw(z1=z1, t0=t0, sigma0=sigma0, z_on=flow.interpolate(z0.float(), z1, sigma0))


class SFT:
    name = "sft"

    def __init__(self, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        flow.sample_unshifted_t(1, weighting_scheme)  # validates the name early
        self.scheme, self.logit_mean, self.logit_std, self.mode_scale = (
            weighting_scheme, logit_mean, logit_std, mode_scale)

    def step_cost(self, batch: int, world: int) -> StepCost:
        """The budget arithmetic of one optimizer step (all ranks), before anything is spent."""
        n = batch * world
        return StepCost(fwd_bwd=n, unique_prompts=n)

    def draw(self, ctx: StepContext, z0: torch.Tensor) -> FlowMatchingDraw:
        return draw_flow_matching(ctx, z0, self.scheme, self.logit_mean, self.logit_std, self.mode_scale)

    def main_term(self, ctx: StepContext, batch: Batch, d: FlowMatchingDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample weighted loss, v_theta) at the on-trajectory point."""
        v = ctx.adapter.velocity(d.z_on, d.sigma0, batch.text, ctx.transformer)
        per_sample = flow.loss_weight(d.sigma0, self.scheme) * flow.per_sample_mse(v, d.z1 - batch.z0.float())
        return per_sample, v

    def loss(self, ctx: StepContext, batch: Batch) -> LossOutput:
        d = self.draw(ctx, batch.z0)
        per_sample, _ = self.main_term(ctx, batch, d)
        n = per_sample.shape[0]
        loss = pooled_loss(ctx, per_sample.sum(), torch.tensor(float(n), device=per_sample.device))
        return LossOutput(loss=loss, logs={"loss_main": global_mean(ctx, per_sample.sum(), n)}, fwd_bwd=n)
