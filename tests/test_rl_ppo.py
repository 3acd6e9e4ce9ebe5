"""PPO-clip loss and the KL penalty: values and autograd gradients against closed forms."""
from __future__ import annotations

import math

import pytest
import torch

from soarbench.rl.ppo import clipped_policy_loss, kl_to_reference

# (advantage, ratio) with clip range 0.2, and what the loss term and its gradient d/d(log p) must be:
# unclipped term the max -> value -A r, gradient -A r; clipped term the max -> value -A clip(r), gradient 0.
CASES = [
    (2.0, 1.1, -2.2, -2.2),  # inside the range
    (2.0, 1.5, -2.4, 0.0),  # A > 0, ratio already above 1 + eps: clipped
    (2.0, 0.5, -1.0, -1.0),  # A > 0, ratio below 1 - eps: the losing side is never clipped
    (-2.0, 0.5, 1.6, 0.0),  # A < 0, ratio already below 1 - eps: clipped
    (-2.0, 1.5, 3.0, 3.0),  # A < 0, ratio above 1 + eps: not clipped
    (-2.0, 1.1, 2.2, 2.2),  # inside the range
]


def _log_probs(ratios):
    """A differentiable log p and an old log p whose ratio is `ratios`."""
    log_prob = torch.tensor([0.3, -1.2, 0.7, 2.0, -0.4, 1.1][: len(ratios)], requires_grad=True)
    old = log_prob.detach() - torch.log(torch.tensor(ratios))
    return log_prob, old


def test_values_and_gradients_inside_and_outside_the_clip_range():
    advantages = torch.tensor([c[0] for c in CASES])
    log_prob, old = _log_probs([c[1] for c in CASES])
    out = clipped_policy_loss(log_prob, old, advantages, clip_range=0.2)
    assert out.per_sample.tolist() == pytest.approx([c[2] for c in CASES], abs=1e-5)
    assert out.loss.item() == pytest.approx(sum(c[2] for c in CASES) / len(CASES), abs=1e-5)
    out.loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([c[3] / len(CASES) for c in CASES], abs=1e-5)
    assert out.ratio.tolist() == pytest.approx([c[1] for c in CASES], abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(4 / 6)
    assert out.approx_kl.item() == pytest.approx(0.5 * sum(math.log(c[1]) ** 2 for c in CASES) / 6, abs=1e-6)
    assert not out.approx_kl.requires_grad and not out.ratio.requires_grad


def test_at_ratio_one_the_gradient_is_the_plain_policy_gradient():
    # First inner step: the ratio is exactly 1 and both terms tie; the gradient must be -A, not half of it.
    advantages = torch.tensor([1.5, -0.5])
    log_prob = torch.tensor([-3.0, 4.0], requires_grad=True)
    out = clipped_policy_loss(log_prob, log_prob.detach(), advantages)  # default clip range 1e-4
    assert out.per_sample.tolist() == [-1.5, 0.5]
    out.loss.backward()
    assert log_prob.grad.tolist() == pytest.approx([-1.5 / 2, 0.5 / 2])
    assert out.clipfrac.item() == 0.0 and out.approx_kl.item() == 0.0


def test_old_log_prob_and_advantages_are_constants():
    log_prob = torch.zeros(2, requires_grad=True)
    old = torch.tensor([0.1, -0.1], requires_grad=True)
    adv = torch.tensor([1.0, 1.0], requires_grad=True)
    clipped_policy_loss(log_prob, old, adv, clip_range=0.5).loss.backward()
    assert old.grad is None and adv.grad is None and log_prob.grad is not None
    with pytest.raises(ValueError):
        clipped_policy_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))


def test_kl_to_reference_by_hand():
    mean = torch.tensor([[1.0, -1.0, 0.0, 2.0], [2.0, 2.0, 2.0, 2.0]]).reshape(2, 1, 2, 2).requires_grad_(True)
    ref = torch.zeros(2, 1, 2, 2, requires_grad=True)
    std = torch.tensor([0.5, 2.0])
    # sample 0: squares 1, 1, 0, 4 -> mean 1.5, / (2 * 0.25) = 3.0; sample 1: 4 / (2 * 4) = 0.5
    kl = kl_to_reference(mean, ref, std)
    assert kl.tolist() == pytest.approx([3.0, 0.5])
    assert kl_to_reference(mean, ref, std.reshape(2, 1, 1, 1)).tolist() == pytest.approx([3.0, 0.5])
    assert kl_to_reference(mean, ref, 1.0).tolist() == pytest.approx([0.75, 2.0])
    kl.sum().backward()
    # d KL / d mean = (mean - ref) / (std^2 * elements); the reference is held fixed
    expected = mean.detach() / (std.reshape(2, 1, 1, 1) ** 2 * 4)
    assert torch.allclose(mean.grad, expected) and ref.grad is None
