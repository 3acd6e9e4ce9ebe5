"""DiffusionNFT and its DPM-2 sampler against independent expectations: the solver step against its exponential-
integrator formula, exactness on a point mass and second-order convergence on a Gaussian (closed-form flow), the
NFT loss's value and gradient written out per sample, r's mapping, both old-policy decay schedules step by step,
v_theta == v_old before any update (fp32 and bf16 autocast, LoRA and full fine-tuning), the counters against the
config's arithmetic, and bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from soarbench.errors import UserError
from soarbench.meter import Meter
from soarbench.harness.train import train
from soarbench.methods.base import Ctx
from soarbench.methods.diffusion_nft import (DiffusionNFT, _adaptive_branch, nft_terms, old_decay,
                                             optimality_probability)
from soarbench.metrics.base import Metric, MetricInfo
from soarbench.metrics.registry import METRICS
from soarbench.models.roles import Roles
from soarbench.sampling.dpm import dpm_rollout, ode_sample, solver_step
from soarbench.sampling.ode import euler_sample, sampling_sigmas


class Brightness(Metric):
    info = MetricInfo(name="test_nft_brightness", version="1", scale="mean pixel value in [0, 1]")

    def score(self, images, prompts, metadata=None):
        return [{"score": float(np.asarray(im, dtype=np.float32).mean() / 255)} for im in images]


METRICS.add("test_nft_brightness", f"{__name__}:Brightness")

SHIFT3 = {"shift": 3.0, "num_train_timesteps": 1000}


# ---- the DPM-2 solver --------------------------------------------------------------------------------------------
def _lam(s):
    return math.log((1 - s) / s)


def test_dpm2_step_matches_the_exponential_integrator_formula():
    g = torch.Generator().manual_seed(0)
    x, d, d_prev = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    s_prev, s, s_next = 0.8, 0.6, 0.35
    # DPM-Solver++(2M) in data prediction, alpha = 1 - sigma (Lu et al. 2022, eq. for the multistep update)
    h, h0 = _lam(s_next) - _lam(s), _lam(s) - _lam(s_prev)
    D1 = (d - d_prev) / (h0 / h)
    expected = (s_next / s) * x - (1 - s_next) * (math.exp(-h) - 1) * (d + 0.5 * D1)
    assert torch.allclose(solver_step(x, d, d_prev, s_prev, s, s_next, "dpm2"), expected, atol=1e-5)
    # first-order steps: the first one (no previous D), from a previous sigma of 1 (lambda = -inf), and onto 0
    v = (x - d) / s  # the velocity that gives this data prediction
    euler = x + (s_next - s) * v
    assert torch.allclose(solver_step(x, d, None, None, s, s_next, "dpm2"), euler, atol=1e-5)
    assert torch.allclose(solver_step(x, d, d_prev, 1.0, s, s_next, "dpm2"), euler, atol=1e-5)
    assert torch.allclose(solver_step(x, d, d_prev, s_prev, s, 0.0, "dpm2"), d, atol=1e-6)
    assert torch.allclose(solver_step(x, d, d_prev, s_prev, s, s_next, "euler"), euler, atol=1e-5)


@pytest.mark.parametrize("solver", ["dpm2", "euler"])
def test_point_mass_flow_is_integrated_exactly(solver):
    """Data = one point c: v(x, s) = (x - c) / s is linear and x(s) = c + s (eps - c); both solvers are exact."""
    c = torch.tensor([0.7, -1.3, 2.0]).reshape(1, 3, 1, 1)
    eps = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    sigmas = sampling_sigmas(SHIFT3, 6)
    seen = []

    def velocity(z, sigma):
        seen.append(float(sigma))
        return (z - c) / sigma.reshape(-1, 1, 1, 1)

    out = ode_sample(velocity, eps, sigmas, solver)
    assert torch.allclose(out, c.expand_as(out), atol=1e-5)
    assert seen == pytest.approx([float(s) for s in sigmas[:-1]])  # one evaluation per step, on the grid


def _gaussian_flow(mu, std):
    """Data N(mu, std^2): the flow ODE keeps z = (x - (1 - s) mu) / m(s), m(s) = sqrt((1 - s)^2 std^2 + s^2)."""
    def m(s):
        return torch.sqrt((1 - s) ** 2 * std**2 + s**2)

    def velocity(x, sigma):
        s = sigma.double().reshape(-1, 1, 1, 1)
        dm = (s - (1 - s) * std**2) / m(s)
        return (-mu + dm / m(s) * (x.double() - (1 - s) * mu)).float()

    return velocity, (lambda eps: mu + std * eps)


def test_dpm2_converges_at_second_order_and_euler_at_first():
    """Error at sigma = 0 on a uniform sigma grid of N = 20, 40, 80 steps. Euler halves it per doubling; DPM-2
    nearly quarters it: its local errors near the two ends (where lambda steps are ~1/k, not ~1/N) add up to
    log(N) / N^2, so a doubling divides by 4 log(N) / log(2N), about 3.3 here; a first-order bug would give 2."""
    velocity, exact = _gaussian_flow(0.3, 1.5)
    eps = torch.randn(64, 1, 1, 1, generator=torch.Generator().manual_seed(2))

    def error(solver, n):
        return float((ode_sample(velocity, eps, torch.linspace(1, 0, n + 1), solver) - exact(eps)).abs().max())

    dpm = [error("dpm2", n) for n in (20, 40, 80)]
    euler = [error("euler", n) for n in (20, 40, 80)]
    assert dpm[0] / dpm[1] > 3.0 and dpm[1] / dpm[2] > 3.0
    assert 1.8 < euler[0] / euler[1] < 2.2 and 1.8 < euler[1] / euler[2] < 2.2
    assert all(10 * a < b for a, b in zip(dpm, euler))


def test_euler_rollout_is_the_evaluation_sampler(adapter):
    text = adapter.encode_prompts(["a red circle", "a blue square"])
    noise = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
    ours = dpm_rollout(adapter, text, noise, num_steps=4, guidance=4.5, solver="euler")
    assert torch.allclose(ours, euler_sample(adapter, text, noise, num_steps=4, guidance=4.5), atol=1e-5)
    dpm = dpm_rollout(adapter, text, noise, num_steps=4, guidance=1.0, solver="dpm2")
    assert dpm.shape == noise.shape and torch.isfinite(dpm).all()


# ---- the loss ----------------------------------------------------------------------------------------------------
def test_optimality_probability_maps_and_clips():
    a = torch.tensor([-7.0, -5.0, -2.5, 0.0, 2.5, 5.0, 9.0])
    assert optimality_probability(a).tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert optimality_probability(torch.tensor([1.0, -3.0]), adv_clip=2.0).tolist() == [0.75, 0.0]


def _reference_loss(x0, x_t, t, v, v_old, v_ref, r, beta, kl_weight):
    """The reference's per-sample arithmetic written out sample by sample, with the closed-form gradient."""
    total, grads = 0.0, []
    for i in range(x0.shape[0]):
        X0, XT, V, VO, VR = (a[i].double() for a in (x0, x_t, v, v_old, v_ref))
        n_el = X0.numel()
        err_p = XT - t[i] * (beta * V + (1 - beta) * VO) - X0
        err_n = XT - t[i] * ((1 + beta) * VO - beta * V) - X0
        w_p, w_n = max(float(err_p.abs().mean()), 1e-5), max(float(err_n.abs().mean()), 1e-5)
        L_p, L_n = float((err_p**2).mean()) / w_p, float((err_n**2).mean()) / w_n
        kl = float(((V - VR) ** 2).mean())
        total += 5.0 * (r[i] * L_p + (1 - r[i]) * L_n) / beta + kl_weight * kl
        # d err_p / dV = -t beta, d err_n / dV = +t beta
        grads.append(5.0 / beta * (r[i] * 2 * err_p * (-t[i] * beta) / (w_p * n_el)
                                   + (1 - r[i]) * 2 * err_n * (t[i] * beta) / (w_n * n_el))
                     + kl_weight * 2 * (V - VR) / n_el)
    return total, torch.stack(grads)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_value_and_gradient(beta):
    g = torch.Generator().manual_seed(4)
    x0, eps, v_old, v_ref = (torch.randn(3, 2, 3, 3, generator=g) for _ in range(4))
    t = torch.tensor([1.0, 0.55, 0.2])
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
    v = (v_old + 0.3 * torch.randn(3, 2, 3, 3, generator=g)).requires_grad_(True)
    r = torch.tensor([0.0, 0.3, 1.0])
    terms = nft_terms(x0, x_t, t, v, v_old, r, beta, v_ref, adv_clip=5.0, kl_weight=1e-4)
    terms.total.sum().backward()
    expected, grad = _reference_loss(x0, x_t, t, v.detach(), v_old, v_ref, r.tolist(), beta, 1e-4)
    assert float(terms.total.sum().detach()) == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(v.grad.double(), grad, rtol=1e-5, atol=1e-9)
    # the implicit policies: at v == v_old both branches are v_old, so L+ == L- (bit for bit at beta = 1)
    same = nft_terms(x0, x_t, t, v_old, v_old, r, beta, v_ref)
    assert torch.allclose(same.positive, same.negative, rtol=1e-6)
    if beta == 1.0:
        assert torch.equal(same.positive, same.negative)


