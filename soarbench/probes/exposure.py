"""The exposure-bias probe: how far the model's own sampler lands from the data when started ON the data's path.

    soarbench probe --model benchmarks/shapes/base --data data/heldout/train.jsonl --out probes/base
    soarbench probe --model runs/soar/checkpoints/step_000095 --data data/heldout/train.jsonl --out probes/soar

    from soarbench.probes.exposure import run_probe
    summary = run_probe("benchmarks/shapes/base", "data/heldout/train.jsonl", "probes/base", n=64)
    compare_probes(base_summary, soar_summary)   # per row: paired MSE difference, its 95% interval and MDD

What is measured. A flow model is trained only on on-trajectory states z_s = (1 - s) z0 + s z1 (SD3 convention:
z0 a clean latent, z1 ~ N(0, I) noise, s = 1 is pure noise). At sampling time it is fed its own states instead,
which drift off that path; the mismatch is exposure bias, and SOAR ("SOAR: Self-Correction for Optimal Alignment
and Refinement in Diffusion Models", arXiv 2604.12617; code: github.com/Tencent-Hunyuan/HY-SOAR) trains on
states one CFG rollout step off the path precisely to reduce it. The probe isolates it: for held-out pairs
(z0 = the VAE posterior MEAN of an image, z1 = noise drawn from the pair's own seeded generator) and each
starting sigma s, it places the model exactly on the path at z_s, runs the evaluation sampler from there (the
Euler ODE on the eval's 40-step sigma grid restricted to sigma < s, with CFG g, and again with g = 1), and
measures where it lands:

* MSE to z0, per element, mean and standard deviation over pairs (and every pair's value, so two models probed
  on the same data and seed can be compared pair by pair);
* when the data lines carry GenEval rows (the shapes world's do), the GenEval accuracy of the decoded results,
  scored by the rules engine through the metric registry, beside the accuracy of decode(z0) itself (the
  ceiling that the VAE allows).

Starting at small s, the model only has to finish an image it is handed: errors there are its own on-path
errors. Starting at larger s, the model runs longer on its own states, so the error also contains everything
that compounds off the path. A method that reduces exposure bias should lower the error (and raise the
accuracy) most where the model runs longest on its own states. s = 1 is ordinary sampling from the pair's noise
(the same latents `euler_sample` gives for that noise); there the reference z0 is only one of many images the
prompt allows, so that row measures fidelity to one pair, not quality.

Held-out data. Use images the model never trained on, from the training distribution: for the shapes world,
`soarbench data shapes --out data/heldout --seed 2 --n-images 256` (the base was pretrained on seed 7, the
post-training runs use seed 1). The first n usable lines are the pairs (the shapes world cycles through the
GenEval tasks, so any prefix is balanced); the pair on data line position i draws its noise from
`pair_noise(seed, i, shape)`, so the numbers do not depend on batching, device count or n.

probe.json: schema, model, data (file, sha256, the pairs' file:line), seed, n_pairs, sigmas, guidance,
num_steps, rows (one per guidance x sigma: euler_steps, mse_mean, mse_std, mse_sem, per_pair_mse, geneval,
geneval_scores), reference (GenEval of decode(z0)), seconds, provenance.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from soarbench import provenance
from soarbench.errors import UserError
from soarbench.evaluate import initial_noise, sample_seed, to_pil
from soarbench.harness.data import Record, load_pixels, read_records
from soarbench.io import atomic_write_json, sha256_file
from soarbench.sampling.ode import cfg_velocity, sampling_sigmas

SCHEMA = "soarbench.probe.exposure/1"
DEFAULT_SIGMAS = (1.0, 0.8, 0.6, 0.4, 0.2)
DEFAULT_GUIDANCE = 4.5  # the evaluation protocol's CFG scale
DEFAULT_NUM_STEPS = 40  # the evaluation protocol's Euler steps
DEFAULT_N = 64
_GRID_TOLERANCE = 1e-6  # a starting sigma this close to a grid sigma starts AT that grid point


# ------------------------------------------------------------------------------------------ small helpers

def pair_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise z1 of the pair on usable data line position `index` (0-based), on the CPU."""
    return initial_noise(sample_seed(seed, index, 0), tuple(shape))


def start_grid(eval_sigmas: torch.Tensor, start: float) -> torch.Tensor:
    """`start`, then the evaluation grid's sigmas below it, down to the grid's final 0."""
    below = eval_sigmas[eval_sigmas < start - _GRID_TOLERANCE]
    return torch.cat([torch.tensor([float(start)], dtype=eval_sigmas.dtype), below])


@torch.no_grad()
def integrate_from(adapter, z: torch.Tensor, grid: torch.Tensor, text, null, guidance: float) -> torch.Tensor:
    """Euler steps of dz/dsigma = v_cfg along `grid` (the arithmetic of `ode.euler_sample`)."""
    grid = grid.to(z.device)
    z = z.float()
    for s0, s1 in zip(grid[:-1], grid[1:]):
        v = cfg_velocity(adapter.velocity, z, s0.reshape(1), text, null, guidance)
        z = z + (s1 - s0) * v
    return z


