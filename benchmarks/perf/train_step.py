"""The harness's training-step time against a bare diffusers loop of the same model and batch, and SOAR's step
against SFT's next to the ratio the budget counts. All figures come from one run of this script.

    python benchmarks/perf/train_step.py                                    # the shapes base, this CPU
    python benchmarks/perf/train_step.py --model /models/sd3.5-medium --device cuda --mixed-precision bf16 \
        --batch 4 --resolution 512 --steps 20 --json runs/perf/train_step.json

Prints per method the seconds per optimizer step (training time only, from the run's own wall clock), the bare
loop's (forward + flow-matching loss + backward + AdamW on the same transformer, batch and precision), and:
  harness SFT / bare loop      (target <= 1.10: the harness adds bookkeeping, not work)
  SOAR / SFT, measured          beside  SOAR / SFT as the budget counts it (fwd_bwd_equiv per step)
On CUDA it also prints the model FLOPs utilisation of each against the H100/H200 bf16 dense peak (989 TFLOP/s),
with the forward FLOPs counted by torch.utils.flop_counter (a backward counts twice a forward).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import soarbench  # noqa: E402,F401  (torchvision fallback first)
import torch  # noqa: E402

PEAK_BF16 = 989e12


def harness_step_time(method: dict, args, data: Path, out: Path) -> tuple[float, dict]:
    """Seconds per optimizer step of `soarbench train` after `--warmup` steps, and its budget per step."""
    from soarbench.harness.train import train

    cfg = {"model": {"path": str(args.model), "max_sequence_length": args.max_sequence_length},
           "data": {"jsonl": str(data)}, "method": method,
           "train": {"seed": 0, "batch_size": args.batch, "lr": 1e-5, "device": args.device,
                     "mixed_precision": args.mixed_precision, "threads": args.threads,
                     "gradient_checkpointing": args.gradient_checkpointing},
           "budget": {"unit": "optimizer_steps", "amount": args.warmup + args.steps},
           "log": {"tensorboard": False}}
    train(cfg, out, log=lambda m: None)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    t0, t1 = rows[args.warmup - 1]["budget"]["wall_s"], rows[-1]["budget"]["wall_s"]
    b0, b1 = rows[args.warmup - 1]["budget"], rows[-1]["budget"]
    per_step = {k: (b1[k] - b0[k]) / args.steps for k in ("fwd_bwd", "no_grad_fwd", "fwd_bwd_equiv")}
    return (t1 - t0) / args.steps, per_step


def bare_step_time(args, latent_shape, adapter=None) -> tuple[float, float]:
    """Seconds per step of a plain fwd+bwd+AdamW loop on the model's transformer; and its forward FLOPs.

    `adapter`: an already loaded model to reuse (gpu_check.py sweeps micro-batches on one load); its transformer
    is trained in place."""
    from soarbench.models import SD3Adapter

    if adapter is None:
        adapter = SD3Adapter.from_pretrained(args.model, device=args.device_resolved,
                                             max_sequence_length=args.max_sequence_length)
    net = adapter.transformer.requires_grad_(True).train()
    if args.gradient_checkpointing:
        net.enable_gradient_checkpointing()
    else:
        net.disable_gradient_checkpointing()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, fused=args.device_resolved.startswith("cuda"))
    text = adapter.encode_prompts(["a photo of a red circle"] * args.batch)
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(args.batch, *latent_shape, generator=g).to(adapter.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    autocast = torch.autocast(adapter.device.type, dtype=dtype, enabled=dtype is not None)

    def step():
        z1 = torch.randn_like(z0)
        sigma = torch.rand(args.batch, device=z0.device)
        s = sigma.reshape(-1, 1, 1, 1)
        with autocast:
            v = net(hidden_states=(1 - s) * z0 + s * z1, timestep=sigma * 1000, encoder_hidden_states=text.tokens,
                    pooled_projections=text.pooled, return_dict=False)[0]
        loss = (v.float() - (z1 - z0)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(adapter.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(adapter.device)
    seconds = (time.perf_counter() - start) / args.steps
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), autocast, FlopCounterMode(display=False) as counter:
        net(hidden_states=z0, timestep=torch.full((args.batch,), 500.0, device=z0.device),
            encoder_hidden_states=text.tokens, pooled_projections=text.pooled, return_dict=False)
    return seconds, counter.get_total_flops() / args.batch


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "benchmarks" / "shapes" / "base")
    p.add_argument("--data", type=Path, default=None, help="HY-SOAR JSONL (default: a shapes training split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=0, help="image size of the bare loop (default: the VAE's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trajectory-length", type=int, default=6)
    p.add_argument("--max-sequence-length", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from soarbench.harness.engine import resolve_device

    args.device_resolved = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            from soarbench.worlds.shapes import write_training_split

            data = write_training_split(tmp / "data", n_images=max(256, 4 * args.batch), seed=1, size=32)
        from soarbench.models import SD3Adapter

        probe = SD3Adapter.from_pretrained(args.model, max_sequence_length=args.max_sequence_length)
        size = args.resolution or int(probe.vae.config.sample_size)
        latent_shape = probe.latent_shape(size, size)
        del probe
        sft, sft_budget = harness_step_time({"name": "sft"}, args, data, tmp / "sft")
        soar, soar_budget = harness_step_time({"name": "soar", "trajectory_length": args.trajectory_length}, args,
                                              data, tmp / "soar")
        bare, flops = bare_step_time(args, latent_shape)
    counted = soar_budget["fwd_bwd_equiv"] / sft_budget["fwd_bwd_equiv"]
    result = {"model": str(args.model), "device": args.device_resolved, "mixed_precision": args.mixed_precision,
              "batch": args.batch, "steps": args.steps, "sft_s_per_step": sft, "soar_s_per_step": soar,
              "bare_s_per_step": bare, "sft_over_bare": sft / bare, "soar_over_sft_measured": soar / sft,
              "soar_over_sft_counted": counted, "forward_flops_per_sample": flops}
    print(f"harness SFT   {sft:.4f} s/step   bare diffusers loop {bare:.4f} s/step   ratio {sft / bare:.3f} "
          f"(target <= 1.10)")
    print(f"harness SOAR  {soar:.4f} s/step   SOAR / SFT measured {soar / sft:.2f}   as the budget counts it "
          f"{counted:.2f} (fwd_bwd_equiv per step)")
    if args.device_resolved.startswith("cuda"):
        for name, seconds, passes in (("bare", bare, 1.0), ("SFT", sft, 1.0)):
            mfu = 3 * flops * args.batch * passes / seconds / PEAK_BF16
            result[f"mfu_{name.lower()}"] = mfu
            print(f"MFU {name}: {100 * mfu:.1f}% of {PEAK_BF16 / 1e12:.0f} TFLOP/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
