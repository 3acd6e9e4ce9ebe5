"""DanceGRPO: its SDE step against a Gaussian density computed here, its grid, advantages, shared initial noise,
timestep subsets, the absence of any KL/reference pass, on-policy ratios of exactly 1, and bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from soarbench.errors import UserError
from soarbench.harness.train import train
from soarbench.methods import build_method
from soarbench.methods.base import RunShape
from soarbench.methods.dance_grpo import DanceGRPO, dance_sigmas, initial_noise, trained_timesteps
from soarbench.metrics.base import Metric, MetricInfo
from soarbench.metrics.registry import METRICS
from soarbench.models.sd3 import SD3Adapter
from soarbench.rl.advantages import group_zscore
from soarbench.rl.rollout import sde_rollout, step_log_prob_under
from soarbench.sampling.ode import cfg_velocity, sampling_sigmas
from soarbench.sampling.sde import sde_step, step_log_prob


class Brightness(Metric):
    """A hand-made reward that varies from image to image."""

    info = MetricInfo(name="dance_test_brightness", version="1", scale="mean pixel value in [0, 1]")

    def score(self, images, prompts, metadata=None):
        return [{"score": float(np.asarray(im, dtype=np.float32).mean() / 255)} for im in images]


METRICS.add("dance_test_brightness", f"{__name__}:Brightness")

METHOD = {"name": "dance_grpo", "group_size": 2, "batch_size": 4, "num_steps": 5, "lora_r": 4, "lora_alpha": 8,
          "rewards": {"dance_test_brightness": 1.0}, "optimizer_steps_per_epoch": 2}


def _cfg(model_dir, data, units=2, train_opts=None, **method):
    return {"model": {"path": str(model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(data)},
            "method": {**METHOD, **method},
            "train": {"seed": 3, "lr": 1e-2, "threads": 2, **(train_opts or {})},
            "budget": {"unit": "optimizer_steps", "amount": 2 * units}}


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture()
def epochs(monkeypatch):
    """Every Epoch that DanceGRPO.collect returns during a run, in order."""
    seen = []
    collect = DanceGRPO.collect

    def recording(self, ctx, data):
        epoch = collect(self, ctx, data)
        seen.append(epoch)
        return epoch

    monkeypatch.setattr(DanceGRPO, "collect", recording)
    return seen


# ---- the SDE step ------------------------------------------------------------------------------------------
def test_dance_step_is_the_gaussian_of_the_reference_formulas():
    g = torch.Generator().manual_seed(0)
    x, v, eps = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    s0, s1, eta = np.array([1.0, 0.6, 0.3]), np.array([0.95, 0.4, 0.0]), 0.3
    out = sde_step("dance", x, v, torch.tensor(s0), torch.tensor(s1), eta, eps=eps)
    xn, vn, en = x.numpy().astype(np.float64), v.numpy().astype(np.float64), eps.numpy().astype(np.float64)
    b = lambda a: a.reshape(-1, 1, 1, 1)  # noqa: E731
    drop = b(s0 - s1)
    x0_hat = xn - b(s0) * vn
    score = -(xn - (1 - b(s0)) * x0_hat) / b(s0) ** 2
    mean = xn - drop * vn + 0.5 * eta**2 * drop * score
    std = eta * np.sqrt(drop)
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.std.numpy().reshape(-1), std.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(out.sample.numpy(), mean + std * en, rtol=1e-5, atol=1e-6)
    # at sigma = 1 the score is -x: the mean is x - D v - eta^2 D x / 2
    np.testing.assert_allclose(mean[0], xn[0] - 0.05 * vn[0] - 0.5 * eta**2 * 0.05 * xn[0], rtol=1e-6)
    logp = step_log_prob("dance", out)
    density = norm.logpdf(out.sample.numpy().astype(np.float64), loc=mean, scale=std)
    np.testing.assert_allclose(logp.numpy(), density.reshape(3, -1).mean(axis=1), rtol=1e-5)
    assert logp.dtype == torch.float32


def test_dance_grid_is_the_shifted_linspace_and_the_scheduler_grid_is_an_option(adapter):
    t = np.linspace(1, 0, 17)
    np.testing.assert_allclose(dance_sigmas(16).numpy(), 3 * t / (1 + 2 * t), rtol=1e-6, atol=1e-7)
    grid = DanceGRPO(sigma_grid="scheduler", num_steps=6, group_size=2, batch_size=4).sigmas(adapter)
    assert torch.equal(grid, sampling_sigmas(adapter.scheduler_config, 6))


def test_rollout_records_the_dance_density_and_ends_with_x0_hat(adapter):
    prompts = ["a photo of a red circle", "a photo of two squares"]
    text = adapter.encode_prompts(prompts)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, *adapter.latent_shape(32, 32), generator=g)
    N, eta = 5, 0.3
    traj = sde_rollout(adapter, text, noise, num_steps=N, guidance=4.5, variant="dance", noise_level=eta,
                       sde_window=(0, N - 1), generator=g, sigmas=dance_sigmas(N))
    assert traj.trainable.tolist() == [[True] * (N - 1) + [False]] * 2
    null = adapter.null_embeddings()
    for i in (0, 2):
        x, s0, s1 = traj.latents[:, i], traj.sigmas[i].item(), traj.sigmas[i + 1].item()
        v = cfg_velocity(adapter.velocity, x, torch.tensor([s0]), text, null, 4.5).double()
        x = x.double()
        mean = x - (s0 - s1) * v + 0.5 * eta**2 * (s0 - s1) * (-(x - (1 - s0) * (x - s0 * v)) / s0**2)
        std = eta * math.sqrt(s0 - s1)
        expected = norm.logpdf(traj.latents[:, i + 1].double().numpy(), loc=mean.numpy(), scale=std)
        np.testing.assert_allclose(traj.log_probs[:, i].numpy(), expected.reshape(2, -1).mean(1), rtol=1e-5)
    last = traj.latents[:, N - 1]
    v = cfg_velocity(adapter.velocity, last, traj.sigmas[N - 1].reshape(1), text, null, 4.5)
    assert torch.allclose(traj.final_latents, last - traj.sigmas[N - 1] * v, atol=1e-6)  # the reference's x0_hat
    assert (traj.log_probs[:, N - 1] == 0).all()
    # recomputed with the same weights, the density is the recorded one
    for j in range(N - 1):
        out = step_log_prob_under(adapter, traj, j, text, guidance=4.5)
        assert torch.equal(out.log_prob, traj.log_prob_at(j))


def test_unknown_sde_variant_in_the_step_is_refused():
    with pytest.raises(ValueError, match="valid: simple, sde, flow_sde, cps, dance"):
        sde_step("danse", torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.4, 0.3)


# ---- advantages, noise, timesteps ----------------------------------------------------------------------------
def test_group_zscore_uses_the_unbiased_group_std_and_clips():
    rewards = [0.1, 0.5, 0.3, 2.0, 2.0, 2.0, 0.0, 10.0]
    groups = [0, 0, 0, 1, 1, 1, 2, 2]
    out = group_zscore(rewards, groups, eps=1e-8, clip=5.0)
    expected = []
    for g in sorted(set(groups)):
        r = np.array([x for x, h in zip(rewards, groups) if h == g])
        std = r.std(ddof=1) if np.ptp(r) else 0.0
        expected += list((r - r.mean()) / (std + 1e-8))
    np.testing.assert_allclose(out.numpy(), np.clip(expected, -5, 5), rtol=1e-6, atol=1e-6)
    assert out[3:6].tolist() == [0.0, 0.0, 0.0]  # a constant group, exactly
    assert group_zscore([0.0, 10.0], [0, 0], clip=0.5).tolist() == [-0.5, 0.5]
    with pytest.raises(ValueError, match="at least 2"):
        group_zscore([1.0, 2.0, 3.0], [0, 0, 1])


def test_initial_noise_is_shared_by_a_group_and_keyed_by_group_and_epoch():
    shape = (4, 8, 8)
    ids, groups = list(range(6)), [i // 3 for i in range(6)]
    a = initial_noise(7, 0, ids, groups, shape)
    assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2]) and torch.equal(a[3], a[5])
    assert not torch.allclose(a[0], a[3])
    assert not torch.allclose(a, initial_noise(7, 1, ids, groups, shape))  # another epoch (sampling call)
    # a process holding only samples 3..5 draws exactly what a single process draws for them
    assert torch.equal(initial_noise(7, 0, ids[3:], groups[3:], shape), a[3:])
    own = initial_noise(7, 0, ids, groups, shape, same_per_group=False)
    assert all(not torch.allclose(own[i], own[j]) for i in range(6) for j in range(i))


def test_timestep_subset_is_a_keyed_permutation_prefix():
    N = 16
    K = int((N - 1) * 0.6)
    steps = trained_timesteps(5, 2, range(40), N - 1, K)
    assert K == 9 and steps.shape == (40, 9) and steps.dtype == torch.long
    assert int(steps.min()) >= 0 and int(steps.max()) <= N - 2  # the last transition (index N - 1) is dropped
    assert all(len(set(row)) == 9 for row in steps.tolist())
    assert len({tuple(row) for row in steps.tolist()}) > 30  # per sample, not shared
    assert set(steps.flatten().tolist()) == set(range(N - 1))
    assert torch.equal(trained_timesteps(5, 2, [17, 3], N - 1, K), steps[[17, 3]])  # keyed by the sample
    assert not torch.equal(trained_timesteps(5, 3, range(40), N - 1, K), steps)
    assert DanceGRPO(group_size=2, batch_size=4).K == 9


# ---- the method under the loop -------------------------------------------------------------------------------
def test_run_counts_no_reference_pass_and_shares_noise_within_groups(tiny_model_dir, shapes_data, tmp_path, epochs):
    train(_cfg(tiny_model_dir, shapes_data), tmp_path / "r", log=lambda m: None)
    log = _log(tmp_path / "r")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    n, N, K = 4, 5, int(4 * 0.6)
    b = log[-1]["budget"]
    assert b["images"] == 2 * n and b["reward_calls"] == 2 * n and b["vae_decodes"] == 2 * n
    assert b["no_grad_fwd"] == 2 * n * N * 2  # the CFG rollouts and nothing else: no reference forward, no KL
    assert b["fwd_bwd"] == 2 * n * K * 2
    assert not any("kl" == k or k.startswith("kl_") for k in log[0])
    assert len(epochs) == 2
    for e in epochs:
        start = e.traj.latents[:, 0]
        assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3])  # groups (0, 1) and (2, 3)
        assert not torch.allclose(start[0], start[2])
        assert not torch.allclose(e.traj.latents[0, 1], e.traj.latents[1, 1])  # per-step noise per sample
        assert e.steps.shape == (n, K) and int(e.steps.max()) <= N - 2
        assert sorted(torch.cat(e.batches).tolist()) == list(range(n))  # every sample is trained, none dropped
    assert not torch.allclose(epochs[0].traj.latents[0, 0], epochs[1].traj.latents[0, 0])
    ckpt = SD3Adapter.from_pretrained(tmp_path / "r" / "checkpoints" / "step_000004")
    assert "lora" not in json.dumps([name for name, _ in ckpt.transformer.named_parameters()])


@pytest.fixture()
def fresh_accelerator():
    """accelerate keeps one process-wide state whose mixed precision cannot change: start and leave it empty."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_first_step_of_each_epoch_is_exactly_on_policy(tiny_model_dir, shapes_data, tmp_path, precision,
                                                         fresh_accelerator):
    """Recomputed log-probs equal the rollout's (ratio exactly 1) before an epoch's first update, in fp32 and under
    bf16 autocast; the epoch's second step, after an update, is off-policy (so the check can fail)."""
    cfg = _cfg(tiny_model_dir, shapes_data, train_opts={"device": "cpu", "mixed_precision": precision})
    train(cfg, tmp_path / "r", log=lambda m: None)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["mixed_precision"] == precision
    log = _log(tmp_path / "r")
    for row in (log[0], log[2]):
        assert row["ratio_dev"] == 0.0 and row["approx_kl"] == 0.0 and row["clipfrac"] == 0.0, row
    assert log[1]["ratio_dev"] > 0 and log[3]["ratio_dev"] > 0


