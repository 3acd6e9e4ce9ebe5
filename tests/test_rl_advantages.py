"""Group-relative advantages on a hand-made reward table, against hand-computed numbers."""
from __future__ import annotations

import math

import pytest
import torch

from soarbench.rl.advantages import group_advantages, group_index, nonzero_groups, refill_to_multiple

# Three prompts, interleaved as a sampler may deliver them. "b" is constant, so it carries no signal.
GROUPS = ["a", "b", "a", "c", "a", "b", "c", "a"]
REWARDS = [1.0, 0.5, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0]
EPS = 1e-4


def test_group_index_numbers_groups_in_order_of_first_appearance():
    index, groups = group_index(GROUPS)
    assert index.tolist() == [0, 1, 0, 2, 0, 1, 2, 0] and groups == 3
    index, groups = group_index(torch.tensor([7, 3, 7]))
    assert groups == 2 and index[0] == index[2] != index[1]


def test_global_std_advantages_by_hand():
    # Group means: a 0.5, b 0.5, c 0.5, so every sample of a and c is 0.5 off its mean and b's are 0.
    # Global population std: the batch mean is 0.5 too, six deviations of 0.5 and two of 0 -> sqrt(1.5 / 8).
    std = math.sqrt(6 * 0.25 / 8)
    a = 0.5 / (std + EPS)  # 1.15443...
    expected = [a, 0.0, -a, a, a, 0.0, -a, -a]
    adv = group_advantages(torch.tensor(REWARDS), GROUPS)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert a == pytest.approx(1.154434, abs=1e-6)


def test_per_group_std_advantages_by_hand():
    # a and c: group std 0.5 -> +-0.5 / 0.5001; b: 0 / (0 + eps) = 0.
    a = 0.5 / (0.5 + EPS)
    adv = group_advantages(REWARDS, GROUPS, global_std=False)
    assert adv.tolist() == pytest.approx([a, 0.0, -a, a, a, 0.0, -a, -a], abs=1e-6)


def test_clip_bounds_the_outlier():
    # One success in four: mean 0.25, std sqrt((3 * 0.0625 + 0.5625) / 4) = sqrt(0.1875).
    std = math.sqrt(0.1875)
    adv = group_advantages([0.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], global_std=False, clip=1.5)
    assert 0.75 / (std + EPS) == pytest.approx(1.73165, abs=1e-5)  # above the clip...
    assert adv.tolist() == pytest.approx([-0.25 / (std + EPS)] * 3 + [1.5], abs=1e-6)  # ...so it is clipped
    assert group_advantages([0.0, 10.0], [0, 0], global_std=False, eps=0.0).tolist() == [-1.0, 1.0]
    # one success in 30: (1 - 1/30) / sqrt(1/30 * 29/30) = sqrt(29) = 5.39 > 5, the default clip
    assert group_advantages([0.0] * 29 + [1.0], [0] * 30, global_std=False)[-1].item() == 5.0


def test_constant_groups_are_exactly_zero_and_dropped():
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004: a naive mean would leave tiny non-zero advantages
    rewards = [0.1, 0.1, 0.1, 0.0, 1.0, 0.5]
    groups = ["x", "x", "x", "y", "y", "y"]
    adv = group_advantages(rewards, groups)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert nonzero_groups(adv, groups).tolist() == [False] * 3 + [True] * 3


def test_nonzero_groups_keeps_a_group_with_any_signal():
    adv = group_advantages(REWARDS, GROUPS)
    assert nonzero_groups(adv, GROUPS).tolist() == [True, False, True, True, True, False, True, True]
    # a sample exactly at its group mean keeps its group: only all-zero groups go
    assert nonzero_groups(torch.tensor([0.0, 1.0, -1.0]), ["g", "g", "g"]).tolist() == [True] * 3
    per_step = torch.tensor([[0.0, 0.0], [0.0, 0.3], [0.0, 0.0], [0.0, 0.0]])  # (N, T) advantages
    assert nonzero_groups(per_step, [0, 0, 1, 1]).tolist() == [True, True, False, False]


def test_refill_to_multiple():
    keep = torch.tensor([True, False, True, True, True, False, True, True])  # 6 kept
    assert refill_to_multiple(keep, 3).tolist() == keep.tolist()
    assert refill_to_multiple(keep, 4).all()
    once = refill_to_multiple(keep, 7, torch.Generator().manual_seed(0))
    assert once.sum() == 7 and once[keep].all()
    assert refill_to_multiple(torch.zeros(4, dtype=torch.bool), 2).sum() == 2  # nothing kept: one full batch
    with pytest.raises(ValueError):
        refill_to_multiple(torch.tensor([True, False, False]), 4)
    with pytest.raises(ValueError):
        group_advantages([1.0, 2.0], ["a"])
