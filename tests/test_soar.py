"""SOAR's pieces against closed forms and its loss against SFT, on the tiny SD3."""
from __future__ import annotations

import pytest
import torch

from soarbench import flow
from soarbench.meter import Meter
from soarbench.methods.base import Batch, Ctx
from soarbench.methods.sft import SFT, FlowMatchingDraw
from soarbench.methods.soar import SOAR, correction_velocity, renoise_toward


def test_v_corr_equals_its_closed_form():
    g = torch.Generator().manual_seed(0)
    z0, z1, v_cfg = (torch.randn(5, 4, 3, 3, generator=g) for _ in range(3))
    sigma0 = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1])
    sigma1 = sigma0 - 0.05
    sigma_p = sigma1 + torch.rand(5, generator=g) * (1 - sigma1)
    b = lambda s: s.reshape(-1, 1, 1, 1)  # noqa: E731
    z_on = (1 - b(sigma0)) * z0 + b(sigma0) * z1
    z_off = z_on + b(sigma1 - sigma0) * v_cfg
    v_corr = correction_velocity(renoise_toward(z_off, z1, sigma1, sigma_p), z0, sigma_p)
    v_gt = z1 - z0
    delta = b(sigma1 - sigma0) * (v_cfg - v_gt)
    closed = v_gt + b((1 - sigma_p) / (sigma_p * (1 - sigma1))) * delta
    assert torch.allclose(v_corr, closed, atol=1e-5)


def test_renoised_points_lie_on_the_segment_at_the_sigma_asked():
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    sigma1 = torch.tensor([0.2, 0.4, 0.6, 0.003])
    sigma_p = torch.tensor([0.5, 0.4, 0.9, 1.0])
    z_off = torch.randn(4, 4, 3, 3, generator=g)  # an arbitrary off-trajectory state
    zp = renoise_toward(z_off, z1, sigma1, sigma_p)
    alpha = ((sigma_p - sigma1) / (1 - sigma1)).reshape(-1, 1, 1, 1)
    assert torch.allclose(zp - z_off, alpha * (z1 - z_off), atol=1e-6)  # on the line, at fraction alpha
    # a perfect rollout (z_off on the trajectory at sigma1) re-noises exactly onto the trajectory at sigma'
    on = flow.interpolate(z0, z1, sigma1)
    assert torch.allclose(renoise_toward(on, z1, sigma1, sigma_p), flow.interpolate(z0, z1, sigma_p), atol=1e-6)


def _ctx(adapter, seed=0):
    from soarbench.models.roles import Roles

    meter = Meter()
    adapter.meter = meter
    return Ctx(adapter=adapter, roles=Roles(adapter), engine=None, meter=meter,
               sigmas=flow.training_sigmas(3.0, 1000), seed=seed)