def test_adaptive_weight_is_clamped_and_stop_grad():
    x0 = torch.zeros(1, 2, 2, 2)
    close = torch.full_like(x0, 1e-7)  # mean |error| 1e-7 < 1e-5: the weight is the floor
    assert float(_adaptive_branch(close, x0)) == pytest.approx(1e-14 / 1e-5, rel=1e-6)
    far = torch.full_like(x0, 0.5).requires_grad_(True)
    _adaptive_branch(far, x0).backward()  # w = 0.5 is a constant: d/dx mean(x^2) / w = 2 x / (8 w)
    assert torch.allclose(far.grad, torch.full_like(far, 2 * 0.5 / (8 * 0.5)))


def test_decay_schedules_step_by_step():
    linear = {0: 0.0, 1: 0.001, 250: 0.25, 499: 0.499, 500: 0.5, 501: 0.5, 10_000: 0.5}
    ocr = {0: 0.0, 74: 0.0, 75: 0.0, 76: 0.0075, 100: 0.1875, 208: 0.9975, 209: 0.999, 5_000: 0.999}
    for step, d in linear.items():
        assert old_decay(step, "linear") == pytest.approx(d, abs=1e-12), step
    for step, d in ocr.items():
        assert old_decay(step, "ocr") == pytest.approx(d, abs=1e-12), step
    assert all(old_decay(s, "none") == 0.0 for s in (0, 10, 10_000))


