"""Group-relative advantages (Flow-GRPO, arXiv 2505.05470; yifan123/flow_grpo).

Each prompt is sampled k times (a group). Sample n of group g with reward r_n gets

    A_n = clip((r_n - mean_g r) / (s + eps), -clip, clip),      eps = 1e-4, clip = 5

with s the population std (ddof 0) of ALL rewards of the epoch batch (`global_std=True`, as in every SD3 config of
the reference) or of group g's rewards (`global_std=False`). Both are statistics of the whole batch: gather the
rewards of every rank before calling.

A group whose rewards are all equal has advantage 0 everywhere and gives no policy gradient; `nonzero_groups`
masks such groups out, and `refill_to_multiple` adds dropped samples back until the kept count divides into the
training batches, as the reference does.

DanceGRPO (`group_zscore`) normalises by each group's own UNBIASED std (ddof 1) plus 1e-8, and drops nothing.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch


def group_index(group_ids: Sequence[Hashable] | torch.Tensor) -> tuple[torch.Tensor, int]:
    """(dense group number per sample (N,) long, number of groups G), for prompts or any hashables, or a tensor."""
    if torch.is_tensor(group_ids):
        _, index = torch.unique(group_ids.reshape(-1), return_inverse=True)
        return index, (int(index.max().item()) + 1 if index.numel() else 0)
    numbers: dict[Hashable, int] = {}
    index = [numbers.setdefault(g, len(numbers)) for g in group_ids]
    return torch.tensor(index, dtype=torch.long), len(numbers)


def _grouped(rewards, group_ids) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(rewards as float64 (N,), dense group index (N,), number of groups, each group's size)."""
    r = torch.as_tensor(rewards).detach().to(torch.float64).reshape(-1)
    index, groups = group_index(group_ids)
    index = index.to(r.device)
    if index.numel() != r.numel():
        raise ValueError(f"{r.numel()} rewards but {index.numel()} group ids")
    return r, index, groups, _group_sum(torch.ones_like(r), index, groups)


def _group_sum(values: torch.Tensor, index: torch.Tensor, groups: int) -> torch.Tensor:
    return torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def group_advantages(rewards: torch.Tensor | Sequence[float], group_ids: Sequence[Hashable] | torch.Tensor,
                     global_std: bool = True, eps: float = 1e-4, clip: float = 5.0) -> torch.Tensor:
    """(N,) fp32 advantages of N rewards in groups (see the module docstring for the formula).

    Computed in float64 (as the reference's numpy tracker does) and then rounded once.
    """
    r, index, groups, counts = _grouped(rewards, group_ids)
    centred = r - (_group_sum(r, index, groups) / counts)[index]
    # A summed-and-divided mean of equal values need not round back to that value (0.1 * 3 / 3 != 0.1), and a
    # constant group must come out exactly 0 so that `nonzero_groups` drops it.
    low = torch.full((groups,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, index, r, "amin")
    high = torch.full((groups,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, index, r, "amax")
    centred = torch.where((low == high)[index], torch.zeros_like(centred), centred)
    if global_std:
        scale = r.std(correction=0)
    else:
        scale = (_group_sum(centred**2, index, groups) / counts).sqrt()[index]
    return (centred / (scale + eps)).clamp(-clip, clip).to(torch.float32)


def nonzero_groups(advantages: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor) -> torch.Tensor:
    """(N,) bool: True for the samples of every group that has a non-zero advantage somewhere.

    `advantages` is (N,) or (N, T) (per-step advantages); a group is dropped when all its entries are 0.
    """
    nonzero = (advantages.detach().reshape(advantages.shape[0], -1) != 0).any(dim=1)
    index, groups = group_index(group_ids)
    index = index.to(nonzero.device)
    if index.numel() != nonzero.numel():
        raise ValueError(f"{nonzero.numel()} advantages but {index.numel()} group ids")
    return (_group_sum(nonzero.float(), index, groups) > 0)[index]


def refill_to_multiple(keep: torch.Tensor, multiple: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`keep` with randomly chosen dropped samples set back to True until its count is a positive multiple.

    The kept samples are split into `multiple` training batches of equal size; the reference tops the set up with
    dropped (zero-advantage) samples, which add no policy gradient. Returns a new mask.
    """
    keep = keep.clone()
    kept = int(keep.sum())
    missing = (-kept) % multiple if kept else multiple
    if missing == 0:
        return keep
    dropped = torch.nonzero(~keep).reshape(-1)
    if dropped.numel() < missing:
        raise ValueError(f"cannot make {kept} kept samples of {keep.numel()} a multiple of {multiple}")
    device = generator.device if generator is not None else "cpu"
    chosen = torch.randperm(dropped.numel(), generator=generator, device=device)[:missing].to(dropped.device)
    keep[dropped[chosen]] = True
    return keep


def group_zscore(rewards: torch.Tensor | Sequence[float], group_ids: Sequence[Hashable] | torch.Tensor,
                 eps: float = 1e-8, clip: float = 5.0) -> torch.Tensor:
    """(N,) fp32 DanceGRPO advantages: A_n = clip((r_n - mean_g) / (std_g + eps), -clip, clip) per group g, with
    the UNBIASED std of the group (ddof 1, as torch's Tensor.std in the reference), computed in float64.

    Every group needs at least two samples (the unbiased std of one value is undefined). A constant group gets
    A = 0 exactly.
    """
    r, index, groups, counts = _grouped(rewards, group_ids)
    if groups and int(counts.min()) < 2:
        raise ValueError("every group needs at least 2 samples for an unbiased std")
    centred = r - (_group_sum(r, index, groups) / counts)[index]
    low = torch.full((groups,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, index, r, "amin")
    high = torch.full((groups,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, index, r, "amax")
    centred = torch.where((low == high)[index], torch.zeros_like(centred), centred)  # see group_advantages
    std = (_group_sum(centred**2, index, groups) / (counts - 1)).sqrt()[index]
    return (centred / (std + eps)).clamp(-clip, clip).to(torch.float32)
