"""benchmarks/perf/gpu_check.py --tiny: the GPU check's code paths on the CPU, so the script a lent GPU runs cannot
rot; and train.compile = true trains as the eager run does."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perf" / "gpu_check.py"), "--tiny", "--out",
                           str(out), "--keep-model"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "gpu_check.json").read_text()), proc.stdout


def test_every_section_with_sane_values(check):
    out, r, stdout = check
    t = r["train"]
    for name in ("bare", "sft", "soar", "flow_grpo"):
        assert t[name]["s_per_step"] > 0 and t[name]["peak_memory_gib"] > 0, name
        assert t[name]["mfu"] is None  # no bf16 peak is claimed for a CPU
    assert t["sft_over_bare"] == pytest.approx(t["sft"]["s_per_step"] / t["bare"]["s_per_step"])
    assert t["soar_over_sft"] == pytest.approx(t["soar"]["s_per_step"] / t["sft"]["s_per_step"])
    assert t["flow_grpo"]["s_per_epoch"] == pytest.approx(2 * t["flow_grpo"]["s_per_step"])
    # SFT's step is one fwd_bwd per sample; SOAR's is more (its trajectory), a Flow-GRPO step also samples
    assert t["sft"]["budget_per_step"]["fwd_bwd"] == t["batch"]
    assert t["soar"]["budget_per_step"]["fwd_bwd_equiv"] > t["sft"]["budget_per_step"]["fwd_bwd_equiv"]
    assert t["flow_grpo"]["budget_per_step"]["no_grad_fwd"] > 0
    assert t["bare"]["tflops_per_s"] == pytest.approx(
        3 * t["forward_flops_per_sample"] * t["batch"] / t["bare"]["s_per_step"] / 1e12)
    sweep = r["sweep"]
    assert [(x["micro_batch"], x["gradient_checkpointing"]) for x in sweep["rows"]] == [
        (1, False), (2, False), (1, True), (2, True)]
    assert all(x["status"] == "ok" and x["samples_per_s"] > 0 for x in sweep["rows"])
    assert sweep["best"]["samples_per_s"] == max(x["samples_per_s"] for x in sweep["rows"])
    e = r["eval"]
    assert e["images_per_s"] > 0 and e["images"] == 2 and e["guidance"] == 4.5
    rows = {x["engine"]: x for x in r["engines"]}
    assert set(rows) == {"ddp", "zero2", "zero3", "fsdp"}
    assert all(x["status"] in ("ok", "failed", "skipped") and x["reason"] for x in rows.values())
    # DDP with one process went through torchrun and gloo: accelerate's multi-CPU engine, resumed and exported
    assert rows["ddp"]["status"] == "ok", rows["ddp"]["reason"]
    assert rows["ddp"]["run_engine"]["engine"] == "multi_cpu" and rows["ddp"]["run_engine"]["processes"] == 1
    try:
        import deepspeed  # noqa: F401
        has_deepspeed = True
    except Exception:
        has_deepspeed = False
    for zero in ("zero2", "zero3"):
        assert rows[zero]["status"] == "skipped"
        assert ("CUDA" if has_deepspeed else "deepspeed") in rows[zero]["reason"]
    assert rows["fsdp"]["status"] == "skipped" and "CUDA" in rows["fsdp"]["reason"]
    assert "JointAttnProcessor2_0" in r["model"]["attention_processors"]  # torch SDPA
    # the harness rows say how their frozen modules were held: fp32 without mixed precision (the tiny run's)
    assert all(t[k]["frozen_dtype"] == "fp32" and t[k]["frozen_parameter_gib"] > 0 for k in ("sft", "soar", "flow_grpo"))
    assert t["sft"]["text_encoders"].startswith("kept") and "encodes prompts" in t["flow_grpo"]["text_encoders"]
    for word in ("harness/bare", "micro-batch sweep", "images/s", "engine fsdp", "target", "frozen in bf16 saves"):
        assert word in stdout


def test_frozen_section_halves_the_frozen_weights(check):
    """The frozen section: bf16 ("auto" under bf16) holds the VAE, the text encoders and the reference copy in
    2 bytes a weight, "fp32" in 4; both against the parameters counted here in the model folder."""
    from soarbench.models import SD3Adapter

    out, r, _ = check
    f = r["frozen"]
    bf16, fp32 = f["rows"]
    assert (bf16["frozen_dtype_option"], bf16["frozen_dtype"], fp32["frozen_dtype"]) == ("auto", "bf16", "fp32")
    assert set(bf16["frozen_components"].values()) == {"bf16"} and set(fp32["frozen_components"].values()) == {"fp32"}
    assert "ref_copy" in bf16["frozen_components"] and "vae" in bf16["frozen_components"]
    adapter = SD3Adapter.from_pretrained(out / "model", max_sequence_length=0)
    modules = [adapter.pipe.vae, adapter.transformer] + [getattr(adapter.pipe, n) for n in
                                                         ("text_encoder", "text_encoder_2", "text_encoder_3")
                                                         if getattr(adapter.pipe, n) is not None]
    weights = sum(p.numel() for m in modules for p in m.parameters())
    assert fp32["frozen_parameter_gib"] == pytest.approx(4 * weights / 2**30)
    assert bf16["frozen_parameter_gib"] == pytest.approx(2 * weights / 2**30)
    assert f["frozen_saved_gib"] == pytest.approx(2 * weights / 2**30)
    assert bf16["device_memory_gib"] is None and f["device_memory_saved_gib"] is None  # no device memory on a CPU


def test_spent_budget_skips_the_engine_rows(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perf" / "gpu_check.py"), "--tiny", "--out",
                           str(tmp_path), "--sections", "engines", "--budget-s", "0"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["engines"]
    assert rows[0]["engine"] == "ddp" and rows[0]["status"] == "skipped" and "--budget-s" in rows[0]["reason"]
    assert not list(tmp_path.glob("*/engine_ddp"))


def test_flop_count_equals_torch_flop_counter(check):
    """The FLOPs behind every MFU are torch.utils.flop_counter's on the same transformer call."""
    from torch.utils.flop_counter import FlopCounterMode

    from soarbench.models import SD3Adapter

    out, r, _ = check
    adapter = SD3Adapter.from_pretrained(out / "model", max_sequence_length=0)
    text = adapter.encode_prompts(["a photo of a red circle"] * 3)
    z = torch.randn(3, *adapter.latent_shape(32, 32))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.transformer(hidden_states=z, timestep=torch.full((3,), 10.0), encoder_hidden_states=text.tokens,
                            pooled_projections=text.pooled, return_dict=False)
    per_sample = counter.get_total_flops() / 3
    assert r["sweep"]["forward_flops_per_sample"] == per_sample
    assert r["train"]["forward_flops_per_sample"] == per_sample
    # independent floor: the joint blocks' q/k/v/out and MLP matmuls alone over the 64 image tokens (16x16 / 2^2)
    cfg = adapter.transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    assert per_sample > cfg.num_layers * 64 * 2 * (4 * width * width + 2 * 4 * width * width)


