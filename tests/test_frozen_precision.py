"""Frozen components under bf16 mixed precision (train.frozen_dtype): the VAE, the untrained text encoders and a
full fine-tuning's reference copy held in bf16, the trained weights in fp32; the off switch; what run.json records;
when the text encoders leave the GPU after the text cache is built."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from soarbench.errors import UserError
from soarbench.harness.train import Run, resolve_config, text_encoder_release, train
from soarbench.methods import build_method
from soarbench.models.roles import Roles, copy_in_dtype

import reward_plugins  # noqa: F401  (the test reward test_brightness)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
NFT = {"name": "diffusion_nft", "group_size": 2, "batch_size": 4, "num_steps": 3, "rewards": {"test_brightness": 1.0},
       "lora": False, "kl_weight": 0.1, "optimizer_steps_per_epoch": 1}


def _cfg(model_dir, data, method=None, steps=1, **train_opts):
    return {"model": {"path": str(model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(data)},
            "method": method or {"name": "sft"},
            "train": {"seed": 4, "batch_size": 2, "lr": 1e-3, "threads": 2, "device": "cpu", **train_opts},
            "budget": {"unit": "optimizer_steps", "amount": steps}, "log": {"tensorboard": False}}


@pytest.fixture()
def fresh_accelerator():
    """Each Run builds its own Accelerator; leave accelerate's process-wide state empty for the next test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _run(cfg, out) -> Run:
    return Run(resolve_config(cfg), out, False, lambda m: None, None)


def _dtypes(module) -> set:
    return {p.dtype for p in module.parameters()} | {b.dtype for b in module.buffers() if b.is_floating_point()}


def _nbytes(module, bytes_per_element: int) -> int:
    return sum(p.numel() for p in module.parameters()) * bytes_per_element


def test_bf16_run_holds_frozen_modules_in_bf16_and_trains_fp32_weights(tiny_model_dir, shapes_data, tmp_path,
                                                                     fresh_accelerator):
    """Full-fine-tuning DiffusionNFT with a KL reference under bf16: VAE, text encoders and the "ref" copy in bf16,
    the trained transformer and every optimizer tensor in fp32, the soft-updated "old" copy in fp32; run.json's
    parameter bytes equal the count made here from a fresh fp32 load (2 bytes a weight for the bf16 ones)."""
    from soarbench.models import SD3Adapter

    run = _run(_cfg(tiny_model_dir, shapes_data, NFT, mixed_precision="bf16"), tmp_path / "r")
    pipe = run.adapter.pipe
    assert _dtypes(pipe.vae) == {torch.bfloat16}
    for name in TEXT_ENCODERS:
        if getattr(pipe, name) is not None:
            assert _dtypes(getattr(pipe, name)) == {torch.bfloat16}, name
    assert _dtypes(run.roles.copies["ref"]) == {torch.bfloat16}
    assert _dtypes(run.roles.copies["old"]) == {torch.float32}
    assert _dtypes(pipe.transformer) == {torch.float32}
    assert all(p.requires_grad for p in pipe.transformer.parameters())
    assert {p.dtype for g in run.optimizer.param_groups for p in g["params"]} == {torch.float32}

    fresh = SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=0)  # fp32, as on disk
    encoders = [getattr(fresh.pipe, n) for n in TEXT_ENCODERS if getattr(fresh.pipe, n) is not None]
    expected = (_nbytes(fresh.pipe.vae, 2) + sum(_nbytes(m, 2) for m in encoders)
                + _nbytes(fresh.transformer, 2) + _nbytes(fresh.transformer, 4))  # ref bf16, old fp32
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["frozen_dtype"] == "bf16" and record["mixed_precision"] == "bf16"
    assert record["frozen_parameter_bytes"] == expected
    assert record["frozen_components"] == {"vae": "bf16", **{n: "bf16" for n in TEXT_ENCODERS
                                                            if getattr(fresh.pipe, n) is not None},
                                           "ref_copy": "bf16", "old_copy": "fp32"}


