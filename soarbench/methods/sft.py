"""SFT: the rectified-flow (flow-matching) loss on the data, SD3's recipe.

  t0 ~ the weighting scheme's density (logit-normal by default), sigma0 = grid[floor((1 - t0) * 1000)]
  z_on = (1 - sigma0) z0 + sigma0 z1,  loss = mean_b  w(sigma0) * mean((v_theta(z_on) - (z1 - z0))^2)

    soarbench train --config benchmarks/shapes/sft.toml --out runs/sft
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from soarbench import flow
from soarbench.cost import UnitCost
from soarbench.methods.base import Batch, Ctx, LossOutput, MethodBase, Micro, RunShape, log_pair


@dataclass
class FlowMatchingDraw:
    """The random draws of one flow-matching step; SOAR reuses them so lambda = 0 reproduces SFT exactly."""

    z1: torch.Tensor
    t0: torch.Tensor
    sigma0: torch.Tensor
    z_on: torch.Tensor


def draw_flow_matching(ctx: Ctx, batch: Batch, scheme: str, logit_mean: float, logit_std: float,
                       mode_scale: float) -> FlowMatchingDraw:
    """Noise and timestep of each sample, from its own keyed generator."""
    z0 = batch.z0
    z1 = ctx.randn(z0.shape[1:], batch.ids, "z1").to(z0.device)
    t0 = torch.cat([flow.sample_unshifted_t(1, scheme, g, logit_mean, logit_std, mode_scale)
                    for g in ctx.generators(batch.ids, "t0")]).to(z0.device)
    sigma0 = ctx.sigmas[flow.grid_index(t0)]
    return FlowMatchingDraw(z1=z1, t0=t0, sigma0=sigma0, z_on=flow.interpolate(z0.float(), z1, sigma0))


class SFT(MethodBase):
    name = "sft"
    source = "images"
    needs_text_encoders_after_cache = False  # captions come from the text cache (SOAR's too, and its empty prompt)

    def __init__(self, weighting_scheme: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29):
        flow.sample_unshifted_t(1, weighting_scheme)  # validates the name early
        self.scheme, self.logit_mean, self.logit_std, self.mode_scale = (
            weighting_scheme, logit_mean, logit_std, mode_scale)

    def plan(self, shape: RunShape) -> UnitCost:
        n = shape.global_batch
        return UnitCost(fwd_bwd=n, data_images=n, unique_prompts=n, micro_batches=shape.accumulation,
                        samples_per_step=n)

    def draw(self, ctx: Ctx, batch: Batch) -> FlowMatchingDraw:
        return draw_flow_matching(ctx, batch, self.scheme, self.logit_mean, self.logit_std, self.mode_scale)

    def updates(self, ctx: Ctx, batches: list[Batch]):
        yield [Micro((b, self.draw(ctx, b)), float(len(b.prompts))) for b in batches]

    def main_term(self, ctx: Ctx, batch: Batch, d: FlowMatchingDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample weighted loss, v_theta) at the on-trajectory point."""
        v = ctx.velocity(d.z_on, d.sigma0, batch.text)
        per_sample = flow.loss_weight(d.sigma0, self.scheme) * flow.per_sample_mse(v, d.z1 - batch.z0.float())
        return per_sample, v

    def loss(self, ctx: Ctx, micro: Micro) -> LossOutput:
        batch, d = micro.data
        per_sample, _ = self.main_term(ctx, batch, d)
        return LossOutput(loss=per_sample.sum(), logs={"loss_main": log_pair(per_sample.sum(), len(per_sample))})