def test_compile_trains_as_eager(tiny_model_dir, shapes_data, tmp_path):
    """train.compile = true: 2 SFT steps through torch.compile give the eager run's weights (float tolerance)."""
    from soarbench.harness.train import train

    def run(compile_, out):
        cfg = {"model": {"path": str(tiny_model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(shapes_data)},
               "method": {"name": "sft"},
               "train": {"seed": 3, "batch_size": 2, "lr": 1e-3, "threads": 2, "compile": compile_},
               "budget": {"unit": "optimizer_steps", "amount": 2}, "log": {"tensorboard": False}}
        train(cfg, out, log=lambda m: None)
        from soarbench.models import SD3Adapter

        ckpt = sorted((out / "checkpoints").iterdir())[-1]
        losses = [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]
        return SD3Adapter.from_pretrained(ckpt).transformer.state_dict(), losses

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, eager_loss = run(False, tmp_path / "eager")
    assert counters["stats"]["unique_graphs"] == 0
    compiled, compiled_loss = run(True, tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did capture the transformer (no silent eager run)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4, abs=1e-6)
    for k, v in eager.items():
        torch.testing.assert_close(compiled[k], v, rtol=1e-4, atol=1e-5)
    from soarbench.models import SD3Adapter

    base = SD3Adapter.from_pretrained(tiny_model_dir).transformer.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in eager.items())  # the steps trained: not both untouched


def test_synthetic_sd35_medium_has_the_published_sizes():
    """The synthetic folder's configs give SD3.5-Medium's parameter counts (built on the meta device: no memory):
    MMDiT-X 2.243 B (the figure the last H200 measurement reported), CLIP-L 123.7 M, CLIP-G 694.7 M."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "perf"))
    import gpu_check as g
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        t = SD3Transformer2DModel(**g.SD35M_TRANSFORMER)
        vae = AutoencoderKL(**g.SD35M_VAE)
        clip_l, clip_g = (CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **c))
                          for c in (g.SD35M_CLIP_L, g.SD35M_CLIP_G))
    assert round(count(t) / 1e9, 3) == 2.243
    assert round(count(clip_l) / 1e6, 1) == 123.7 and round(count(clip_g) / 1e6, 1) == 694.7
    assert 80e6 < count(vae) < 90e6 and vae.config.latent_channels == t.config.in_channels == 16
