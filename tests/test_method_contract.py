"""The method contract: meter == plan for every registered method, a method from outside the package trains under
the loop, every run writes TensorBoard events, and checkpoints load in diffusers' own pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from soarbench.harness.train import train
from soarbench.methods import METHODS, build_method
from soarbench.methods.base import LossOutput, MethodBase, Micro, RunShape, log_pair
from soarbench.cost import UnitCost

import reward_plugins  # noqa: F401  (the test rewards test_brightness and test_embed)
from micro_runs import MICRO_RUNS

BATCH = 2


def _cfg(model_dir, data, name, units=2, **method):
    """A run of `units` units of work, and each unit's planned cost (unit_plan: a first phase may differ)."""
    options = {**MICRO_RUNS.get(name, {}), **method}  # toy_shrink (defined below) has no options
    built = build_method(name, dict(options))
    plans = [built.unit_plan(RunShape(1, 1, BATCH), u) for u in range(units)]
    return {"model": {"path": str(model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(data)},
            "method": {"name": name, **options}, "train": {"seed": 2, "batch_size": BATCH, "lr": 1e-3, "threads": 2},
            "budget": {"unit": "optimizer_steps", "amount": sum(p.optimizer_steps for p in plans)}}, plans


def _log(run):
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", METHODS.names())
def test_meter_equals_plan(name, tiny_model_dir, shapes_data, tmp_path):
    assert name in MICRO_RUNS, f"method '{name}' has no micro run in this test"
    cfg, plans = _cfg(tiny_model_dir, shapes_data, name)
    train(cfg, tmp_path / "r", log=lambda m: None)
    spent = _log(tmp_path / "r")[-1]["budget"]
    expected = {k: sum(p.counted()[k] for p in plans) for k in plans[0].counted()}
    assert {k: spent[k] for k in expected} == expected
    assert 1 <= spent["unique_prompts"] <= sum(p.unique_prompts for p in plans)


class ToyShrink(MethodBase):
    """A method written outside soarbench: pull the velocity towards zero on noisy data latents."""

    name = "toy_shrink"
    source = "images"

    def plan(self, shape: RunShape) -> UnitCost:
        return UnitCost(fwd_bwd=shape.global_batch, micro_batches=shape.accumulation,
                        samples_per_step=shape.global_batch)

    def updates(self, ctx, batches):
        yield [Micro(b, float(len(b.prompts))) for b in batches]

    def loss(self, ctx, micro: Micro) -> LossOutput:
        b = micro.data
        noise = ctx.randn(b.z0.shape[1:], b.ids, "toy")
        sigma = torch.full((len(b.ids),), 0.5, device=ctx.device)
        v = ctx.velocity(0.5 * b.z0 + 0.5 * noise, sigma, b.text)
        per_sample = v.float().pow(2).flatten(1).mean(1)
        return LossOutput(per_sample.sum(), {"speed": log_pair(per_sample.sum(), len(per_sample))})


METHODS.add("toy_shrink", f"{__name__}:ToyShrink")


def test_a_method_registered_from_outside_trains_under_the_loop(tiny_model_dir, shapes_data, tmp_path):
    from soarbench.models import SD3Adapter

    cfg, _ = _cfg(tiny_model_dir, shapes_data, "toy_shrink", units=3)
    train(cfg, tmp_path / "r", log=lambda m: None)
    log = _log(tmp_path / "r")
    assert [r["step"] for r in log] == [1, 2, 3] and log[-1]["budget"]["fwd_bwd"] == 3 * BATCH
    assert log[-1]["speed"] < log[0]["speed"]  # it learnt what it was asked to
    before = SD3Adapter.from_pretrained(tiny_model_dir).transformer.state_dict()
    after = SD3Adapter.from_pretrained(tmp_path / "r" / "checkpoints" / "step_000003").transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert list((tmp_path / "r" / "tb").glob("events.out.tfevents.*"))  # TensorBoard, by default


def test_full_finetune_checkpoint_loads_in_diffusers_pipeline(tiny_model_dir, shapes_data, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from soarbench.models import SD3Adapter

    cfg, _ = _cfg(tiny_model_dir, shapes_data, "sft")
    train(cfg, tmp_path / "r", log=lambda m: None)
    ckpt = tmp_path / "r" / "checkpoints" / "step_000002"
    transformer = SD3Transformer2DModel.from_pretrained(ckpt / "transformer")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, transformer=transformer, text_encoder_3=None,
                                                    tokenizer_3=None)
    ours = SD3Adapter.from_pretrained(ckpt).transformer.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in pipe.transformer.state_dict().items())
    out = pipe("a photo of a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
               max_sequence_length=16)
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_lora_checkpoint_loads_with_load_lora_weights(tiny_model_dir, shapes_data, tmp_path):
    """Flow-GRPO's checkpoint: the LoRA in diffusers' layout equals the merged transformer it also saves."""
    from diffusers import StableDiffusion3Pipeline

    from soarbench.models import SD3Adapter

    cfg, _ = _cfg(tiny_model_dir, shapes_data, "flow_grpo", units=1)
    cfg["train"]["lr"] = 3e-2  # a visible LoRA
    train(cfg, tmp_path / "r", log=lambda m: None)
    ckpt = tmp_path / "r" / "checkpoints" / "step_000002"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, text_encoder_3=None, tokenizer_3=None)
    base_out = _forward(pipe.transformer)
    pipe.load_lora_weights(ckpt / "lora")
    merged = SD3Adapter.from_pretrained(ckpt).transformer
    with_lora, ours = _forward(pipe.transformer), _forward(merged)
    assert torch.allclose(with_lora, ours, atol=1e-5)
    assert not torch.allclose(with_lora, base_out, atol=1e-5)  # the LoRA changed something


def _forward(transformer):
    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    z = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    text = torch.randn(2, 5, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=z, timestep=torch.tensor([500.0, 250.0]), encoder_hidden_states=text,
                           pooled_projections=pooled, return_dict=False)[0]


def test_runs_of_one_process_may_differ_in_precision(tiny_model_dir, shapes_data, tmp_path):
    """`soarbench run` trains its runs in one process; each run's engine takes its own mixed precision."""
    for i, precision in enumerate(("bf16", "no")):
        cfg, _ = _cfg(tiny_model_dir, shapes_data, "sft", units=1)
        cfg["train"]["mixed_precision"] = precision
        train(cfg, tmp_path / f"r{i}", log=lambda m: None)
        assert json.loads((tmp_path / f"r{i}" / "run.json").read_text())["mixed_precision"] == precision