def test_rollouts_one_image_at_a_time_are_the_same_rollouts(tiny_model_dir, shapes_data, tmp_path, epochs):
    """rollout_batch_size = 1 (the reference's sampling) changes how the share is batched, not what is drawn."""
    train(_cfg(tiny_model_dir, shapes_data, units=1), tmp_path / "a", log=lambda m: None)
    train(_cfg(tiny_model_dir, shapes_data, units=1, rollout_batch_size=1), tmp_path / "b", log=lambda m: None)
    a, b = epochs
    assert torch.allclose(a.traj.latents, b.traj.latents, atol=1e-5)
    assert torch.allclose(a.traj.log_probs, b.traj.log_probs, atol=1e-5)
    assert torch.equal(a.steps, b.steps) and a.logs["reward_mean"] == pytest.approx(b.logs["reward_mean"], abs=1e-5)
    assert _log(tmp_path / "a")[-1]["budget"]["no_grad_fwd"] == _log(tmp_path / "b")[-1]["budget"]["no_grad_fwd"]


def test_full_finetune_with_ema_counts_the_same(tiny_model_dir, shapes_data, tmp_path):
    train(_cfg(tiny_model_dir, shapes_data, units=1, lora=False, ema=True, ema_every=1), tmp_path / "r",
          log=lambda m: None)
    b = _log(tmp_path / "r")[-1]["budget"]
    assert b["no_grad_fwd"] == 4 * 5 * 2 and b["fwd_bwd"] == 4 * 2 * 2