def parse_sigmas(text: str) -> list[float]:
    """'1,0.8,0.6' -> [1.0, 0.8, 0.6]; a UserError naming the bad entry."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(float(part))
        except ValueError:
            raise UserError(f"--sigmas: {part!r} is not a number; expected comma-separated starting sigmas in "
                            "(0, 1], e.g. 1,0.8,0.6,0.4,0.2") from None
    return values


def check_sigmas(sigmas: Sequence[float]) -> list[float]:
    """Starting sigmas in (0, 1], duplicates dropped, order kept."""
    if not sigmas:
        raise UserError("sigmas: give at least one starting sigma in (0, 1]")
    out: list[float] = []
    for s in sigmas:
        if not (isinstance(s, (int, float)) and 0 < s <= 1):
            raise UserError(f"sigmas: {s!r} is not in (0, 1] (sigma = 1 is pure noise, 0 the clean image)")
        if float(s) not in out:
            out.append(float(s))
    return out


def guidance_rows(guidance: float) -> list[float]:
    """The requested CFG scale, then g = 1 (no guidance) unless that is the request."""
    if not math.isfinite(guidance):
        raise UserError(f"guidance: {guidance!r} is not a finite number")
    return [float(guidance)] if guidance == 1.0 else [float(guidance), 1.0]


def _chunks(records: Sequence[Record], batch_size: int) -> list[list[int]]:
    """Positions grouped by image size (bucket), then cut into batches: one batch is one tensor."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(records):
        by_size.setdefault((r.bw, r.bh), []).append(i)
    return [idx[k:k + batch_size] for idx in by_size.values() for k in range(0, len(idx), batch_size)]


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


@dataclass
class _Row:
    guidance: float
    sigma: float
    euler_steps: int
    mse: np.ndarray  # per pair
    geneval_records: list[dict | None]


# ------------------------------------------------------------------------------------------ the probe

