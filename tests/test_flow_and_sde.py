"""The flow-matching grid and the four SDE step variants against hand-written formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from soarbench import flow
from soarbench.sampling.sde import gaussian_log_prob, sde_step, step_log_prob


def test_training_grid_matches_the_scheduler_and_the_spec():
    from diffusers import FlowMatchEulerDiscreteScheduler

    grid = flow.training_sigmas(3.0, 1000)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert torch.allclose(grid, sched.sigmas[:1000].float(), atol=1e-6)
    for i in (0, 1, 500, 999):
        s = (1000 - i) / 1000
        assert grid[i].item() == pytest.approx(3 * s / (1 + 2 * s), abs=1e-6)
    assert flow.grid_index(torch.tensor([1.0, 0.5, 0.0])).tolist() == [0, 500, 999]


def test_snap_to_grid_picks_the_nearest_sigma():
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25])
    assert flow.snap_to_grid(torch.tensor([0.9, 0.6, 0.26]), grid).tolist() == [1.0, 0.5, 0.25]


# one element, hand-made numbers: x = 0.8, v = -0.6, sigma0 = 0.7, sigma1 = 0.5, a = 0.5, eps = 0.3
X, V, S0, S1, A, EPS = 0.8, -0.6, 0.7, 0.5, 0.5, 0.3
DT = S1 - S0


def _run(variant):
    t = lambda x: torch.tensor([[x]])  # noqa: E731
    return sde_step(variant, t(X), t(V), torch.tensor([S0]), torch.tensor([S1]), A, eps=t(EPS))


def test_simple_variant():
    out = _run("simple")
    assert out.sample.item() == pytest.approx(X + V * DT + A * math.sqrt(abs(DT)) * EPS, abs=1e-6)


def test_sde_variant():
    out = _run("sde")
    assert out.sample.item() == pytest.approx((1 - S1) * (X - S0 * V) + S1 * EPS, abs=1e-6)


def test_flow_sde_variant():
    s = A * math.sqrt(S0 / (1 - S0))
    mean = X * (1 + s**2 * DT / (2 * S0)) + V * (1 + s**2 * (1 - S0) / (2 * S0)) * DT
    out = _run("flow_sde")
    assert out.mean.item() == pytest.approx(mean, abs=1e-6)
    assert out.sample.item() == pytest.approx(mean + s * math.sqrt(-DT) * EPS, abs=1e-6)


def test_flow_sde_at_sigma_one_uses_the_second_grid_sigma():
    t = lambda x: torch.tensor([[x]])  # noqa: E731
    out = sde_step("flow_sde", t(X), t(V), torch.tensor([1.0]), torch.tensor([0.9]), A, eps=t(EPS),
                   sigma_next_at_one=0.999)
    s = A * math.sqrt(1.0 / (1 - 0.999))
    assert out.std.item() == pytest.approx(s * math.sqrt(0.1), rel=1e-5)


def test_cps_variant():
    s = S1 * math.sin(A * math.pi / 2)
    x0, x1 = X - S0 * V, X + (1 - S0) * V
    expected = (1 - S1) * x0 + math.sqrt(S1**2 - s**2) * x1 + s * EPS
    assert _run("cps").sample.item() == pytest.approx(expected, abs=1e-6)


def test_zero_noise_flow_sde_is_the_euler_step():
    t = torch.randn(2, 3, 4, 4)
    v = torch.randn(2, 3, 4, 4)
    out = sde_step("flow_sde", t, v, torch.tensor([0.8, 0.4]), torch.tensor([0.6, 0.2]), 0.0)
    expected = t + v * torch.tensor([-0.2, -0.2]).reshape(2, 1, 1, 1)
    assert torch.allclose(out.sample, expected, atol=1e-6)


def test_log_prob_is_the_gaussian_density_of_the_sample():
    torch.manual_seed(0)
    x, v = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    out = sde_step("flow_sde", x, v, torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.4, 0.2]), 0.7)
    ours = step_log_prob("flow_sde", out)
    std = out.std.expand_as(out.sample).numpy()
    ref = norm.logpdf(out.sample.numpy(), loc=out.mean.numpy(), scale=std).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5)
    assert torch.allclose(gaussian_log_prob(out.sample, out.mean, out.std), ours)


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="valid: simple, sde, flow_sde, cps"):
        _run("ddim")
