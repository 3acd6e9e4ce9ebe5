"""The GPU check: every figure the harness owes at scale, from one command on one H100/H200 (about 9 minutes).

    python benchmarks/perf/gpu_check.py --out runs/gpu_check                # synthetic SD3.5-Medium, random weights
    python benchmarks/perf/gpu_check.py --model /models/sd3.5-medium --out runs/gpu_check    # a real folder
    python benchmarks/perf/gpu_check.py --tiny --out /tmp/gc                # the same code paths, tiny model, CPU
    make gpu-check

Writes OUT/gpu_check.json (atomically) and prints a table. Sections:
  model       the folder used: a synthetic SD3.5-Medium (diffusers' real classes with SD3.5-Medium's config values:
              the MMDiT-X transformer, CLIP-L and CLIP-G, the 16-channel VAE; random weights, nothing downloaded),
              T5-XXL left out: the pipeline then feeds the transformer zeros of T5's shape, so the transformer's
              compute is the real model's and only T5's own encoding cost is missing
  train       harness SFT vs a bare diffusers loop (benchmarks/perf/train_step.py), SOAR, a Flow-GRPO epoch:
              seconds per step, MFU (forward FLOPs from torch.utils.flop_counter, x3 for forward + backward,
              against the card's bf16 dense peak), peak memory
  sweep       the bare loop at micro-batch 1, 4, 8, 16 with and without gradient checkpointing; the best MFU
  eval        images/s with bf16 weights at 512 px, 40 Euler steps, CFG 4.5 (latents to decoded images)
  frozen      train.frozen_dtype's gain: a full-fine-tuning Flow-GRPO run with its KL reference copy, built (not
              trained) under bf16 with the frozen modules in bf16 ("auto") and in fp32, each one's frozen modules and
              dtypes (run.json), their parameter bytes and the device memory the built run holds
  engines     DDP (1 process), DeepSpeed ZeRO-2, ZeRO-3, FSDP2 through `accelerate launch` with
              configs/accelerate/*.yaml: 3 steps, a checkpoint, a resume from it, an export diffusers loads;
              each ok / failed / skipped with the reason
Targets are printed beside the figures (harness/bare <= 1.10, SFT MFU >= 35 % at its best micro-batch, peak
memory within 1.1x the bare loop's, evaluation >= 1.4 images/s per H200); they are not pass/fail tests.
`--tiny` runs the tiny SD3 (soarbench.models.tiny) on the CPU: the test suite runs it so this script cannot rot.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import soarbench  # noqa: E402,F401  (torchvision fallback first)
import torch  # noqa: E402

import train_step  # noqa: E402

# bf16 dense tensor-core peaks (NVIDIA data sheets); the SXM parts, which the lent machines are
PEAKS_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
TARGETS = {"sft_over_bare": 1.10, "sft_mfu": 0.35, "peak_over_bare": 1.10, "eval_images_per_s": 1.4}
ENGINES = {"ddp": "ddp.yaml", "zero2": "zero2.yaml", "zero3": "zero3.yaml", "fsdp": "fsdp2.yaml"}

# SD3.5-Medium's component configs (stabilityai/stable-diffusion-3.5-medium, */config.json)
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35M_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
                 shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
SD35M_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768, hidden_act="quick_gelu")
SD35M_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu")


def build_sd35_medium(out_dir: Path, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline folder with SD3.5-Medium's architecture (without T5) and random weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from soarbench.clip_tokenizer import CLIP_VOCAB_SIZE, write_clip_tokenizer_files

    torch.manual_seed(seed)
    tok_dir = Path(out_dir) / "_tokenizer_src"
    write_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)

    def clip(cfg):
        return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77,
                                                          bos_token_id=49406, eos_token_id=49407,
                                                          pad_token_id=49407, **cfg))

    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=AutoencoderKL(**SD35M_VAE), text_encoder=clip(SD35M_CLIP_L), tokenizer=tokenizer,
        text_encoder_2=clip(SD35M_CLIP_G), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.bfloat16)  # stored in bf16: half the disk traffic of every load (the harness loads in fp32)
    pipe.save_pretrained(out_dir)
    shutil.rmtree(tok_dir)
    return Path(out_dir)


def card_peak(device: str) -> tuple[str, float | None]:
    if not device.startswith("cuda"):
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name()
    for key, peak in PEAKS_BF16.items():  # "H100 PCIe" before "H100"
        if key in name and not (key == "H100" and "PCIe" in name):
            return name, peak
    return name, None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    """CUDA: the allocator's peak since reset_peak; CPU: the process's resident high-water mark (monotonic)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def forward_flops(adapter, batch: int, latent_shape, dtype) -> int:
    """FLOPs of one transformer forward on `batch` samples, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    text = adapter.encode_prompts(["a photo of a red circle"] * batch)
    z = torch.zeros(batch, *latent_shape, device=adapter.device)
    autocast = torch.autocast(adapter.device.type, dtype=dtype, enabled=dtype is not None)
    with torch.no_grad(), autocast, FlopCounterMode(display=False) as counter:
        adapter.transformer(hidden_states=z, timestep=torch.full((batch,), 500.0, device=z.device),
                            encoder_hidden_states=text.tokens, pooled_projections=text.pooled, return_dict=False)
    return int(counter.get_total_flops())


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    return None if peak is None else flops_per_s / peak


def train_section(a, model: Path, data: Path, tmp: Path, peak: float | None) -> dict:
    """Harness SFT / SOAR / Flow-GRPO vs the bare loop; MFU from the counted forward FLOPs; peak memory."""
    from soarbench.models import SD3Adapter

    dtype = {"bf16": torch.bfloat16}.get(a.mixed_precision)
    args = SimpleNamespace(model=model, max_sequence_length=a.max_sequence_length, batch=a.batch, device=a.device,
                           device_resolved=a.device, mixed_precision=a.mixed_precision, threads=a.threads,
                           gradient_checkpointing=a.gradient_checkpointing, warmup=a.warmup, steps=a.steps)
    out: dict = {"batch": a.batch, "steps": a.steps, "warmup": a.warmup, "mixed_precision": a.mixed_precision,
                 "gradient_checkpointing": a.gradient_checkpointing, "resolution": a.resolution}
    adapter = SD3Adapter.from_pretrained(model, device=a.device, max_sequence_length=a.max_sequence_length)
    latent_shape = adapter.latent_shape(a.resolution, a.resolution)
    flops = forward_flops(adapter, a.batch, latent_shape, dtype)
    out["forward_flops_per_sample"] = flops / a.batch
    reset_peak(a.device)
    bare, _ = train_step.bare_step_time(args, latent_shape, adapter=adapter)
    out["bare"] = {"s_per_step": bare, "peak_memory_gib": peak_gib(a.device)}
    del adapter
    methods = {"sft": {"name": "sft"},
               "soar": {"name": "soar", "trajectory_length": a.trajectory_length},
               "flow_grpo": {"name": "flow_grpo", "group_size": 2, "batch_size": 2 * a.batch, "num_steps": a.grpo_steps,
                             "optimizer_steps_per_epoch": 2, "rewards": {"geneval": 1.0}, "lora": True,
                             "lora_r": 32, "lora_alpha": 64}}
    for name, method in methods.items():
        reset_peak(a.device)
        seconds, per_step = train_step.harness_step_time(method, args, data, tmp / f"train_{name}")
        # a backward costs twice its forward: one fwd_bwd = 3 forwards, plus the no-grad forwards (rollouts)
        fwd = 3 * per_step["fwd_bwd"] + per_step["no_grad_fwd"]
        rate = fwd * out["forward_flops_per_sample"] / seconds
        row = {"s_per_step": seconds, "budget_per_step": per_step, "tflops_per_s": rate / 1e12,
               "mfu": mfu(rate, peak), "peak_memory_gib": peak_gib(a.device)}
        if name == "flow_grpo":
            row["s_per_epoch"] = seconds * method["optimizer_steps_per_epoch"]
        record = json.loads((tmp / f"train_{name}" / "run.json").read_text())
        row.update(frozen_dtype=record["frozen_dtype"], frozen_parameter_gib=record["frozen_parameter_bytes"] / 2**30,
                   text_encoders=record["text_encoders"])
        out[name] = row
    out["bare"]["tflops_per_s"] = 3 * flops / bare / 1e12
    out["bare"]["mfu"] = mfu(3 * flops / bare, peak)
    out["sft_over_bare"] = out["sft"]["s_per_step"] / bare
    out["soar_over_sft"] = out["soar"]["s_per_step"] / out["sft"]["s_per_step"]
    out["peak_sft_over_bare"] = out["sft"]["peak_memory_gib"] / out["bare"]["peak_memory_gib"]
    return out


def sweep_section(a, model: Path, peak: float | None) -> dict:
    """The bare loop at each micro-batch, with and without gradient checkpointing, on one load of the model."""
    from soarbench.models import SD3Adapter

    dtype = {"bf16": torch.bfloat16}.get(a.mixed_precision)
    adapter = SD3Adapter.from_pretrained(model, device=a.device, max_sequence_length=a.max_sequence_length)
    latent_shape = adapter.latent_shape(a.resolution, a.resolution)
    per_sample = forward_flops(adapter, 1, latent_shape, dtype)
    rows = []
    for ckpt in (False, True):
        for b in a.sweep:
            args = SimpleNamespace(batch=b, device_resolved=a.device, mixed_precision=a.mixed_precision,
                                   gradient_checkpointing=ckpt, warmup=a.warmup, steps=a.steps)
            row = {"micro_batch": b, "gradient_checkpointing": ckpt}
            try:
                reset_peak(a.device)
                seconds, flops = train_step.bare_step_time(args, latent_shape, adapter=adapter)
                rate = 3 * flops * b / seconds
                row.update(status="ok", s_per_step=seconds, samples_per_s=b / seconds, tflops_per_s=rate / 1e12,
                           mfu=mfu(rate, peak), peak_memory_gib=peak_gib(a.device))
            except torch.cuda.OutOfMemoryError:
                row.update(status="oom")
                adapter.transformer.zero_grad(set_to_none=True)
            rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["samples_per_s"]) if ok else None
    return {"forward_flops_per_sample": per_sample, "rows": rows,
            "best": None if best is None else {k: best[k] for k in ("micro_batch", "gradient_checkpointing",
                                                                    "samples_per_s", "mfu")}}


def eval_section(a, model: Path) -> dict:
    """Images/s of the evaluation sampler: bf16 weights (fp32 on the CPU), Euler ODE with CFG, VAE decode."""
    from soarbench.models import SD3Adapter
    from soarbench.sampling.ode import euler_sample

    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    adapter = SD3Adapter.from_pretrained(model, device=a.device, dtype=dtype, max_sequence_length=a.max_sequence_length)
    text = adapter.encode_prompts(["a photo of a red circle and a blue square"] * a.eval_batch)
    shape = adapter.latent_shape(a.resolution, a.resolution)
    g = torch.Generator().manual_seed(0)

    def run():
        noise = torch.randn(a.eval_batch, *shape, generator=g).to(adapter.device)
        with torch.no_grad():
            z = euler_sample(adapter, text, noise, num_steps=a.eval_steps, guidance=a.guidance)
            adapter.decode(z.to(dtype))

    run()  # warm-up: kernels, allocator
    reset_peak(a.device)
    start = time.perf_counter()
    for _ in range(a.eval_repeats):
        run()
    train_step._sync(adapter.device)
    seconds = time.perf_counter() - start
    return {"weights": str(dtype).split(".")[-1], "resolution": a.resolution, "num_steps": a.eval_steps,
            "guidance": a.guidance, "batch": a.eval_batch, "images": a.eval_batch * a.eval_repeats,
            "images_per_s": a.eval_batch * a.eval_repeats / seconds, "peak_memory_gib": peak_gib(a.device)}


def _engine_skip(name: str, device: str) -> str | None:
    if name in ("zero2", "zero3"):
        try:
            import deepspeed  # noqa: F401
        except Exception as e:  # not installed, or a build that cannot import here
            return f"deepspeed cannot be imported ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if not device.startswith("cuda"):
            return "DeepSpeed needs a CUDA device"
    if name == "fsdp" and not device.startswith("cuda"):
        return "FSDP2 through accelerate needs a CUDA device (its CPU path is not supported)"
    return None


def _launch(name: str, device: str, cfg: Path, out: Path, port: int, resume: bool, timeout: float) -> None:
    if name == "ddp":  # accelerate refuses --multi_gpu (ddp.yaml) with one process: torchrun, as it would start
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(port)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--main_process_port",
               str(port), "--config_file", str(ROOT / "configs" / "accelerate" / ENGINES[name])]
    cmd += ["-m", "soarbench", "train", "--config", str(cfg), "--out", str(out)] + (["--resume"] if resume else [])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if not device.startswith("cuda"):
        env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=out.parent)
    if proc.returncode:
        tail = [x for x in proc.stderr.strip().splitlines() if x.strip()][-1:] or ["(no stderr)"]
        raise RuntimeError(f"{'resume' if resume else 'train'} exited {proc.returncode}: {tail[0][:300]}")


def engine_row(name: str, a, model: Path, data: Path, tmp: Path, port: int) -> dict:
    """3 steps (checkpoints at 2 and 3), the step-3 checkpoint removed, a resume from step 2, an export loaded."""
    from soarbench import config as C

    reason = _engine_skip(name, a.device)
    if reason is None and time.perf_counter() > a.deadline:
        reason = f"the check's time budget ({a.budget_s:.0f} s, --budget-s) was spent before this row"
    if reason:
        return {"engine": name, "status": "skipped", "reason": reason}
    work = tmp / f"engine_{name}"
    work.mkdir()
    mp = a.mixed_precision if a.device.startswith("cuda") else "no"
    cfg = {"model": {"path": str(model), "max_sequence_length": a.max_sequence_length}, "data": {"jsonl": str(data)},
           "method": {"name": "sft"},
           "train": {"seed": 0, "batch_size": a.engine_batch, "lr": 1e-5, "device": a.device.split(":")[0],
                     "mixed_precision": mp, "threads": 1 if not a.device.startswith("cuda") else 0,
                     "gradient_checkpointing": True, "checkpoint_every": 2},
           "budget": {"unit": "optimizer_steps", "amount": 3}, "log": {"tensorboard": False}}
    cfg_path = work / "train.toml"
    cfg_path.write_text(C.dumps_toml(cfg))
    run, t0 = work / "run", time.perf_counter()
    try:
        _launch(name, a.device, cfg_path, run, port, False, a.engine_timeout)
        steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
        if not steps:
            raise RuntimeError("no checkpoint written")
        last = run / "checkpoints" / steps[-1]
        shutil.rmtree(last)  # the resume must redo step 3 from step 2's checkpoint
        _launch(name, a.device, cfg_path, run, port, True, a.engine_timeout)
        resumed = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
        if resumed[-1] != 3:
            raise RuntimeError(f"the resumed run ended at step {resumed[-1]}, not 3")
        from diffusers import DiffusionPipeline

        from soarbench.export import export_pipeline

        export_pipeline(last, work / "export", dtype="bf16" if a.device.startswith("cuda") else "fp32")
        index = json.loads((work / "export" / "model_index.json").read_text())
        absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}  # no T5: say so
        pipe = DiffusionPipeline.from_pretrained(work / "export", **absent)
        loaded = type(pipe).__name__
        del pipe
        record = json.loads((run / "run.json").read_text())
        engine = {k: record.get(k) for k in ("engine", "processes", "mixed_precision", "device", "launcher")}
    except Exception as e:  # a failed engine is a row of the report, not the end of the check
        return {"engine": name, "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:400]}",
                "seconds": time.perf_counter() - t0}
    return {"engine": name, "status": "ok", "reason": f"3 steps, resumed from {steps[0]}, export loads as {loaded}",
            "seconds": time.perf_counter() - t0, "run_engine": engine}


def frozen_section(a, model: Path, data: Path, tmp: Path) -> dict:
    """The same full-fine-tuning Flow-GRPO run built twice under bf16 mixed precision, frozen_dtype "auto" (bf16)
    and "fp32": its frozen modules (VAE, text encoders, the KL reference's copy of the transformer) and the device
    memory held once everything is built, before any step (the gain is resident weights: activations and optimizer
    state do not change)."""
    import gc

    from soarbench.harness.train import Run, resolve_config

    rows = []
    for frozen in ("auto", "fp32"):
        gc.collect()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated() if a.device.startswith("cuda") else None
        cfg = {"model": {"path": str(model), "max_sequence_length": a.max_sequence_length}, "data": {"jsonl": str(data)},
               "method": {"name": "flow_grpo", "group_size": 2, "batch_size": 2 * a.batch, "num_steps": a.grpo_steps,
                          "rewards": {"geneval": 1.0}, "lora": False, "beta": 0.04, "ema": False,
                          "optimizer_steps_per_epoch": 1},
               "train": {"seed": 0, "batch_size": a.batch, "device": a.device, "mixed_precision": "bf16",
                         "frozen_dtype": frozen, "threads": a.threads},
               "budget": {"unit": "optimizer_steps", "amount": 1}, "log": {"tensorboard": False}}
        run = Run(resolve_config(cfg), tmp / f"frozen_{frozen}", False, lambda m: None, None)
        record = json.loads((tmp / f"frozen_{frozen}" / "run.json").read_text())
        held = None if before is None else (torch.cuda.memory_allocated() - before) / 2**30
        rows.append({"frozen_dtype_option": frozen, "frozen_dtype": record["frozen_dtype"],
                     "frozen_components": record["frozen_components"],
                     "frozen_parameter_gib": record["frozen_parameter_bytes"] / 2**30, "device_memory_gib": held})
        del run
    gc.collect()
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    bf16, fp32 = rows
    return {"mixed_precision": "bf16", "method": "flow_grpo, lora = false, beta = 0.04 (a reference copy)",
            "rows": rows, "frozen_saved_gib": fp32["frozen_parameter_gib"] - bf16["frozen_parameter_gib"],
            "device_memory_saved_gib": None if bf16["device_memory_gib"] is None
            else fp32["device_memory_gib"] - bf16["device_memory_gib"]}


def print_table(r: dict) -> None:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    t = r.get("train", {})
    print(f"model: {r['model']['source']}  ({r['model']['note']})")
    print(f"device: {r['device']}  bf16 peak: {r['peak_bf16_tflops'] or 'unknown'} TFLOP/s")
    if t:
        print(f"{'method':<10} {'s/step':>9} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9}")
        for k in ("bare", "sft", "soar", "flow_grpo"):
            x = t[k]
            frozen = f"  frozen {x['frozen_dtype']} ({x['frozen_parameter_gib']:.2f} GiB)" if "frozen_dtype" in x else ""
            print(f"{k:<10} {x['s_per_step']:>9.4f} {x['tflops_per_s']:>9.3f} {pct(x['mfu']):>7} "
                  f"{x['peak_memory_gib']:>9.2f}{frozen}")
        print(f"harness/bare {t['sft_over_bare']:.3f} (target <= {TARGETS['sft_over_bare']});  peak SFT/bare "
              f"{t['peak_sft_over_bare']:.2f} (target <= {TARGETS['peak_over_bare']});  SOAR/SFT "
              f"{t['soar_over_sft']:.2f};  Flow-GRPO epoch {t['flow_grpo']['s_per_epoch']:.3f} s")
    if "sweep" in r:
        print("micro-batch sweep (bare loop):")
        for x in r["sweep"]["rows"]:
            extra = (f"{x['samples_per_s']:.2f} samples/s  MFU {pct(x['mfu'])}  {x['peak_memory_gib']:.2f} GiB"
                     if x["status"] == "ok" else x["status"])
            print(f"  batch {x['micro_batch']:>3}  checkpointing {str(x['gradient_checkpointing']):<5}  {extra}")
        b = r["sweep"]["best"]
        if b:
            print(f"  best: batch {b['micro_batch']}, checkpointing {b['gradient_checkpointing']}, MFU "
                  f"{pct(b['mfu'])} (target >= {pct(TARGETS['sft_mfu'])})")
    if "eval" in r:
        e = r["eval"]
        print(f"eval: {e['images_per_s']:.3f} images/s ({e['weights']}, {e['resolution']} px, {e['num_steps']} "
              f"steps, CFG {e['guidance']}; target >= {TARGETS['eval_images_per_s']} per H200)")
    if "frozen" in r:
        f = r["frozen"]
        for x in f["rows"]:
            held = "n/a" if x["device_memory_gib"] is None else f"{x['device_memory_gib']:.2f} GiB"
            print(f"frozen_dtype {x['frozen_dtype_option']:<4} -> {x['frozen_dtype']}: frozen weights "
                  f"{x['frozen_parameter_gib']:.3f} GiB, device memory of the built run {held}")
        print(f"frozen in bf16 saves {f['frozen_saved_gib']:.3f} GiB of weights ({f['method']})")
    for row in r.get("engines", []):
        print(f"engine {row['engine']:<6} {row['status']:<8} {row['reason']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    p.add_argument("--model", default=None, help="a real SD3 folder or hub id (default: synthetic SD3.5-Medium)")
    p.add_argument("--tiny", action="store_true", help="tiny SD3 on the CPU: the code paths, no figures of worth")
    p.add_argument("--device", default="auto")
    p.add_argument("--sections", default="train,sweep,eval,frozen,engines")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="engine rows that would start after this many seconds are skipped (a lent GPU's time)")
    p.add_argument("--keep-model", action="store_true", help="keep the built (synthetic or tiny) folder under OUT/model")
    a = p.parse_args(argv)
    from soarbench.harness.engine import resolve_device

    a.device = "cpu" if a.tiny and a.device == "auto" else resolve_device(a.device)
    if a.tiny:
        a.update = dict(batch=2, steps=2, warmup=1, sweep=[1, 2], resolution=32, max_sequence_length=0,
                        mixed_precision="no", gradient_checkpointing=False, trajectory_length=2, grpo_steps=2,
                        eval_batch=2, eval_steps=2, eval_repeats=1, engine_batch=2, threads=1, engine_timeout=300)
    else:
        a.update = dict(batch=4, steps=8, warmup=2, sweep=[1, 4, 8, 16], resolution=512, max_sequence_length=256,
                        mixed_precision="bf16" if a.device.startswith("cuda") else "no", gradient_checkpointing=True,
                        trajectory_length=6, grpo_steps=10, eval_batch=8, eval_steps=40, eval_repeats=1,
                        engine_batch=2, threads=0, engine_timeout=240)
    for k, v in a.update.items():
        setattr(a, k, v)
    a.guidance = 4.5
    if a.threads:  # the harness sets train.threads; the bare loop and the sampler run under the same count
        torch.set_num_threads(a.threads)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    name, peak = card_peak(a.device)
    result: dict = {"device": name, "torch": torch.__version__, "peak_bf16_tflops": None if peak is None else peak / 1e12,
                    "targets": TARGETS, "tiny": a.tiny}
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    a.deadline = t_start + a.budget_s
    with tempfile.TemporaryDirectory(dir=a.out) as tmp:
        tmp = Path(tmp)
        if a.model:
            model, note = Path(a.model), "the given folder"
            from soarbench.hub import local_model_path

            model = Path(local_model_path(a.model))
        elif a.tiny:
            from soarbench.models.tiny import TinySD3Config, build_tiny_sd3

            model = build_tiny_sd3((a.out if a.keep_model else tmp) / "model", TinySD3Config())
            note = "tiny SD3, random weights"
        else:
            model = build_sd35_medium((a.out if a.keep_model else tmp) / "model")
            note = ("synthetic SD3.5-Medium: real architecture, random weights; no T5-XXL (its tokens are zeros of "
                    f"T5's shape, {a.max_sequence_length} tokens)")
        from soarbench.models import SD3Adapter

        probe = SD3Adapter.from_pretrained(model, max_sequence_length=a.max_sequence_length)
        params = sum(x.numel() for x in probe.transformer.parameters())
        # diffusers' SD3 attention runs torch's scaled_dot_product_attention (flash / memory-efficient kernels)
        attention = sorted({type(x).__name__ for x in probe.transformer.attn_processors.values()})
        del probe
        result["model"] = {"source": str(model) if a.model else "synthetic", "note": note,
                           "transformer_parameters": params, "attention_processors": attention}
        from soarbench.worlds.shapes import write_training_split

        data = write_training_split(tmp / "data", n_images=64, seed=1, size=a.resolution)
        if "train" in sections:
            result["train"] = train_section(a, model, data, tmp, peak)
        if "sweep" in sections:
            result["sweep"] = sweep_section(a, model, peak)
        if "eval" in sections:
            result["eval"] = eval_section(a, model)
        if "frozen" in sections:
            result["frozen"] = frozen_section(a, model, data, tmp)
        if "engines" in sections:
            result["engines"] = [engine_row(n, a, model, data, tmp, 29700 + i) for i, n in enumerate(ENGINES)]
    result["seconds"] = time.perf_counter() - t_start
    from soarbench.io import atomic_write_json

    atomic_write_json(a.out / "gpu_check.json", result)
    print_table(result)
    print(f"wrote {a.out / 'gpu_check.json'} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
