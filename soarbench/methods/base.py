"""What a method is: a loss on one micro-batch, plus the number of network passes it spent.

The harness owns everything else (data, optimizer, budget, checkpoints, distribution). A method reads its
options from the `[method]` table of the config and returns a LossOutput; `loss` is what the harness backpropagates
(already normalised so that averaging gradients over ranks gives the pooled objective).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from soarbench.models.sd3 import SD3Adapter, TextEmbeddings


@dataclass
class Batch:
    z0: torch.Tensor  # clean model latents (B, C, H, W)
    text: TextEmbeddings
    prompts: list[str]


@dataclass
class StepContext:
    adapter: SD3Adapter
    generator: torch.Generator  # rank-specific: seed = global_seed * world_size + rank, advanced every step
    sigmas: torch.Tensor  # the 1000-entry shifted training grid, on the device
    world_size: int = 1
    all_reduce_sum: Any = None  # callable(tensor) -> tensor summed over ranks; identity when single-process
    transformer: Any = None  # the module to call for gradient passes (the adapter's transformer by default)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(x) if self.all_reduce_sum is not None else x


@dataclass
class LossOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    fwd_bwd: int = 0  # sample-level forward+backward passes
    no_grad_fwd: int = 0  # sample-level forwards without gradient


def pooled_loss(ctx: StepContext, weighted_sum: torch.Tensor, weighted_count: torch.Tensor) -> torch.Tensor:
    """sum / global count, scaled by world size because the harness averages gradients over ranks."""
    total = ctx.reduce(weighted_count.detach().clone())
    return weighted_sum * ctx.world_size / torch.clamp(total, min=1.0)


def global_mean(ctx: StepContext, local_sum: torch.Tensor, local_count: float) -> float:
    """An all-ranks mean for logging (the reference under-reported its loss by the world size)."""
    packed = ctx.reduce(torch.stack([local_sum.detach().float(), torch.tensor(float(local_count),
                                                                            device=local_sum.device)]))
    return (packed[0] / packed[1].clamp(min=1)).item()
