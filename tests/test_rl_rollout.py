"""Flow-GRPO rollouts on the micro SD3: recorded log-probs, the SDE window, and log-probs recomputed for PPO."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from soarbench.models.sd3 import SD3Adapter, TextEmbeddings
from soarbench.rl.rollout import (Trajectory, guided_velocity, random_window, sde_rollout, step_log_prob_under,
                                  stochastic_steps)
from soarbench.sampling.ode import cfg_velocity, euler_sample, sampling_sigmas

PROMPTS = ["a photo of a red circle", "a photo of two squares"]
STEPS = 6


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    """One adapter for the whole module (loading it is most of these tests' time); no test here changes it."""
    return SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=0)


@pytest.fixture()
def trainable_adapter(tiny_model_dir):
    adapter = SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=0)
    adapter.transformer.requires_grad_(True)
    return adapter


def _inputs(adapter, seed=0):
    noise = torch.randn(len(PROMPTS), *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(seed))
    return adapter.encode_prompts(PROMPTS), noise


def _rollout(adapter, text, noise, seed=1, **kwargs):
    return sde_rollout(adapter, text, noise, num_steps=STEPS, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_noise_level_zero_is_the_euler_sampler(adapter):
    text, noise = _inputs(adapter)
    traj = _rollout(adapter, text, noise, noise_level=0.0)
    assert torch.equal(traj.final_latents, euler_sample(adapter, text, noise, num_steps=STEPS, guidance=4.5))
    assert torch.equal(traj.latents[:, 0], noise)
    assert not traj.trainable.any() and (traj.log_probs == 0).all()


def test_recorded_log_prob_is_the_flow_sde_density_of_the_next_state(adapter):
    text, noise = _inputs(adapter)
    traj = _rollout(adapter, text, noise)
    assert traj.latents.shape == (2, STEPS + 1, 4, 16, 16) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (2, STEPS) and traj.log_probs.dtype == torch.float32
    assert torch.isfinite(traj.log_probs).all() and traj.trainable.all()
    assert torch.equal(traj.sigmas, sampling_sigmas(adapter.scheduler_config, STEPS))
    # step 0 by hand from the spec's formulas; at sigma = 1 the std uses the grid's second sigma
    a, s0, s1, x = 0.7, 1.0, traj.sigmas[1].item(), traj.latents[:, 0]
    v = cfg_velocity(adapter.velocity, x, torch.ones(1), text, adapter.null_embeddings(), 4.5)
    s, dt = a * math.sqrt(s0 / (1 - s1)), s1 - s0
    mean = x * (1 + s**2 * dt / (2 * s0)) + v * (1 + s**2 * (1 - s0) / (2 * s0)) * dt
    std = s * math.sqrt(-dt)
    eps = (traj.latents[:, 1] - mean) / std
    expected = (-eps**2 / 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    assert torch.allclose(traj.log_probs[:, 0], expected, atol=1e-5)
    assert eps.std().item() == pytest.approx(1.0, abs=0.1)  # the residual is the unit Gaussian that was drawn


def test_steps_outside_the_window_are_deterministic_euler(adapter):
    text, noise = _inputs(adapter)
    a = _rollout(adapter, text, noise, seed=1, sde_window=(2, 2))
    b = _rollout(adapter, text, noise, seed=2, sde_window=(2, 2))
    assert a.trainable.tolist() == [[False, False, True, True, False, False]] * 2
    assert torch.equal(a.latents[:, :3], b.latents[:, :3])  # before the window the noise draw does not matter
    assert not torch.allclose(a.latents[:, 3], b.latents[:, 3])
    null = adapter.null_embeddings()
    for i in (0, 1, 4, 5):
        v = cfg_velocity(adapter.velocity, a.latents[:, i], a.sigmas[i].reshape(1), text, null, 4.5)
        assert torch.equal(a.latents[:, i + 1], a.latents[:, i] + (a.sigmas[i + 1] - a.sigmas[i]) * v)
        assert (a.log_probs[:, i] == 0).all()
    assert (a.log_probs[:, 2:4] != 0).all() and torch.isfinite(a.log_probs).all()


def test_random_window_lies_in_the_first_half():
    starts = {random_window(10, 3, torch.Generator().manual_seed(s))[0] for s in range(60)}
    assert starts == {0, 1, 2}
    same_seed = [random_window(10, 3, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert same_seed[0] == same_seed[1] and same_seed[0][1] == 3
    with pytest.raises(ValueError):
        random_window(4, 3)
    assert stochastic_steps(6, (1, 3)).tolist() == [False, True, True, True, False, False]
    assert stochastic_steps(4).all() and not stochastic_steps(4, noise_level=0.0).any()
    with pytest.raises(ValueError):
        stochastic_steps(6, (4, 3))


@pytest.mark.parametrize("variant, window", [("flow_sde", None), ("flow_sde", (1, 3)), ("cps", None)])
def test_recomputed_log_probs_reproduce_the_rollout(adapter, variant, window):
    text, noise = _inputs(adapter)
    traj = _rollout(adapter, text, noise, variant=variant, sde_window=window)
    steps = traj.trainable_steps()
    assert steps.shape == (2, STEPS if window is None else 3)
    for j in steps[0].tolist():
        out = step_log_prob_under(adapter, traj, j, text, guidance=4.5)
        assert out.log_prob.dtype == torch.float32 and out.mean.shape == traj.latents[:, 0].shape
        ratio = torch.exp(out.log_prob - traj.log_prob_at(j))
        assert torch.allclose(ratio, torch.ones(2), rtol=0, atol=1e-6), (j, ratio)


def test_per_sample_steps_across_joined_batches(adapter):
    text, noise = _inputs(adapter)
    joined = Trajectory.cat([_rollout(adapter, text, noise, seed=1, sde_window=(0, 2)),
                             _rollout(adapter, text, noise, seed=2, sde_window=(2, 2))])
    both = TextEmbeddings.cat([text, text])
    steps = joined.trainable_steps()
    assert steps.tolist() == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for k in range(2):
        out = step_log_prob_under(adapter, joined, steps[:, k], both, guidance=4.5)
        assert torch.allclose(out.log_prob, joined.log_prob_at(steps[:, k]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="deterministic"):
        step_log_prob_under(adapter, joined, 4, both, guidance=4.5)
    uneven = replace(joined, trainable=joined.trainable.clone())
    uneven.trainable[0, 5] = True
    with pytest.raises(ValueError, match="different numbers"):
        uneven.trainable_steps()


def test_kl_std_is_the_diffusion_coefficient(adapter):
    text, noise = _inputs(adapter)
    traj = _rollout(adapter, text, noise)
    j = 3
    s0, s1 = traj.sigmas[j].item(), traj.sigmas[j + 1].item()
    out = step_log_prob_under(adapter, traj, j, text, guidance=4.5)
    coefficient = 0.7 * math.sqrt(s0 / (1 - s0))
    assert torch.allclose(out.kl_std.flatten(), torch.full((2,), coefficient), rtol=1e-5)
    assert torch.allclose(out.std.flatten(), torch.full((2,), coefficient * math.sqrt(s0 - s1)), rtol=1e-5)


def test_gradient_flows_through_the_conditional_branch_only(trainable_adapter):
    adapter = trainable_adapter
    params = list(adapter.transformer.parameters())
    text, noise = _inputs(adapter)
    null, sigma, g = adapter.null_embeddings(), torch.tensor([0.7]), 4.5
    weights = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3))

    def grads(v):
        return torch.autograd.grad((v * weights).sum(), params, allow_unused=True)

    v = guided_velocity(adapter.velocity, noise, sigma, text, null, g)
    with torch.no_grad():
        assert torch.equal(v, cfg_velocity(adapter.velocity, noise, sigma, text, null, g))
    detached = grads(v)
    conditional = grads(g * adapter.velocity(noise, sigma, text).float())  # d v = g d v_cond
    full = grads(guided_velocity(adapter.velocity, noise, sigma, text, null, g, detach_uncond=False))
    pairs = [(d, c, f) for d, c, f in zip(detached, conditional, full) if c is not None]
    assert pairs
    for d, c, _ in pairs:
        assert torch.allclose(d, c, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(d, f, rtol=1e-3, atol=1e-5) for d, _, f in pairs)
    traj = _rollout(adapter, text, noise)
    step_log_prob_under(adapter, traj, 1, text, guidance=g).log_prob.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