# ---- roles: old == policy until updated, the soft update, what is exported ----------------------------------------
def _ctx(adapter, **method):
    m = DiffusionNFT(group_size=2, batch_size=4, num_steps=3, rewards={"test_nft_brightness": 1.0}, lora_r=4,
                     lora_alpha=8, **method)
    ctx = Ctx(adapter=adapter, roles=Roles(adapter), engine=None, meter=Meter(), sigmas=torch.linspace(1, 0, 1000))
    return m, ctx, m.setup(ctx)[0].params


def _velocities(ctx, roles=("policy", "old", "ref")):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, *ctx.adapter.latent_shape(32, 32), generator=g)
    text = ctx.adapter.encode_prompts(["a red circle", "a green triangle"])
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        return {r: ctx.velocity(z, sigma, text, role=r) for r in roles}


@pytest.mark.parametrize("lora", [True, False])
def test_old_equals_policy_before_the_first_update_and_after_a_full_copy(adapter, lora):
    m, ctx, params = _ctx(adapter, lora=lora, decay_schedule="none")
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            v = _velocities(ctx)
        assert torch.equal(v["policy"], v["old"]), autocast
    with torch.no_grad():  # an optimizer step's worth of change to the trained weights
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    v = _velocities(ctx)
    assert not torch.allclose(v["policy"], v["old"], atol=1e-4)
    m.after_update(ctx, step=1, end_of_unit=False)  # not the epoch's last step: the old policy stays
    assert torch.equal(_velocities(ctx)["old"], v["old"])
    m.after_update(ctx, step=1, end_of_unit=True)  # schedule "none": d = 0, the old policy becomes the policy
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            after = _velocities(ctx)
        assert torch.equal(after["policy"], after["old"]), autocast
        assert not torch.allclose(after["policy"], after["ref"], atol=1e-4)


def test_soft_update_mixes_by_the_schedule_and_export_is_the_policy(adapter):
    from peft import PeftModel

    m, ctx, params = _ctx(adapter, ema=False)
    peft = ctx.roles.base
    assert isinstance(peft, PeftModel)
    named = dict(peft.named_parameters())
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    old_before = {n: p.detach().clone() for n, p in named.items() if ".old." in n}
    m.after_update(ctx, step=300, end_of_unit=True)  # linear: d = min(0.3, 0.5)
    for n, before in old_before.items():
        trained = named[n.replace(".old.", ".default.")].detach()
        assert torch.allclose(named[n].detach(), 0.3 * before + 0.7 * trained, atol=1e-7), n
    merged = ctx.roles.export_transformer()  # the policy's LoRA folded in, not the old adapter's
    v = _velocities(ctx, ("policy", "old"))
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, *adapter.latent_shape(32, 32), generator=g)
    text = adapter.encode_prompts(["a red circle", "a green triangle"])
    with torch.no_grad():
        out = adapter.velocity(z, torch.tensor([0.9, 0.4]), text, merged)
    assert torch.allclose(out, v["policy"], atol=1e-5) and not torch.allclose(out, v["old"], atol=1e-4)