def test_plan_is_the_reference_arithmetic():
    method = build_method("dance_grpo", {"group_size": 12, "batch_size": 192, "num_steps": 16,
                                         "optimizer_steps_per_epoch": 2, "guidance": 1.0,
                                         "rewards": {"hpsv2": 1.0}})  # its weights load at setup, not here
    plan = method.plan(RunShape(8, 1, 12))
    assert (plan.images, plan.unique_prompts, plan.no_grad_fwd, plan.fwd_bwd) == (192, 16, 192 * 16, 192 * 9)
    assert (plan.optimizer_steps, plan.micro_batches, plan.samples_per_step) == (2, 9, 96)


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"group_size": 1}, "group_size must be >= 2"),
    ({"sde_type": "danse"}, "unknown [method] sde_type 'danse' (valid: cps, dance, flow_sde, sde, simple); "
                            "did you mean 'dance'?"),
    ({"sigma_grid": "linear"}, "did you mean 'linspace'?"),
    ({"num_steps": 2}, "train int((num_steps - 1) x fraction) = 0 timesteps"),
    ({"batch_size": 5}, "not a whole number of groups of 2"),
    ({"rewards": {"genevall": 1.0}}, "did you mean 'geneval'?"),
    ({"optimizer_steps_per_epoch": 3}, "do not split into optimizer_steps_per_epoch = 3"),
    ({"rollout_batch_size": -1}, "rollout_batch_size must be >= 0"),
])
def test_bad_options_are_one_clear_line(options, message):
    with pytest.raises(UserError) as err:
        build_method("dance_grpo", {**{k: v for k, v in METHOD.items() if k != "name"}, **options})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_option_through_the_cli_exits_2(cli, tiny_model_dir, shapes_data, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(f'[model]\npath = "{tiny_model_dir}"\nmax_sequence_length = 0\n[data]\njsonl = "{shapes_data}"\n'
                      '[method]\nname = "dance_grpo"\ngroup_size = 1\n[budget]\nunit = "optimizer_steps"\namount = 1\n')
    code, _, err = cli("train", "--config", config, "--out", tmp_path / "r")
    assert code == 2 and "group_size must be >= 2" in err and "Traceback" not in err


# ---- issue 24: the reference's timestep rounding and EMA ----------------------------------------------------
def test_rounded_timesteps_reach_the_model_and_the_sde_keeps_exact_sigmas(adapter):
    from soarbench.methods.dance_grpo import rounded_timesteps

    prompts = ["a photo of a red circle", "a photo of two squares"]
    text = adapter.encode_prompts(prompts)
    noise = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    N, sigmas = 5, dance_sigmas(5)
    seen, real = [], adapter.velocity

    def spy(z, sigma, text, net=None):
        seen.append(sigma.detach().reshape(-1)[0].item())
        return real(z, sigma, text, net)

    adapter.velocity = spy
    try:
        rounded = rounded_timesteps(adapter.velocity)
        traj = sde_rollout(adapter, text, noise, velocity=rounded, num_steps=N, guidance=4.5, variant="dance", noise_level=0.3,
                           sde_window=(0, N - 1), noise_fn=lambda i: torch.zeros_like(noise), sigmas=sigmas)
        # the reference (train_grpo_flux.py): timestep_value = int(sigma * 1000) on the fp32 sigma, fed as /1000
        want = [float(torch.tensor(int(s * 1000)) / 1000) for s in sigmas[:N]]
        assert seen == pytest.approx(want, abs=1e-7)
        assert seen[1] != pytest.approx(float(sigmas[1]), abs=1e-7)  # the grid is not already on the 1/1000 lattice
        assert torch.equal(traj.sigmas, sigmas.float())  # the SDE step's arithmetic keeps the exact sigmas
        seen.clear()
        for j in range(N - 1):  # the recomputation rounds alike: the ratio starts at exactly 1
            out = step_log_prob_under(adapter, traj, j, text, guidance=4.5, velocity=rounded)
            assert torch.equal(out.log_prob, traj.log_prob_at(j))
        assert seen == pytest.approx(want[:N - 1], abs=1e-7)
        exact = sde_rollout(adapter, text, noise, num_steps=N, guidance=4.5, variant="dance", noise_level=0.3,
                            sde_window=(0, N - 1), noise_fn=lambda i: torch.zeros_like(noise), sigmas=sigmas)
        assert not torch.equal(exact.latents, traj.latents)
    finally:
        adapter.velocity = real


def test_epoch_ema_is_the_references_constant_decay_once_per_epoch():
    from types import SimpleNamespace

    from soarbench.methods.dance_grpo import ConstantEMA

    method = build_method("dance_grpo", {"ema": True, "ema_schedule": "epoch", "ema_decay": 0.9})
    p = torch.nn.Parameter(torch.zeros(3))
    ema = ConstantEMA([p], decay=0.9, every=1)
    ref = torch.zeros(3)  # the reference's FSDP_EMA.update: e = decay e + (1 - decay) p, after each epoch
    step = 0
    for unit in range(3):
        for end in (False, True):  # two optimizer steps per epoch
            step += 1
            with torch.no_grad():
                p.add_(float(step))
            method.after_update(SimpleNamespace(roles=SimpleNamespace(ema=ema), unit=unit), step, end)
        ref = 0.9 * ref + 0.1 * p.detach()
        assert torch.allclose(ema.shadow[0], ref, atol=1e-6)
    warm = build_method("dance_grpo", {"ema": True, "ema_decay": 0.995})
    assert warm.opt.ema_schedule == "step"  # the default keeps the warm-up decay every ema_every steps
    with pytest.raises(UserError, match="ema_schedule"):
        build_method("dance_grpo", {"ema_schedule": "daily"})


def test_reference_options_run_and_are_recorded(tiny_model_dir, shapes_data, tmp_path):
    train(_cfg(tiny_model_dir, shapes_data, units=1, lora=False, ema=True, ema_schedule="epoch",
               round_timestep=True), tmp_path / "r", log=lambda m: None)
    import tomllib

    recorded = tomllib.loads((tmp_path / "r" / "config.toml").read_text())["method"]  # the run's resolved config
    assert recorded["ema_schedule"] == "epoch" and recorded["round_timestep"] is True
    assert _log(tmp_path / "r")[0]["ratio_dev"] == 0.0  # rounded alike in the rollout and the recomputation


# The reference scripts' flags (XueZeyue/DanceGRPO at 15cc71d, scripts/finetune/), copied here as they are written.
LORA_SCRIPT = ("--learning_rate 3e-4 --sampling_steps 12 --eta 0.3 --max_grad_norm 1.0 --weight_decay 0.0001 "
               "--num_generations 12 --shift 3 --timestep_fraction 0.6 --clip_range 1e-4 --adv_clip_max 5.0 "
               "--lora_alpha 256 --lora_rank 128 --checkpointing_steps 60")  # finetune_flux_grpo_8gpus_lora.sh
FULL_SCRIPT = ("--learning_rate 1e-5 --sampling_steps 16 --eta 0.3 --max_grad_norm 0.01 --weight_decay 0.0001 "
               "--num_generations 12 --shift 3 --timestep_fraction 0.6 --clip_range 1e-4 --adv_clip_max 5.0 "
               "--ema_decay 0.995 --checkpointing_steps 40")  # finetune_flux_grpo_8gpus.sh (--use_ema)


@pytest.mark.parametrize("name, script, lora", [("dance_grpo", LORA_SCRIPT, True),
                                                ("dance_grpo_full", FULL_SCRIPT, False)])
def test_sd35m_configs_are_the_reference_scripts(name, script, lora):
    from pathlib import Path

    from soarbench import config as C

    flags = dict(zip(script.split()[::2], (float(v) for v in script.split()[1::2])))
    cfg = C.load_toml(Path(__file__).resolve().parents[1] / "benchmarks" / "sd35m" / f"{name}.toml")
    train_, method = cfg["train"], cfg["method"]
    assert train_["lr"] == flags["--learning_rate"] and train_["grad_clip"] == flags["--max_grad_norm"]
    assert train_["weight_decay"] == flags["--weight_decay"]
    assert train_["checkpoint_every"] == flags["--checkpointing_steps"]
    assert method["num_steps"] == flags["--sampling_steps"] and method["eta"] == flags["--eta"]
    assert method["group_size"] == flags["--num_generations"] and method["shift"] == flags["--shift"]
    assert method["timestep_fraction"] == flags["--timestep_fraction"]
    assert method["clip_range"] == flags["--clip_range"] and method["adv_clip"] == flags["--adv_clip_max"]
    assert method["lora"] is lora and method["round_timestep"] is True
    if lora:
        assert method["lora_r"] == flags["--lora_rank"] and method["lora_alpha"] == flags["--lora_alpha"]
        assert method["ema"] is False
    else:
        assert method["ema"] is True and method["ema_decay"] == flags["--ema_decay"]
        assert method["ema_schedule"] == "epoch"
    build_method("dance_grpo", {k: v for k, v in method.items() if k not in ("name", "rewards")})
