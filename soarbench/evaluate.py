"""`soarbench eval`: generate a benchmark's images with fixed seeds, score them, write results with provenance.

Layout of an eval folder:
  images/PPPPP_K.png   image K of prompt P
  samples.jsonl        one line per finished sample: ids, seed, file and every metric's record
  results.jsonl        GenEval's official row format (when GenEval is among the metrics)
  summary.json         scores (raw), metric versions and scales, per-prompt means, provenance

Sample (P, K) draws its initial noise from its own seed, derived from (seed, P, K), on the CPU, so the images do
not depend on batching, device count or resumption (beyond float rounding of batched matrix products). An interrupted eval resumes: samples already in
samples.jsonl are not redone, and a sample counts once even if a crash repeated its line. Reuse is keyed to
content, not to paths: `soarbench eval --model` records the model's weights fingerprint
(soarbench.models.sd3.weights_fingerprint) in settings.json, and when the model at that path has changed since,
every sample is redone (said in one line).

One entry, three callers: an `EvalSpec` says how a model is sampled and scored (seed, batch size, steps,
guidance, metrics, precision); `soarbench eval` builds it from its flags, a training run and an experiment's base
from the config's [eval] table (`EvalSpec.from_config`), and `evaluate_config` evaluates every benchmark of that
table at one step (a run's evaluations and the experiment's base model alike).

`score_images` scores images made elsewhere, without a model, into the same files (no images/ folder: each
sample's `file` is the absolute path of its source image and `sha256` its content; `seed` and `sampling` are null).
It reads GenEval's official layout, DIR/NNNNN/metadata.jsonl + DIR/NNNNN/samples/NNNN.png, or a flat folder of
images paired line by line with a prompts file; either way each image is matched to its prompt's index in the
benchmark. It resumes the same way, reusing a score only while the image's sha256 is the one scored: images
changed since are rescored (said in one line). Every image's size is read from its header before any scoring
model loads: above --max-pixels (default 8192 x 8192) or under 16 px a side is refused in one line.
"""
from __future__ import annotations

import io
import json
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from soarbench import provenance
from soarbench.benchmarks import Benchmark
from soarbench.errors import UserError
from soarbench.io import append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file
from soarbench.faults import fault
from soarbench.images import MAX_PIXELS, MIN_SCORED_SIDE, image_size, load_rgb
from soarbench.metrics.base import Metric
from soarbench.metrics.pixels import to_pil  # noqa: F401  (one 8-bit conversion for evaluation and rewards)
from soarbench.metrics.registry import METRICS, build_metric
from soarbench.models.sd3 import SD3Adapter
from soarbench.sampling.ode import euler_sample

SCHEMA = "soarbench.eval/1"


@dataclass(frozen=True)
class EvalSpec:
    """How a model is sampled and scored on a benchmark; None takes the benchmark's own (40 steps, CFG 4.5, its
    metrics)."""

    seed: int = 0
    batch_size: int = 64
    num_steps: int | None = None
    guidance: float | None = None
    metric_names: list[str] | None = None
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast while sampling

    @classmethod
    def from_config(cls, cfg: dict) -> "EvalSpec":
        """A run's [eval] table (the same for its own evaluations and for the experiment's base): precision "auto"
        is the training's mixed precision (fp32 without)."""
        ecfg = cfg.get("eval", {})
        precision = ecfg.get("precision", "auto")
        if precision == "auto":
            mixed = cfg["train"]["mixed_precision"]
            precision = "fp32" if mixed == "no" else mixed
        return cls(seed=int(ecfg.get("seed", 0)), batch_size=int(ecfg.get("batch_size", 64)),
                   guidance=ecfg.get("guidance"), metric_names=ecfg.get("metrics") or None, precision=precision)