def test_off_switch_and_no_mixed_precision_keep_everything_fp32(tiny_model_dir, shapes_data, tmp_path,
                                                               fresh_accelerator):
    """frozen_dtype = "fp32" under bf16, and the default without mixed precision: nothing is cast, and the frozen
    bytes are the fp32 count, twice the bf16 run's for the same modules (the ref copy and the VAE / encoders)."""
    from soarbench.models import SD3Adapter

    fresh = SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=0)
    encoders = [getattr(fresh.pipe, n) for n in TEXT_ENCODERS if getattr(fresh.pipe, n) is not None]
    fp32_bytes = (_nbytes(fresh.pipe.vae, 4) + sum(_nbytes(m, 4) for m in encoders) + 2 * _nbytes(fresh.transformer, 4))
    for i, opts in enumerate(({"mixed_precision": "bf16", "frozen_dtype": "fp32"}, {"mixed_precision": "no"})):
        run = _run(_cfg(tiny_model_dir, shapes_data, NFT, **opts), tmp_path / f"r{i}")
        modules = [run.adapter.pipe.vae, run.roles.copies["ref"], run.roles.copies["old"], run.adapter.transformer]
        modules += [getattr(run.adapter.pipe, n) for n in TEXT_ENCODERS if getattr(run.adapter.pipe, n) is not None]
        assert set().union(*(_dtypes(m) for m in modules)) == {torch.float32}, opts
        record = json.loads((tmp_path / f"r{i}" / "run.json").read_text())
        assert record["frozen_dtype"] == "fp32" and record["frozen_parameter_bytes"] == fp32_bytes
        assert set(record["frozen_components"].values()) == {"fp32"}


def test_fp16_mixed_precision_keeps_frozen_fp32_and_refuses_bf16(tiny_model_dir, shapes_data, tmp_path,
                                                                 fresh_accelerator):
    from soarbench.harness.train import frozen_dtype

    assert frozen_dtype({"mixed_precision": "fp16", "frozen_dtype": "auto"}) == torch.float32
    assert frozen_dtype({"mixed_precision": "no", "frozen_dtype": "bf16"}) == torch.bfloat16
    with pytest.raises(UserError, match="frozen_dtype = 'bf16' with train.mixed_precision = 'fp16'") as e:
        train(_cfg(tiny_model_dir, shapes_data, mixed_precision="fp16", frozen_dtype="bf16"), tmp_path / "r",
              log=lambda m: None)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="train.frozen_dtype"):
        resolve_config(_cfg(tiny_model_dir, shapes_data, frozen_dtype="fp16"))


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_bf16_frozen_steps_track_the_fp32_frozen_steps(tiny_model_dir, shapes_data, tmp_path, fresh_accelerator):
    """Two optimizer steps of SFT (frozen VAE and text encoders) and of full-fine-tuning DiffusionNFT (plus the
    bf16 reference copy in its KL term) under bf16 autocast with frozen_dtype bf16, against frozen_dtype fp32 and
    against no mixed precision at all: the same draws, so the losses differ by rounding only. bf16 keeps 8
    significant bits (a relative rounding of at most 2^-9 = 0.2 % per value), and the loss averages many squared
    errors, so its error stays a fraction of that (0.08 % measured for SFT, 0.01 % for DiffusionNFT); 1 % is the
    bound: five times the rounding of a single value, and it still catches a mis-cast (fp16 overflow, a
    truncated timestep, latents left in bf16 through the loss), each of which moves these losses by far more."""
    for name, method in (("sft", None), ("nft", NFT)):
        runs = {}
        for mixed, frozen in (("bf16", "bf16"), ("bf16", "fp32"), ("no", "fp32")):
            out = tmp_path / f"{name}_{mixed}_{frozen}"
            train(_cfg(tiny_model_dir, shapes_data, method, steps=2, mixed_precision=mixed, frozen_dtype=frozen),
                  out, log=lambda m: None)
            runs[mixed, frozen] = _losses(out)
        cast = runs["bf16", "bf16"]
        assert all(torch.isfinite(torch.tensor(x)).all() for x in runs.values())
        assert cast != runs["bf16", "fp32"], name  # the cast took effect
        for other in (runs["bf16", "fp32"], runs["no", "fp32"]):
            for a, b in zip(cast, other):
                assert abs(a - b) <= 0.01 * abs(b), (name, runs)


def test_no_mixed_precision_is_bit_identical_to_an_explicit_fp32(tiny_model_dir, shapes_data, tmp_path,
                                                                 fresh_accelerator):
    """Without mixed precision the default casts nothing: the log equals frozen_dtype = "fp32"'s to the bit."""
    for frozen in ("auto", "fp32"):
        train(_cfg(tiny_model_dir, shapes_data, frozen_dtype=frozen), tmp_path / frozen, log=lambda m: None)
    assert _losses(tmp_path / "auto") == _losses(tmp_path / "fp32")


