"""How well does a model know the unconditional (empty-prompt) velocity that classifier-free guidance extrapolates from?

    python benchmarks/shapes/uncond_check.py --model benchmarks/shapes/base
    python benchmarks/shapes/uncond_check.py --model runs/soar/checkpoints/step_000095 --n 512

On training pairs drawn exactly as the flow-matching loss draws them (z0 a VAE posterior sample, z1 ~ N(0, I),
timesteps logit-normal on SD3's shifted 1000-entry grid, z = (1 - sigma) z0 + sigma z1) it prints the velocity
error E||v - (z1 - z0)||^2 (per element, mean over samples, with its standard error) of

  cond     v(z, sigma, caption)                 (the SFT training loss)
  uncond   v(z, sigma, "")                      (the branch CFG subtracts)
  cfg      v_u + g (v_c - v_u), g = 4.5          (what the evaluation sampler integrates)
  zero     v = 0                                 (no model: E||z1 - z0||^2, the scale of the numbers)

overall and per third of the sigma range, and the ratios uncond/cond and cfg/cond. A model pretrained without
caption dropout never saw the empty prompt, so its unconditional error is near the zero baseline's: CFG then
extrapolates away from a meaningless velocity. Fixed seed: the same model and data give the same figures.
--data defaults to the post-training data of benchmarks/shapes/common.toml, written there when missing.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

import soarbench  # noqa: F401  (torchvision fallback before diffusers imports)
from soarbench import flow
from soarbench.harness.data import load_pixels, read_records
from soarbench.models.sd3 import SD3Adapter

DEFAULT_DATA = Path(".cache/shapes/train/train.jsonl")
COMMON_DATA = {"n_images": 4000, "seed": 1, "size": 32}  # benchmarks/shapes/common.toml [data.generate]
BRANCHES = ("cond", "uncond", "cfg", "zero")
UNCOND_TARGET = 1.5  # a base whose CFG works: the empty prompt's error at most 1.5x the caption's


def ensure_data(path: Path) -> Path:
    """--data as given, or the post-training data written there by the harness's generator (the default path is
    written again when its data was made for another split)."""
    if path == DEFAULT_DATA or not path.is_file():
        from soarbench.harness.data import ensure_generated

        ensure_generated({"jsonl": str(path), "generate": {"world": "shapes", "n_images": COMMON_DATA["n_images"],
                                                           "seed": COMMON_DATA["seed"],
                                                           "image_size": COMMON_DATA["size"]}})
    return path


@torch.no_grad()
def velocity_errors(adapter: SD3Adapter, records, n: int, seed: int = 0, guidance: float = 4.5,
                    batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Per-sample errors of each branch (name -> (n,) tensor) and the samples' sigmas ("sigma")."""
    sc = adapter.scheduler_config
    grid = flow.training_sigmas(float(sc.get("shift", 3.0)), int(sc.get("num_train_timesteps", 1000)))
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    null = adapter.null_embeddings()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (*BRANCHES, "sigma")}
    chosen = list(records[:n])
    for start in range(0, len(chosen), batch_size):
        part = chosen[start:start + batch_size]
        pixels = torch.stack([load_pixels(r, rng, random_flip=False) for r in part])
        mean, std = adapter.posterior(pixels)
        eps = torch.randn(mean.shape, generator=gen)
        z0 = adapter.to_model_latents(mean + std * eps.to(mean.device)).float()
        z1 = torch.randn(z0.shape, generator=gen).to(z0.device)
        sigma = grid[flow.grid_index(flow.sample_unshifted_t(len(part), "logit_normal", gen))].to(z0.device)
        z = flow.interpolate(z0, z1, sigma)
        target = z1 - z0
        v_cond = adapter.velocity(z, sigma, adapter.encode_prompts([r.caption for r in part])).float()
        v_uncond = adapter.velocity(z, sigma, null.repeat(len(part))).float()
        branches = {"cond": v_cond, "uncond": v_uncond, "cfg": v_uncond + guidance * (v_cond - v_uncond),
                    "zero": torch.zeros_like(target)}
        for name, v in branches.items():
            out[name].append(flow.per_sample_mse(v, target).cpu())
        out["sigma"].append(sigma.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _mean_and_se(x: torch.Tensor) -> tuple[float, float]:
    se = x.std().item() / len(x) ** 0.5 if len(x) > 1 else 0.0
    return x.mean().item(), se


def report(errors: dict[str, torch.Tensor], guidance: float) -> str:
    sigma = errors["sigma"]
    edges = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0 + 1e-9])
    lines = [f"velocity error E||v - (z1 - z0)||^2 per element, {len(sigma)} samples, logit-normal sigmas "
             f"(cfg: g = {guidance:g})",
             f"{'branch':<8}{'all':>18}" + "".join(f"{f'sigma {lo:.2f}-{min(hi, 1):.2f}':>18}"
                                                     for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()))]
    bins = [(sigma >= lo) & (sigma < hi) for lo, hi in zip(edges[:-1], edges[1:])]
    for name in BRANCHES:
        cells = []
        for mask in [torch.ones_like(sigma, dtype=torch.bool), *bins]:
            if mask.sum() == 0:
                cells.append(f"{'-':>18}")
                continue
            m, se = _mean_and_se(errors[name][mask])
            cells.append(f"{m:>10.4f} ± {se:<6.4f}")
        lines.append(f"{name:<8}" + "".join(cells))
    counts = "".join(f"{int(mask.sum()):>18}" for mask in bins)
    lines.append(f"{'samples':<8}{len(sigma):>18}{counts}")
    cond = errors["cond"].mean().item()
    lines.append(f"ratio uncond/cond = {errors['uncond'].mean().item() / cond:.3f}   "
                 f"cfg/cond = {errors['cfg'].mean().item() / cond:.3f}   "
                 f"uncond/zero = {errors['uncond'].mean().item() / errors['zero'].mean().item():.3f}")
    ratio = errors["uncond"].mean().item() / cond
    verdict = "within" if ratio <= UNCOND_TARGET else "NOT within"
    lines.append(f"unconditional error {verdict} {UNCOND_TARGET:g}x the conditional one (ratio {ratio:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="benchmarks/shapes/base", help="base or checkpoint folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HY-SOAR JSONL (default: %(default)s)")
    parser.add_argument("--n", type=int, default=512, help="samples: the first N lines of --data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    records = read_records(ensure_data(args.data))
    adapter = SD3Adapter.from_pretrained(args.model, device=args.device)
    errors = velocity_errors(adapter, records, min(args.n, len(records)), args.seed, args.guidance,
                             args.batch_size)
    print(f"model {args.model}, data {args.data}, seed {args.seed}")
    print(report(errors, args.guidance))


if __name__ == "__main__":
    main()