def evaluate_config(adapter: SD3Adapter, cfg: dict, step_folder: Path, model_info: dict, prefix: str, engine=None,
                    log: Callable[[str], None] = print,
                    on_summary: Callable[[int, Any, dict, Path], None] | None = None) -> None:
    """Every benchmark of the config's [eval] table (and each few-step endpoint) at one step, into
    step_folder/<benchmark>; the main process logs "<prefix> <benchmark> <main metric> = <score>" and passes each
    summary to `on_summary(index, bench, summary, folder)` (a run's TensorBoard)."""
    from soarbench.benchmarks import eval_benchmarks

    spec = EvalSpec.from_config(cfg)  # steps: each benchmark's num_steps
    for i, bench in enumerate(eval_benchmarks(cfg.get("eval", {}))):
        folder = Path(step_folder) / bench.name
        summary = evaluate(adapter, bench, folder, spec, model_info=model_info, config=cfg, engine=engine,
                           log=lambda message: log(f"{prefix} {message}"))
        if summary is None:  # not the main process
            continue
        main = next(iter(summary["scores"].items()))
        log(f"{prefix} {bench.name} {main[0]} = {main[1]:.4f}")
        if on_summary is not None:
            on_summary(i, bench, summary, folder)


def sample_seed(seed: int, prompt_index: int, image_index: int) -> int:
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1, dtype=np.uint64)[0]
               % (2**63 - 1))


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


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


