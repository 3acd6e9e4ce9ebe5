"""`soarbench eval`: generate a benchmark's images with fixed seeds, score them, write results with provenance.

Layout of an eval folder:
  images/PPPPP_K.png   image K of prompt P
  samples.jsonl        one line per finished sample: ids, seed, file and every metric's record
  results.jsonl        GenEval's official row format (when GenEval is among the metrics)
  summary.json         scores (raw), metric versions and scales, per-prompt means, provenance

Sample (P, K) draws its initial noise from its own seed, derived from (seed, P, K), on the CPU, so the images do
not depend on batching, device count or resumption (beyond float rounding of batched matrix products). An interrupted eval resumes: samples already in
samples.jsonl are not redone, and a sample counts once even if a crash repeated its line.
"""
from __future__ import annotations

import io
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from soarbench import provenance
from soarbench.benchmarks import Benchmark
from soarbench.io import append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text
from soarbench.metrics.registry import build_metric
from soarbench.models.sd3 import SD3Adapter
from soarbench.sampling.ode import euler_sample

SCHEMA = "soarbench.eval/1"


def sample_seed(seed: int, prompt_index: int, image_index: int) -> int:
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1, dtype=np.uint64)[0]
               % (2**63 - 1))


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = ((pixels.float().cpu().permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arr]


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def read_done(path: Path) -> dict[str, dict]:
    """Finished samples by id; a torn last line (a crash mid-write) is dropped, duplicates count once."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done.setdefault(row["id"], row)
    return done


def evaluate(adapter: SD3Adapter, bench: Benchmark, out_dir: Path, seed: int = 0,
             metric_names: list[str] | None = None, batch_size: int = 64, model_info: dict | None = None,
             config: dict | None = None, on_progress: Callable[[int, int], None] | None = None,
             num_steps: int | None = None, guidance: float | None = None) -> dict[str, Any]:
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    num_steps = bench.num_steps if num_steps is None else num_steps
    guidance = bench.guidance if guidance is None else guidance
    names = metric_names or list(bench.metrics)
    for name in names:
        from soarbench.metrics.registry import METRICS

        METRICS.check(name)
    metrics = {n: build_metric(n, **bench.metrics.get(n, {})) for n in names}

    samples_path = out_dir / "samples.jsonl"
    done = read_done(samples_path)
    todo = [(p, k) for p in range(len(bench.prompts)) for k in range(bench.images_per_prompt)
            if f"{p:05d}_{k}" not in done]
    total = len(bench.prompts) * bench.images_per_prompt
    shape = adapter.latent_shape(bench.height, bench.width)
    t_start = time.perf_counter()
    was_training = adapter.transformer.training
    adapter.transformer.eval()
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            prompts = [bench.prompts[p] for p, _ in chunk]
            seeds = [sample_seed(seed, p, k) for p, k in chunk]
            noise = torch.stack([initial_noise(s, shape) for s in seeds]).to(adapter.device)
            text = adapter.encode_prompts(prompts)
            latents = euler_sample(adapter, text, noise, num_steps=num_steps, guidance=guidance)
            images = to_pil(adapter.decode(latents))
            meta = [bench.metadata[p] for p, _ in chunk] if bench.metadata is not None else None
            records = {n: m.score(images, prompts, meta) for n, m in metrics.items()}
            for j, ((p, k), image) in enumerate(zip(chunk, images)):
                sid = f"{p:05d}_{k}"
                atomic_write_bytes(out_dir / "images" / f"{sid}.png", png_bytes(image))
                append_jsonl(samples_path, {"id": sid, "prompt_index": p, "image_index": k, "seed": seeds[j],
                                            "prompt": prompts[j], "file": f"images/{sid}.png",
                                            "records": {n: records[n][j] for n in names}})
            if on_progress is not None:
                on_progress(total - len(todo) + start + len(chunk), total)
    finally:
        adapter.transformer.train(was_training)
    seconds = time.perf_counter() - t_start

    rows = sorted(read_done(samples_path).values(), key=lambda r: (r["prompt_index"], r["image_index"]))
    scores: dict[str, float] = {}
    per_prompt: dict[str, list[float]] = {}
    for name, metric in metrics.items():
        recs = [r["records"][name] for r in rows]
        scores.update(metric.summarize(recs))
        by_prompt = defaultdict(list)
        for r, rec in zip(rows, recs):
            by_prompt[r["prompt_index"]].append(float(rec["score"]))
        per_prompt[name] = [float(np.mean(by_prompt[p])) for p in sorted(by_prompt)]
    if "geneval" in metrics:
        write_geneval_results(out_dir / "results.jsonl", rows)

    summary = {
        "schema": SCHEMA,
        "label": (model_info or {}).get("label", "model"),
        "model": model_info or {"path": str(adapter.source)},
        "benchmark": {"name": bench.name, "n_prompts": len(bench.prompts),
                      "images_per_prompt": bench.images_per_prompt,
                      "prompt_set_sha256": provenance.prompt_set_hash(bench.prompts, bench.metadata),
                      "source": bench.source},
        "sampling": {"sampler": "euler_ode", "num_steps": num_steps, "guidance": guidance,
                     "height": bench.height, "width": bench.width, "seed": seed,
                     "max_sequence_length": adapter.max_sequence_length},
        "scores": scores,
        "metrics": {n: m.describe() for n, m in metrics.items()},
        "per_prompt": per_prompt,
        "n_samples": len(rows),
        "eval_seconds_this_session": round(seconds, 3),
        "provenance": provenance.collect(config),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def write_geneval_results(path: Path, rows: list[dict]) -> None:
    keys = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
    lines = []
    for r in rows:
        rec = dict(r["records"]["geneval"])
        rec["filename"] = r["file"]
        lines.append(json.dumps({k: rec.get(k) for k in keys}))
    atomic_write_text(path, "\n".join(lines) + "\n")