# ---- the harness ---------------------------------------------------------------------------------------------------
def _cfg(model_dir, data, steps=4, **method):
    return {"model": {"path": str(model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(data)},
            "method": {"name": "diffusion_nft", "group_size": 2, "batch_size": 4, "num_steps": 3,
                       "rewards": {"test_nft_brightness": 1.0}, "lora_r": 4, "lora_alpha": 8, **method},
            "train": {"seed": 1, "lr": 1e-2, "threads": 2},
            "budget": {"unit": "optimizer_steps", "amount": steps}}


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,cfg_factor,ref", [({}, 1, 1), ({"guidance": 2.0, "kl_weight": 0.0}, 2, 0)])
def test_counters_equal_the_arithmetic(tiny_model_dir, shapes_data, tmp_path, method, cfg_factor, ref):
    train(_cfg(tiny_model_dir, shapes_data, optimizer_steps_per_epoch=2, **method), tmp_path / "r",
          log=lambda m: None)
    log = _log(tmp_path / "r")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    epochs, n, T, K = 2, 4, 3, 2  # int(3 * 0.99) = 2 trained timesteps
    b = log[-1]["budget"]
    assert b["images"] == epochs * n and b["reward_calls"] == epochs * n and b["vae_decodes"] == epochs * n
    assert b["fwd_bwd"] == epochs * n * K  # CFG-free training
    assert b["no_grad_fwd"] == epochs * (n * T * cfg_factor + n * K * (1 + ref))  # rollouts + old (+ reference)
    # step 1 runs before any update: v_theta == v_old exactly, so both implicit branches coincide
    assert log[0]["old_deviate"] == 0.0 and log[0]["positive_loss"] == log[0]["negative_loss"]
    assert log[1]["old_deviate"] > 0  # the same epoch's second step: the policy moved, the old policy did not
    assert all(math.isfinite(r["loss"]) for r in log)


def test_group_of_one_is_refused(tiny_model_dir, shapes_data, tmp_path):
    with pytest.raises(UserError, match="group_size must be >= 2") as e:
        train(_cfg(tiny_model_dir, shapes_data, group_size=1), tmp_path / "r", log=lambda m: None)
    assert "\n" not in str(e.value)


def test_unknown_solver_and_schedule_are_refused():
    with pytest.raises(UserError, match=r"unknown \[method\] solver 'dpm3'.*did you mean 'dpm2'") as e:
        DiffusionNFT(solver="dpm3", rewards={"test_nft_brightness": 1.0})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="decay_schedule 'OCR'.*valid: linear, none, ocr"):
        DiffusionNFT(decay_schedule="OCR", rewards={"test_nft_brightness": 1.0})


def test_full_finetune_without_copies_is_refused(tiny_model_dir, shapes_data, tmp_path):
    cfg = _cfg(tiny_model_dir, shapes_data, lora=False)
    cfg["train"]["components"] = ["transformer", "text_encoder"]
    with pytest.raises(UserError, match="trains the transformer only") as e:
        train(cfg, tmp_path / "r", log=lambda m: None)
    assert "\n" not in str(e.value)

    class Sharded:  # a ZeRO-3 / FSDP engine: whole frozen copies would defeat the sharding
        shards_parameters, name, world_size, rank = True, "deepspeed_zero3", 8, 0

    m = DiffusionNFT(lora=False, rewards={"test_nft_brightness": 1.0})
    ctx = Ctx(adapter=None, roles=None, engine=Sharded(), meter=Meter(), sigmas=torch.zeros(1))
    with pytest.raises(UserError, match="cannot be sharded under the deepspeed_zero3 engine: use lora = true") as e:
        m.setup(ctx)
    assert "\n" not in str(e.value)


def test_resume_restores_the_old_policy(tiny_model_dir, shapes_data, tmp_path):
    """Stopped after 2 epochs and resumed: the old adapter (which samples epoch 3) and the EMA come back, so epoch 3
    and the final weights equal those of a straight run."""
    base = _cfg(tiny_model_dir, shapes_data, steps=3)
    train(base, tmp_path / "straight", log=lambda m: None)
    train(_cfg(tiny_model_dir, shapes_data, steps=2), tmp_path / "resumed", log=lambda m: None)
    train(base, tmp_path / "resumed", resume=True, log=lambda m: None)
    la, lb = _log(tmp_path / "straight"), _log(tmp_path / "resumed")
    assert [r["step"] for r in lb] == [1, 2, 3]
    for key in ("loss", "reward_mean", "old_deviate"):
        assert [r[key] for r in la] == pytest.approx([r[key] for r in lb], rel=1e-5, abs=1e-9), key
    assert la[2]["old_deviate"] > 0  # epoch 3 samples from an old policy that is neither the init nor the policy
    from soarbench.models import SD3Adapter

    a, b = (SD3Adapter.from_pretrained(tmp_path / r / "checkpoints" / "step_000003").transformer.state_dict()
            for r in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