def repair_jsonl(path: Path) -> None:
    """Rewrite a JSONL file without its torn lines, so that appending after a crash starts on a fresh line
    (appending to a half-written line would glue the next record to it and lose both)."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    good = []
    for line in text.splitlines():
        try:
            json.loads(line)
            good.append(line)
        except json.JSONDecodeError:
            continue
    fixed = "".join(line + "\n" for line in good)
    if fixed != text:
        atomic_write_text(path, fixed)


def _precision_context(precision: str, device: torch.device):
    """Sampling in the training precision: bf16/fp16 autocast, or plain fp32."""
    import contextlib

    if precision in ("fp32", "no", None):
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        raise UserError(f"eval precision must be fp32, bf16 or fp16, got '{precision}'")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


SETTINGS_FILE = "settings.json"
WEIGHTS_KEY = "weights_sha256"  # the model's content (soarbench.models.sd3.weights_fingerprint), when known


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_settings(out_dir: Path, settings: dict, is_main: bool, log: Callable[[str], None] = _note) -> None:
    """An eval folder belongs to one model and one set of sampling settings: rerunning into it with others would
    mix old images and scores with a new summary. The same model path holding other weights (a replaced
    checkpoint) is the one difference that is not refused: its samples are all redone."""
    path = out_dir / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in sorted((set(old) | set(settings)) - {WEIGHTS_KEY}):
            if old.get(key) != settings.get(key):
                raise UserError(f"{out_dir}: holds an eval with {key} = {old.get(key)!r}, asked {settings.get(key)!r}; "
                                f"choose another --out (or delete the folder)")
        if is_main and WEIGHTS_KEY in settings and old.get(WEIGHTS_KEY) != settings[WEIGHTS_KEY]:
            _start_over(out_dir, old.get(WEIGHTS_KEY), settings, log)
    elif is_main:
        atomic_write_json(path, settings)


def _start_over(out_dir: Path, old_weights: str | None, settings: dict, log: Callable[[str], None]) -> None:
    """Forget every sample made with other weights (lines, images, summary), then record the new weights."""
    n = len(_read_all_done(out_dir))
    for name in ("samples.jsonl", "results.jsonl", "summary.json"):
        (out_dir / name).unlink(missing_ok=True)
    for stale in [*out_dir.glob("samples.rank*.jsonl"), *(out_dir / "images").glob("*.png")]:
        stale.unlink()
    atomic_write_json(out_dir / SETTINGS_FILE, settings)
    if not n:
        return
    new = settings[WEIGHTS_KEY]
    if old_weights is None:
        log(f"note: {out_dir} does not record which weights made its {n} samples (written by an older "
            f"soarbench): all {n} are redone")
    else:
        log(f"note: the model at {settings['model']} has changed since {out_dir} was evaluated (weights sha256 "
            f"{old_weights[:12]}..., now {new[:12]}...): all {n} samples are redone")


def evaluate(adapter: SD3Adapter, bench: Benchmark, out_dir: Path, spec: EvalSpec | None = None, *,
             model_info: dict | None = None, config: dict | None = None,
             on_progress: Callable[[int, int], None] | None = None, engine=None, steering=None,
             log: Callable[[str], None] = _note, **settings) -> dict[str, Any] | None:
    """Generate and score the benchmark as `spec` says (or an EvalSpec of the keyword `settings`: seed,
    batch_size, num_steps, guidance, metric_names, precision); with an engine, every process takes its share.

    Batches are fixed chunks of the benchmark's samples in order and batch j goes to process j mod W, so each batch
    is computed exactly as a one-process run computes it: the images and scores equal a one-process run's. After an
    interruption only the samples not yet done are generated. The main process merges the shards and writes the
    summary (other processes return None).

    `steering` (soarbench.models.value_head.load_steering: an actor-critic checkpoint's value head) adds value
    guidance to every ODE step; its scale and head weights are recorded in the folder's settings and in the
    summary's `sampling.steer`. Scale 0 samples exactly as without it.

    model_info["weights_sha256"] (soarbench.models.sd3.weights_fingerprint; `soarbench eval --model` sets it)
    keys the folder to the model's content: when it differs from the one recorded, every sample is redone and
    `log` says so in one line.
    """
    spec = spec if spec is not None else EvalSpec(**settings)
    seed, batch_size, precision = spec.seed, spec.batch_size, spec.precision
    out_dir = Path(out_dir)
    rank, world = (engine.rank, engine.world_size) if engine is not None else (0, 1)
    is_main = rank == 0
    num_steps = bench.num_steps if spec.num_steps is None else spec.num_steps
    guidance = bench.guidance if spec.guidance is None else spec.guidance
    if num_steps < 1:
        raise UserError(f"eval: num_steps must be >= 1, got {num_steps}")
    if batch_size < 1:
        raise UserError(f"eval: batch_size must be >= 1, got {batch_size}")
    names, metrics = _build_metrics(bench, spec.metric_names)
    info = _with_method_version(model_info or {"path": str(adapter.source)}, adapter)
    settings = {"model": str(info.get("path")), "benchmark": bench.name, "n_prompts": len(bench.prompts),
                **bench.sampling_settings(),
                "prompt_set_sha256": provenance.prompt_set_hash(bench.prompts, bench.metadata),
                "num_steps": int(num_steps), "guidance": float(guidance), "seed": int(seed), "height": bench.height,
                "width": bench.width, "max_sequence_length": adapter.max_sequence_length, "metrics": names,
                "precision": precision}
    if steering is not None:  # value guidance (soarbench.models.value_head.ValueSteering): part of the settings
        settings["steer"] = steering.describe()
    if info.get(WEIGHTS_KEY):
        settings[WEIGHTS_KEY] = str(info[WEIGHTS_KEY])
    steer = steering if steering is not None and steering.scale != 0 else None  # scale 0: the plain sampler
    if is_main:
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        _check_settings(out_dir, settings, True, log)
        repair_jsonl(out_dir / "samples.jsonl")
    if engine is not None:
        engine.barrier()
    if not is_main:
        _check_settings(out_dir, settings, False)
    samples_path = out_dir / "samples.jsonl"
    shard_path = out_dir / f"samples.rank{rank}.jsonl" if world > 1 else samples_path
    repair_jsonl(shard_path)
    done = _read_all_done(out_dir)
    everything = [(p, k) for p, n in enumerate(bench.image_counts()) for k in range(n)]
    batches = [everything[i:i + batch_size] for i in range(0, len(everything), batch_size)]
    mine = [[(p, k) for p, k in b if f"{p:05d}_{k}" not in done] for j, b in enumerate(batches) if j % world == rank]
    mine = [b for b in mine if b]
    total = len(everything)
    shape = adapter.latent_shape(bench.height, bench.width)
    t_start = time.perf_counter()
    was_training = adapter.transformer.training
    adapter.transformer.eval()
    finished = total - sum(len(b) for b in mine)
    try:
        for chunk in mine:
            prompts = [bench.prompts[p] for p, _ in chunk]
            seeds = [sample_seed(seed, p, k) for p, k in chunk]
            noise = torch.stack([initial_noise(s, shape) for s in seeds]).to(adapter.device)
            with torch.no_grad(), _precision_context(precision, adapter.device):
                text = adapter.encode_prompts(prompts)
                latents = euler_sample(adapter, text, noise, num_steps=num_steps, guidance=guidance, steer=steer)
                images = to_pil(adapter.decode(latents.float()).float())
            meta = [bench.metadata[p] for p, _ in chunk] if bench.metadata is not None else None
            records = score_batch(metrics, images, prompts, meta)
            for j, ((p, k), image) in enumerate(zip(chunk, images)):
                sid = f"{p:05d}_{k}"
                atomic_write_bytes(out_dir / "images" / f"{sid}.png", png_bytes(image))
                append_jsonl(shard_path, {"id": sid, "prompt_index": p, "image_index": k, "seed": seeds[j],
                                          "prompt": prompts[j], "file": f"images/{sid}.png", "records": records[j]})
            finished += len(chunk)
            fault("eval_batch")
            if on_progress is not None:
                on_progress(finished, total)
    finally:
        adapter.transformer.train(was_training)
    seconds = time.perf_counter() - t_start
    if engine is not None:
        engine.barrier()
    if not is_main:
        return None
    rows = sorted(_read_all_done(out_dir).values(), key=lambda r: (r["prompt_index"], r["image_index"]))
    if world > 1:  # one merged file, then the shards go
        atomic_write_text(samples_path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
        for shard in out_dir.glob("samples.rank*.jsonl"):
            shard.unlink()
    scores, per_prompt = _score_rows(out_dir, metrics, rows)
    return _write_summary(
        out_dir, label=(model_info or {}).get("label", "model"), model=info,
        benchmark={"name": bench.name, "n_prompts": len(bench.prompts), **bench.sampling_settings(),
                   "n_images": len(everything), "prompt_set_sha256": settings["prompt_set_sha256"], "source": bench.source},
        sampling={"sampler": "euler_ode", "num_steps": num_steps, "guidance": guidance, "height": bench.height,
                  "width": bench.width, "seed": seed, "max_sequence_length": adapter.max_sequence_length,
                  "precision": precision, "processes": world,
                  **({"steer": steering.describe()} if steering is not None else {})},
        extra={}, metrics=metrics, scores=scores, per_prompt=per_prompt, n_samples=len(rows), seconds=seconds,
        config=config)


def _with_method_version(info: dict, adapter: SD3Adapter) -> dict:
    """The model info with the training method's recorded version (e.g. "1-reconstructed (...)"), read from the
    checkpoint's record: the loaded checkpoint's, or the one at info["path"] (an eval during training)."""
    from soarbench.models.sd3 import CHECKPOINT_FILE

    record = adapter.checkpoint
    path = Path(str(info.get("path"))) / CHECKPOINT_FILE
    if record is None and info.get("path") and path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            record = None
    version = (record or {}).get("method_version") if isinstance(record, dict) else None
    return {**info, "method_version": version} if version is not None and "method_version" not in info else info


def _read_all_done(out_dir: Path) -> dict[str, dict]:
    done = read_done(out_dir / "samples.jsonl")
    for shard in sorted(out_dir.glob("samples.rank*.jsonl")):
        for sid, row in read_done(shard).items():
            done.setdefault(sid, row)
    return done


def _write_summary(out_dir: Path, *, label: str, model: dict, benchmark: dict, sampling: dict | None, extra: dict,
                   metrics: dict, scores: dict, per_prompt: dict, n_samples: int, seconds: float,
                   config: dict | None) -> dict[str, Any]:
    """summary.json, the same fields for a model's eval and for scored image folders."""
    summary = {"schema": SCHEMA, "label": label, "model": model, "benchmark": benchmark, "sampling": sampling,
               **extra, "scores": scores, "metrics": {n: m.describe() for n, m in metrics.items()},
               "per_prompt": per_prompt, "n_samples": n_samples, "eval_seconds_this_session": round(seconds, 3),
               "provenance": provenance.collect(config)}
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _build_metrics(bench: Benchmark, metric_names: list[str] | None) -> tuple[list[str], dict[str, Metric]]:
    """The requested metrics (default: the benchmark's), each with the benchmark's options for it."""
    names = metric_names or list(bench.metrics)
    for name in names:
        METRICS.check(name)
    return names, {n: build_metric(n, **bench.metrics.get(n, {})) for n in names}


def score_batch(metrics: dict[str, Metric], images, prompts: list[str], metadata) -> list[dict[str, dict]]:
    """One record per metric for each image of a batch (a model's samples or an image folder's alike)."""
    records = {name: metric.score(images, prompts, metadata) for name, metric in metrics.items()}
    return [{name: records[name][j] for name in metrics} for j in range(len(images))]


def _score_rows(out_dir: Path, metrics: dict[str, Metric], rows: list[dict]):
    """(scores, per-prompt means) of every finished row, and GenEval's results.jsonl beside them."""
    scores, per_prompt = _aggregate(metrics, rows)
    if "geneval" in metrics:
        write_geneval_results(out_dir / "results.jsonl", rows)
    return scores, per_prompt


def _aggregate(metrics: dict[str, Metric], rows: list[dict]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(every metric's summary numbers, per metric the mean score of each prompt in prompt-index order)."""
    scores: dict[str, float] = {}
    per_prompt: dict[str, list[float]] = {}
    for name, metric in metrics.items():
        recs = [r["records"][name] for r in rows]
        scores.update(metric.summarize(recs))
        by_prompt = defaultdict(list)
        for r, rec in zip(rows, recs):
            by_prompt[r["prompt_index"]].append(float(rec["score"]))
        per_prompt[name] = [float(np.mean(by_prompt[p])) for p in sorted(by_prompt)]
    return scores, per_prompt


def write_geneval_results(path: Path, rows: list[dict]) -> None:
    keys = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
    lines = []
    for r in rows:
        rec = dict(r["records"]["geneval"])
        rec["filename"] = r["file"]
        lines.append(json.dumps({k: rec.get(k) for k in keys}))
    atomic_write_text(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ existing images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_NUMBER = re.compile(r"[0-9]+")
_GENEVAL_SAMPLE = re.compile(r"[0-9]+\.png")


@dataclass(frozen=True)
class ImageSample:
    """One existing image and what it is scored against."""
    id: str  # PPPPP_K, as in a model eval
    prompt_index: int
    image_index: int
    prompt: str
    metadata: dict | None
    path: Path  # absolute


def name_order(name: str) -> tuple:
    """Sort key for file names: runs of digits compare as numbers ("2.png" < "10.png"), the rest as text."""
    parts = re.split(r"([0-9]+)", name)
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], name


def _prompt_indices(bench: Benchmark) -> dict[str, int]:
    """Each prompt of the benchmark -> its first index."""
    index: dict[str, int] = {}
    for i, prompt in enumerate(bench.prompts):
        index.setdefault(prompt, i)
    return index


def geneval_layout_samples(images_dir: Path, bench: Benchmark) -> list[ImageSample]:
    """Images in GenEval's layout: DIR/NNNNN/metadata.jsonl (one row) and DIR/NNNNN/samples/NNNN.png.

    Like the official evaluator, each folder's images are scored against the folder's own row, and entries that
    are not numbered folders or NNNN.png files are ignored. The row must be one of the benchmark's (equal to it,
    not only in its prompt, when the benchmark has metadata) and the images become images 0, 1, ... of that
    prompt in folder-number order. So GenEval's own layout (folder N = row N, 4 images each) and a layout made
    from Flow-GRPO's test file (its 2212 lines in their order, 1 image each) give the same samples.
    """
    folders = sorted((f for f in images_dir.iterdir() if f.is_dir() and _NUMBER.fullmatch(f.name)),
                     key=lambda f: (int(f.name), f.name))
    if not folders:
        raise UserError(f"{images_dir}: no GenEval-layout prompt folders (NNNNN/metadata.jsonl with "
                        "NNNNN/samples/0000.png ...); a flat folder of images needs a prompts file (--prompts)")
    index_of = _prompt_indices(bench)
    seen: Counter = Counter()
    samples = []
    for folder in folders:
        meta_path = folder / "metadata.jsonl"
        row = _read_layout_row(meta_path)
        index = index_of.get(row["prompt"])
        if index is None:
            raise UserError(f"{meta_path}: {row['prompt']!r} is not a prompt of benchmark '{bench.name}'")
        if bench.metadata is not None and row != bench.metadata[index]:
            raise UserError(f"{meta_path}: the row of {row['prompt']!r} differs from row {index} of benchmark "
                            f"'{bench.name}'")
        sample_dir = folder / "samples"
        if not sample_dir.is_dir():
            raise UserError(f"{sample_dir}: no such folder")
        files = sorted((f for f in sample_dir.iterdir() if f.is_file() and _GENEVAL_SAMPLE.fullmatch(f.name)),
                       key=lambda f: name_order(f.name))
        for f in files:
            samples.append(ImageSample(f"{index:05d}_{seen[index]}", index, seen[index], row["prompt"], row, f))
            seen[index] += 1
    return samples


def _read_layout_row(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UserError(f"{path}: expected one JSON object with a 'prompt'")
    return row


def flat_samples(images_dir: Path, prompts_file: Path, bench: Benchmark) -> list[ImageSample]:
    """A flat folder of images, paired with the lines of `prompts_file` in name order (see `name_order`).

    With a GenEval-style benchmark every prompt must be one of its prompts: the image is scored against that
    row, and its prompt index is the row's (so a prompt repeated 4 times gives images 0..3 of one prompt).
    Otherwise each line is its own prompt, as in a model eval with one image per line.
    """
    from soarbench.prompts import read_prompt_lines

    files = sorted((f for f in images_dir.iterdir()
                    if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda f: name_order(f.name))
    prompts = read_prompt_lines(prompts_file)
    if len(files) != len(prompts):
        raise UserError(f"{images_dir} has {len(files)} images but {prompts_file} has {len(prompts)} prompts "
                        "(one prompt per image, in image-name order)")
    if bench.metadata is None:
        return [ImageSample(f"{i:05d}_0", i, 0, prompt, None, f) for i, (prompt, f) in enumerate(zip(prompts, files))]
    index_of = _prompt_indices(bench)
    seen: Counter = Counter()
    samples = []
    for lineno, (prompt, f) in enumerate(zip(prompts, files), start=1):
        index = index_of.get(prompt)
        if index is None:
            raise UserError(f"{prompts_file}:{lineno}: {prompt!r} is not a prompt of benchmark '{bench.name}'")
        samples.append(ImageSample(f"{index:05d}_{seen[index]}", index, seen[index], prompt,
                                   bench.metadata[index], f))
        seen[index] += 1
    return samples


def _check_resumable(done: dict[str, dict], samples: list[ImageSample], names: list[str], path: Path) -> None:
    """Rows already in samples.jsonl must be these images, scored by these metrics."""
    by_id = {s.id: s for s in samples}
    for sid, row in done.items():
        sample = by_id.get(sid)
        if sample is None or row.get("file") != str(sample.path) or row.get("prompt") != sample.prompt:
            raise UserError(f"{path} holds scores of other images ({row.get('file')}); score into a fresh "
                            "output folder")
        missing = [n for n in names if n not in row.get("records", {})]
        if missing:
            raise UserError(f"{path} was scored without {', '.join(missing)}; score into a fresh output folder")


def _drop_changed(samples_path: Path, done: dict[str, dict], digests: dict[str, str], out_dir: Path,
                  log: Callable[[str], None]) -> None:
    """Remove from `done` and from samples.jsonl every score of an image whose content is not the one scored."""
    changed = [sid for sid, row in done.items() if row.get("sha256") not in (None, digests[sid])]
    unrecorded = [sid for sid, row in done.items() if row.get("sha256") is None]
    if not changed and not unrecorded:
        return
    drop = set(changed) | set(unrecorded)
    kept = [line for line in samples_path.read_text(encoding="utf-8").splitlines()
            if json.loads(line)["id"] not in drop]  # repaired before: every line parses
    atomic_write_text(samples_path, "".join(line + "\n" for line in kept))
    parts = []
    if changed:
        parts.append(f"{len(changed)} of the {len(done)} images scored into {out_dir} have changed since")
    if unrecorded:
        parts.append(f"{len(unrecorded)} images in {out_dir} were scored without their sha256 (by an older "
                     f"soarbench)")
    for sid in drop:
        del done[sid]
    log(f"note: {'; '.join(parts)}: rescoring them")


def score_images(images_dir: Path, bench: Benchmark, out_dir: Path, prompts_file: Path | None = None,
                 metric_names: list[str] | None = None, batch_size: int = 64, model_info: dict | None = None,
                 config: dict | None = None, on_progress: Callable[[int, int], None] | None = None,
                 max_pixels: int = MAX_PIXELS, log: Callable[[str], None] = _note) -> dict[str, Any]:
    """Score existing images (no model) into an eval folder; returns the summary (also in summary.json).

    Without `prompts_file` the images are read in GenEval's layout (`geneval_layout_samples`), with it as a flat
    folder (`flat_samples`). summary["benchmark"]["covers_benchmark"] says whether the images are exactly the
    benchmark's prompts at its images per prompt; only then is "prompt_set_sha256" the benchmark's, as in a
    model eval (otherwise it hashes the prompts that were scored).

    Every image's size is read from its header first: one above `max_pixels` or under MIN_SCORED_SIDE pixels on a
    side is a UserError naming it, before any metric loads. Each row records the image's sha256; a rerun into the
    same folder reuses a score only for the same content and rescores the rest (`log` says how many).
    """
    images_dir = Path(images_dir).resolve()
    out_dir = Path(out_dir)
    if not images_dir.is_dir():
        raise UserError(f"{images_dir}: no such folder")
    if prompts_file is not None:
        prompts_file = Path(prompts_file)
        samples = flat_samples(images_dir, prompts_file, bench)
    else:
        samples = geneval_layout_samples(images_dir, bench)
    if not samples:
        raise UserError(f"{images_dir}: no images to score")
    for s in samples:  # sizes from the headers: refused before anything is decoded, loaded or written
        image_size(s.path, max_pixels, MIN_SCORED_SIDE)
    names, metrics = _build_metrics(bench, metric_names)

    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    repair_jsonl(samples_path)
    done = read_done(samples_path)
    _check_resumable(done, samples, names, samples_path)
    digests = {s.id: sha256_file(s.path) for s in samples}
    _drop_changed(samples_path, done, digests, out_dir, log)
    todo = [s for s in samples if s.id not in done]
    t_start = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = [load_rgb(s.path, max_pixels=max_pixels) for s in chunk]
        prompts = [s.prompt for s in chunk]
        meta = [s.metadata for s in chunk] if all(s.metadata is not None for s in chunk) else None
        records = score_batch(metrics, images, prompts, meta)
        for j, s in enumerate(chunk):
            append_jsonl(samples_path, {"id": s.id, "prompt_index": s.prompt_index, "image_index": s.image_index,
                                        "seed": None, "prompt": s.prompt, "file": str(s.path),
                                        "sha256": digests[s.id], "records": records[j]})
        if on_progress is not None:
            on_progress(len(samples) - len(todo) + start + len(chunk), len(samples))
    seconds = time.perf_counter() - t_start

    rows = sorted(read_done(samples_path).values(), key=lambda r: (r["prompt_index"], r["image_index"]))
    scores, per_prompt = _score_rows(out_dir, metrics, rows)
    counts = Counter(s.prompt_index for s in samples)
    covers = (counts == Counter(dict(enumerate(bench.image_counts())))
              and all(s.prompt == bench.prompts[s.prompt_index] for s in samples))
    if covers:
        prompt_set_sha256 = provenance.prompt_set_hash(bench.prompts, bench.metadata)
    else:
        first: dict[int, ImageSample] = {}
        for s in samples:
            first.setdefault(s.prompt_index, s)
        scored = [first[p] for p in sorted(first)]
        prompt_set_sha256 = provenance.prompt_set_hash(
            [s.prompt for s in scored], [s.metadata for s in scored] if bench.metadata is not None else None)
    per_prompt_counts = set(counts.values())
    info = model_info or {"images": str(images_dir), "label": images_dir.name, "method": "images", "step": None}
    return _write_summary(
        out_dir, label=info.get("label", "images"), model=info,
        benchmark={"name": bench.name, "n_prompts": len(counts),
                   "images_per_prompt": per_prompt_counts.pop() if len(per_prompt_counts) == 1 else None,
                   "prompt_set_sha256": prompt_set_sha256, "source": bench.source, "covers_benchmark": covers},
        sampling=None,
        extra={"images": {"dir": str(images_dir), "layout": "flat" if prompts_file is not None else "geneval",
                          "prompts_file": str(prompts_file.resolve()) if prompts_file is not None else None,
                          "prompts_file_sha256": sha256_file(prompts_file) if prompts_file is not None else None}},
        metrics=metrics, scores=scores, per_prompt=per_prompt, n_samples=len(rows), seconds=seconds, config=config)


# `soarbench.evaluate(...)` is the API function (soarbench/api.py); this module, once imported, must not shadow it
__import__("soarbench.api").api.callable_module(__name__)