def test_bf16_reference_copy_outside_autocast(adapter):
    """The bf16 "ref" copy called without autocast: its inputs arrive in bf16, the timestep in fp32 (bf16 would
    round 937.5 to 936), and its velocity comes back in fp32 within bf16's rounding of the fp32 policy's."""
    roles = Roles(adapter, torch.bfloat16)
    roles.full(("transformer",))
    roles.add_role("ref")
    seen = {}

    def spy(module, args, kwargs):
        seen.update({k: kwargs[k].dtype for k in ("hidden_states", "timestep", "encoder_hidden_states")})
        seen["timestep_value"] = kwargs["timestep"].tolist()

    handle = roles.copies["ref"].register_forward_pre_hook(spy, with_kwargs=True)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, *adapter.latent_shape(32, 32), generator=g)
    text = adapter.encode_prompts(["a red circle", "a blue square"])
    sigma = torch.tensor([0.9375, 0.5])
    with torch.no_grad():
        v_ref = roles.velocity(z, sigma, text, role="ref")
        v_policy = roles.velocity(z, sigma, text, role="policy")
    handle.remove()
    assert seen == {"hidden_states": torch.bfloat16, "timestep": torch.float32,
                    "encoder_hidden_states": torch.bfloat16, "timestep_value": [937.5, 500.0]}
    assert v_ref.dtype == torch.float32 and v_policy.dtype == torch.float32
    rel = (v_ref - v_policy).norm() / v_policy.norm()
    assert 0 < rel < 0.05, rel


def test_copy_in_dtype_equals_a_cast_copy_and_leaves_the_source(adapter):
    source = adapter.transformer
    before = {k: v.clone() for k, v in source.state_dict().items()}
    copy = copy_in_dtype(source, torch.bfloat16)
    cast = {k: v.to(torch.bfloat16) for k, v in before.items()}
    assert copy.state_dict().keys() == cast.keys()
    assert all(torch.equal(copy.state_dict()[k], cast[k]) for k in cast)
    assert all(torch.equal(source.state_dict()[k], before[k]) and source.state_dict()[k].dtype == torch.float32
               for k in before)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(copy.parameters(), source.parameters()))


def test_vae_in_bf16_returns_fp32_latents_and_pixels(adapter):
    adapter.pipe.vae.to(torch.bfloat16)
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = adapter.posterior(px)
    assert mean.dtype == std.dtype == torch.float32
    assert adapter.encode_images(px, torch.Generator().manual_seed(0)).dtype == torch.float32
    pixels = adapter.decode(torch.randn(2, *adapter.latent_shape(32, 32)))
    assert pixels.dtype == torch.float32 and pixels.abs().max() <= 1


def test_text_encoders_leave_the_gpu_when_the_method_declares_it():
    """The decision is the method's declared fact, the cache's presence, and the run's other needs."""
    sft, soar = build_method("sft", {}), build_method("soar", {"trajectory_length": 2})
    grpo = build_method("flow_grpo", {"group_size": 2, "batch_size": 4, "num_steps": 3,
                                      "rewards": {"test_brightness": 1.0}})
    cached, empty, cfg = SimpleNamespace(holds_text_cache=True), SimpleNamespace(holds_text_cache=False), {"eval": {}}
    assert sft.needs_text_encoders_after_cache is False and soar.needs_text_encoders_after_cache is False
    assert grpo.needs_text_encoders_after_cache is True
    for method in (sft, soar):
        assert text_encoder_release(method, "cuda", cfg, cached, ("transformer",)).startswith("moved")
    assert text_encoder_release(grpo, "cuda", cfg, cached, ("transformer",)).startswith("kept: flow_grpo")
    assert "text cache" in text_encoder_release(sft, "cuda", cfg, empty, ("transformer",))
    assert "trained" in text_encoder_release(sft, "cuda", cfg, cached, ("transformer", "text_encoder"))
    assert "evaluation" in text_encoder_release(sft, "cuda", {"eval": {"benchmark": "x"}}, cached, ("transformer",))
    assert "CPU" in text_encoder_release(sft, "cpu", cfg, cached, ("transformer",))