@torch.no_grad()
def exposure_probe(adapter, records: Sequence[Record], n: int = DEFAULT_N, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                   guidance: float = DEFAULT_GUIDANCE, num_steps: int = DEFAULT_NUM_STEPS, seed: int = 0,
                   batch_size: int = 64, geneval_backend: str = "shapes", out_dir: str | Path | None = None,
                   model_info: dict | None = None, data_info: dict | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the probe on the first `n` records; returns the probe.json object (written to out_dir when given).

    `adapter` needs: posterior, to_model_latents, encode_prompts, null_embeddings, velocity, scheduler_config,
    transformer, source, checkpoint, max_sequence_length, and decode for GenEval data (SD3Adapter has them all).
    """
    sigmas = check_sigmas(sigmas)
    guidances = guidance_rows(guidance)
    if n < 1:
        raise UserError(f"n: the probe needs at least one pair, got {n}")
    if num_steps < 1:
        raise UserError(f"num_steps: must be >= 1, got {num_steps}")
    if n > len(records):
        raise UserError(f"n = {n} but the data has only {len(records)} usable lines")
    chosen = list(records[:n])
    metric = None
    if all(r.geneval is not None for r in chosen):
        from soarbench.metrics.registry import build_metric

        metric = build_metric("geneval", backend=geneval_backend)

    eval_sigmas = sampling_sigmas(adapter.scheduler_config, num_steps)
    grids = {s: start_grid(eval_sigmas, s) for s in sigmas}
    rows = {(g, s): _Row(g, s, len(grids[s]) - 1, np.zeros(n), [None] * n) for g in guidances for s in sigmas}
    reference: list[dict | None] = [None] * n
    null = adapter.null_embeddings()
    chunks = _chunks(chosen, batch_size)
    total, done = len(chunks) * len(rows), 0
    t_start = time.perf_counter()
    was_training = adapter.transformer.training
    adapter.transformer.eval()
    try:
        for idx in chunks:
            part = [chosen[i] for i in idx]
            z0 = _clean_latents(adapter, part, seed)
            z1 = torch.stack([pair_noise(seed, i, z0.shape[1:]) for i in idx]).to(z0.device)
            prompts = [r.caption for r in part]
            text = adapter.encode_prompts(prompts)
            meta = [r.geneval for r in part]
            if metric is not None:
                for i, rec in zip(idx, metric.score(to_pil(adapter.decode(z0)), prompts, meta)):
                    reference[i] = rec
            for (g, s), row in rows.items():
                z_start = (1 - s) * z0 + s * z1  # on the data's own path
                z_end = integrate_from(adapter, z_start, grids[s], text, null, g)
                row.mse[idx] = (z_end - z0).pow(2).flatten(1).mean(dim=1).double().cpu().numpy()
                if metric is not None:
                    for i, rec in zip(idx, metric.score(to_pil(adapter.decode(z_end)), prompts, meta)):
                        row.geneval_records[i] = rec
                done += 1
                if on_progress is not None:
                    on_progress(done, total)
    finally:
        adapter.transformer.train(was_training)

    settings = {"n": n, "sigmas": sigmas, "guidance": guidances, "num_steps": num_steps, "seed": seed,
                "geneval_backend": geneval_backend if metric is not None else None}
    summary = {
        "schema": SCHEMA,
        "model": model_info or {"path": str(adapter.source), "checkpoint": adapter.checkpoint},
        "data": {**(data_info or {}), "pairs": [r.where for r in chosen]},
        "seed": seed, "n_pairs": n, "sigmas": sigmas, "guidance": guidances, "num_steps": num_steps,
        "sampling": {"sampler": "euler_ode", "grid": "the eval grid of num_steps, restricted to sigma < start",
                     "max_sequence_length": adapter.max_sequence_length},
        "rows": [_row_json(row, metric) for row in rows.values()],
        "reference": {"geneval_of_decoded_z0": _geneval_json(reference, metric)},
        "seconds": round(time.perf_counter() - t_start, 3),
        "provenance": provenance.collect(settings),
    }
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "probe.json", summary)
    return summary


def _clean_latents(adapter, part: Sequence[Record], seed: int) -> torch.Tensor:
    """z0 = the VAE posterior mean, in model latents (the crop rng only matters for images off their bucket)."""
    rng = random.Random(seed)
    pixels = torch.stack([load_pixels(r, rng, random_flip=False) for r in part])
    mean, _ = adapter.posterior(pixels)
    return adapter.to_model_latents(mean).float()


def _geneval_json(records: list[dict | None], metric) -> dict[str, float] | None:
    return metric.summarize(records) if metric is not None else None


def _row_json(row: _Row, metric) -> dict[str, Any]:
    scores = _geneval_json(row.geneval_records, metric)
    return {"guidance": row.guidance, "sigma": row.sigma, "euler_steps": row.euler_steps,
            "mse_mean": float(row.mse.mean()), "mse_std": _std(row.mse),
            "mse_sem": _std(row.mse) / math.sqrt(len(row.mse)),
            "geneval": scores["geneval"] if scores else None, "geneval_scores": scores,
            "per_pair_mse": [float(v) for v in row.mse]}


def run_probe(model: str | Path, data: str | Path, out_dir: str | Path, device: str = "auto",
              image_dir: str | Path | None = None, max_sequence_length: int | None = None,
              **options: Any) -> dict[str, Any]:
    """Load a base or checkpoint folder and a HY-SOAR JSONL, run `exposure_probe`, write out_dir/probe.json.
    `max_sequence_length` (T5 tokens) as the runs used it; None: the checkpoint's record or the default."""
    from soarbench.models.sd3 import SD3Adapter

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    records = read_records(data, image_dir)
    adapter = SD3Adapter.from_pretrained(model, device=dev, max_sequence_length=max_sequence_length)
    model_info = {"path": str(model), "label": Path(model).name, "checkpoint": adapter.checkpoint}
    data_info = {"jsonl": str(Path(data).resolve()), "sha256": sha256_file(data), "n_records": len(records)}
    return exposure_probe(adapter, records, out_dir=out_dir, model_info=model_info, data_info=data_info, **options)


def compare_probes(a: dict[str, Any], b: dict[str, Any], alpha: float = 0.05, power: float = 0.8) -> list[dict]:
    """Pair by pair, model b minus model a, per (guidance, sigma) row of two probe.json objects.

    Both must come from the same pairs and noise (data file, pairs, seed, steps); each row gives the mean and the
    standard deviation of the per-pair MSE differences, a normal-approximation 95% interval of the mean, and the
    minimum detectable difference of that many pairs (soarbench.probes.power)."""
    from soarbench.probes.power import min_detectable_difference

    for key in ("seed", "num_steps"):
        if a[key] != b[key]:
            raise UserError(f"probes differ in {key} ({a[key]} vs {b[key]}): pairs can only be compared on the "
                            "same data and noise")
    if (a["data"].get("sha256"), a["data"]["pairs"]) != (b["data"].get("sha256"), b["data"]["pairs"]):
        raise UserError("probes were run on different data (sha256 or pairs differ): pairs cannot be compared")
    rows_b = {(r["guidance"], r["sigma"]): r for r in b["rows"]}
    out = []
    for ra in a["rows"]:
        rb = rows_b.get((ra["guidance"], ra["sigma"]))
        if rb is None:
            continue
        diff = np.asarray(rb["per_pair_mse"]) - np.asarray(ra["per_pair_mse"])
        sd, n = _std(diff), len(diff)
        half = 1.959963984540054 * sd / math.sqrt(n)
        out.append({"guidance": ra["guidance"], "sigma": ra["sigma"], "n_pairs": n,
                    "mse_a": ra["mse_mean"], "mse_b": rb["mse_mean"], "diff_mean": float(diff.mean()),
                    "diff_std": sd, "diff_ci95": [float(diff.mean() - half), float(diff.mean() + half)],
                    "min_detectable_difference": min_detectable_difference(sd, n, alpha, power),
                    "geneval_a": ra["geneval"], "geneval_b": rb["geneval"]})
    return out