def _batch(adapter, n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    prompts = ["a photo of a red circle", "a photo of two squares", "a photo of a cross left of a diamond",
               "a photo of a blue triangle"][:n]
    return Batch(z0=torch.randn(n, *adapter.latent_shape(32, 32), generator=g),
                 text=adapter.encode_prompts(prompts), prompts=prompts, ids=list(range(n)))


class Out:
    """The pooled loss of one micro-batch (its sum / its weight) and the passes the meter counted."""

    def __init__(self, out, weight, counts):
        self.loss, self.logs = out.loss / weight, {k: v / c if c else v for k, (v, c) in out.logs.items()}
        self.fwd_bwd, self.no_grad_fwd = counts["fwd_bwd"], counts["no_grad_fwd"]


def _loss(adapter, method, batch, seed=0):
    ctx = _ctx(adapter, seed)
    [micro] = next(method.updates(ctx, [batch]))
    out = method.loss(ctx, micro)
    return Out(out, micro.weight, ctx.meter.take()[0])


def _loss_and_grads(adapter, method, batch, seed=0):
    net = adapter.transformer
    net.requires_grad_(True)
    net.zero_grad(set_to_none=True)
    out = _loss(adapter, method, batch, seed)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("options", [{"lambda_aux": 0.0}, {"trajectory_length": 0}])
def test_lambda_zero_is_exactly_sft(adapter, options):
    batch = _batch(adapter)
    sft, g_sft = _loss_and_grads(adapter, SFT(), batch)
    soar, g_soar = _loss_and_grads(adapter, SOAR(**options), batch)
    assert soar.loss.item() == sft.loss.item()
    assert g_sft.keys() == g_soar.keys() and len(g_sft) > 0
    for name in g_sft:
        assert torch.equal(g_sft[name], g_soar[name]), name
    assert (soar.fwd_bwd, soar.no_grad_fwd) == (sft.fwd_bwd, 0)


def test_pooled_normalisation_and_pass_counts(adapter):
    batch = _batch(adapter)
    out = _loss(adapter, SOAR(lambda_aux=0.5, trajectory_length=3), batch)
    B, n_aux = 4, 12
    expected = (B * out.logs["loss_main"] + 0.5 * n_aux * out.logs["loss_aux"]) / (B + 0.5 * n_aux)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert (out.fwd_bwd, out.no_grad_fwd, out.logs["aux_points"]) == (B + n_aux, B, n_aux)


def test_rollout_reuses_the_detached_conditional_velocity(adapter):
    """Three transformer calls: main (grad), uncond rollout (no grad, B samples), aux (grad)."""
    calls = []
    net = adapter.transformer
    hook = net.register_forward_hook(lambda m, a, kw, out: calls.append(
        (kw["hidden_states"].shape[0], torch.is_grad_enabled())), with_kwargs=True)
    net.requires_grad_(True)
    try:
        _loss(adapter, SOAR(trajectory_length=2), _batch(adapter))
    finally:
        hook.remove()
    assert calls == [(4, True), (4, False), (8, True)]


def test_aux_sigma_range_and_stochastic_path_exclusions(adapter):
    method = SOAR(trajectory_length=5, num_rollout_paths=3, num_sampling_steps=40, sigma_upper=0.9)
    batch = _batch(adapter)
    ctx = _ctx(adapter)
    t0 = torch.tensor([0.9, 0.01, 0.5, 0.02])  # samples 1 and 3: t1 = t0 - 1/40 clips to 0
    sigma0 = ctx.sigmas[flow.grid_index(t0)]
    z1 = torch.randn_like(batch.z0)
    d = FlowMatchingDraw(z1=z1, t0=t0, sigma0=sigma0, z_on=flow.interpolate(batch.z0, z1, sigma0))
    v_cond = torch.randn_like(batch.z0)
    paths = method.rollout(ctx, batch, d, v_cond)
    assert [p[1].tolist() for p in paths] == [[0, 1, 2, 3], [0, 2], [0, 2]]
    assert not any(p[0].requires_grad for p in paths)  # the rollout builds no autograd graph
    zp, sigma_p, v_corr, idx = method.aux_points(ctx, batch, d, paths)
    assert len(idx) == 5 * (4 + 2 + 2)
    sigma1 = ctx.sigmas[flow.grid_index((t0 - 1 / 40).clamp(min=0))]
    assert torch.all(sigma_p >= sigma1[idx] - 1e-7)
    assert torch.all(sigma_p <= torch.clamp(sigma1[idx], min=0.9) + 1e-7)
    assert torch.all(sigma_p[sigma1[idx] > 0.9] == sigma1[idx][sigma1[idx] > 0.9])  # collapsed range
    expected_s1 = ctx.sigmas[flow.grid_index(t0 - 1 / 40)]
    assert torch.allclose(sigma1[[0, 2]], expected_s1[[0, 2]])
    # the ODE path: z_off = z_on + v_cfg (sigma1 - sigma0), with v_cfg from the detached v_cond
    null = adapter.null_embeddings().repeat(4)
    with torch.no_grad():
        v_unc = adapter.velocity(d.z_on, sigma0, null)
    v_cfg = v_unc + 4.5 * (v_cond - v_unc)
    assert torch.allclose(paths[0][0], d.z_on + (sigma1 - sigma0).reshape(-1, 1, 1, 1) * v_cfg, atol=1e-5)


def test_every_sample_draws_its_own_noise_whatever_its_batch(adapter):
    """Draws are keyed by the global sample index: a sample gets the same noise and timestep in any micro-batch or
    process (so 1 GPU x 2 accumulation = 2 GPUs), and different samples get different draws."""
    method = SFT()
    ctx = _ctx(adapter, seed=7)
    whole = _batch(adapter, n=4)
    halves = [Batch(whole.z0[i:i + 2], whole.text[i:i + 2], whole.prompts[i:i + 2], whole.ids[i:i + 2])
              for i in (0, 2)]
    d = method.draw(ctx, whole)
    parts = [method.draw(ctx, h) for h in halves]
    assert torch.equal(d.z1, torch.cat([p.z1 for p in parts])) and torch.equal(d.t0, torch.cat([p.t0 for p in parts]))
    assert len({float(t) for t in d.t0}) == 4 and not torch.equal(d.z1[0], d.z1[1])
    ctx.unit = 1  # the next step draws afresh
    assert not torch.equal(method.draw(ctx, whole).z1, d.z1)
    assert not torch.equal(method.draw(_ctx(adapter, seed=8), whole).z1, d.z1)  # and so does another seed
