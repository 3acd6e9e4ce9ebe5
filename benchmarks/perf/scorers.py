"""Images per second of each soarbench scorer, batched, and ClipScore against torchmetrics on the same model.

Launch lines (from the repository root):

    .venv/bin/python benchmarks/perf/scorers.py --scale real --images 16 --batch-sizes 1,8 --device auto
    .venv/bin/python benchmarks/perf/scorers.py --metrics clipscore,aesthetic,ocr,geneval --scale real \
        --json runs/perf/scorers.json
    .venv/bin/python benchmarks/perf/scorers.py --scale tiny --images 4 --batch-sizes 1,2   # seconds: a smoke run
    make perf                                                                                # --scale real, all

Every scorer is built through its real constructor (the metric registry): with the published weights when they
are under reward_ckpts/ (or --weights-root / $SOARBENCH_REWARD_CKPTS), otherwise with random weights of the
real architecture (--scale real) or of the tiny test models (--scale tiny) written to a temporary folder in the
real file layout by soarbench.metrics.synthetic. Random weights cost the same compute per image as the
published ones, so the timings carry over; the scores they give mean nothing.

For each batch size B: one warm-up score() call on B images, then score() on all --images images in calls of B
(metrics are built with batch_size = the largest B, so each call is one forward pass of B), timed with
torch.cuda.synchronize on a GPU. Inputs are deterministic 512 x 512 RGB images with prompts; OCR gets rendered
text (DejaVu Sans) and GenEval gets shapes-world scenes with their metadata rows, nearest-upscaled to 512 px.

Then ClipScore against torchmetrics' CLIPScore on the same CLIP folder, images and prompts: images/s of each
(torchmetrics updated in batches of the largest B), the speed ratio ours / torchmetrics, and the largest
|100 * our cosine - torchmetrics' score| over the pairs, torchmetrics run per image for that comparison
(torchmetrics clamps each score at 0, so our cosine is clamped the same way; the clamped pairs are counted).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local; never reach for the hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import soarbench  # noqa: E402,F401  (torchvision fallback first)
from soarbench.errors import UserError  # noqa: E402

DEFAULT_METRICS = ("clipscore", "pickscore", "hpsv2", "aesthetic", "imagereward", "ocr", "geneval")
IMAGE_SIZE = 512
FONT_CANDIDATES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                   "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf")
PROMPTS = (
    "a photo of a red fox sitting in fresh snow at dawn",
    "an oil painting of a lighthouse on a cliff during a storm",
    "a bowl of ramen with a soft boiled egg, studio lighting",
    "two blue spheres and a green cube on a wooden table",
    "a watercolor of a city street in the rain with umbrellas",
    "a corgi wearing sunglasses on a beach",
    "a futuristic train crossing a desert at sunset",
    "a close up of a hummingbird drinking from a flower",
)
OCR_WORDS = ("OPEN", "Coffee", "SALE 50%", "Hello World", "EXIT", "Bakery", "NO PARKING", "Welcome Home")
OCR_TEMPLATES = ('a shop sign that says "{}"', 'a poster with the words "{}"', 'a neon sign reading "{}"')


class BenchError(UserError):
    """A bad option: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise BenchError(message)


# ------------------------------------------------------------------------------------------------ options


def _positive(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise BenchError(f"{what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise BenchError(f"{what} must be a positive integer, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(prog="scorers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--metrics", default="all",
                   help=f"comma-separated names from the metric registry, or 'all' (default: {','.join(DEFAULT_METRICS)} "
                        "and any other registered metric that can be built)")
    p.add_argument("--scale", default="real",
                   help="architecture of the synthetic weights used when the published ones are absent: real | tiny")
    p.add_argument("--weights", default="auto",
                   help="auto: published weights when present under the weights root, else synthetic; "
                        "synthetic: always random weights")
    p.add_argument("--weights-root", default=None, help="where the published weights live (default: reward_ckpts/)")
    p.add_argument("--images", default="16", help="images scored per batch size (default 16)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (OCR and GenEval run on the CPU)")
    p.add_argument("--threads", default=None, help="torch (and onnxruntime) threads (default: all cores)")
    p.add_argument("--seed", default="0", help="seed of the synthetic weights and inputs (default 0)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results to OUT (atomically)")
    args = p.parse_args(argv)

    from soarbench.metrics.clipscore import resolve_device
    from soarbench.metrics.registry import METRICS
    from soarbench.metrics.synthetic import SCALES

    if args.scale not in SCALES:
        raise BenchError(f"--scale must be one of {', '.join(SCALES)}, got {args.scale!r}")
    if args.weights not in ("auto", "synthetic"):
        raise BenchError(f"--weights must be auto or synthetic, got {args.weights!r}")
    args.images = _positive(args.images, "--images")
    try:
        sizes = [_positive(t.strip(), "--batch-sizes entries") for t in args.batch_sizes.split(",")]
    except BenchError:
        raise BenchError(f"--batch-sizes must be positive integers separated by commas, got {args.batch_sizes!r}") \
            from None
    args.batch_sizes = list(dict.fromkeys(sizes))
    if max(args.batch_sizes) > args.images:
        raise BenchError(f"batch size {max(args.batch_sizes)} is larger than --images {args.images}")
    args.threads = _positive(args.threads, "--threads") if args.threads is not None else available_cores()
    try:
        args.seed = int(args.seed)
    except ValueError:
        raise BenchError(f"--seed must be an integer, got {args.seed!r}") from None
    args.device = resolve_device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {args.device} asked for, but torch sees no CUDA device here")
    if args.metrics.strip() == "all":
        extra = [n for n in METRICS.names() if n not in DEFAULT_METRICS]
        args.metrics = [*DEFAULT_METRICS, *extra]
        args.metrics_given = False
    else:
        names = [n.strip() for n in args.metrics.split(",") if n.strip()]
        if not names:
            raise BenchError("--metrics names no metric")
        for name in names:
            METRICS.check(name)  # did-you-mean on a typo
        args.metrics = list(dict.fromkeys(names))
        args.metrics_given = True
    return args


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    images: list[Image.Image]
    prompts: list[str]
    metadata: list[dict[str, Any]] | None = None


def natural_inputs(n: int, seed: int) -> Inputs:
    """Smooth colour fields with fine noise: 512 x 512 RGB, deterministic, one prompt each."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        noise = rng.normal(0.0, 12.0, (IMAGE_SIZE, IMAGE_SIZE, 3))
        images.append(Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8)))
    return Inputs(images, [PROMPTS[i % len(PROMPTS)] for i in range(n)])


def _font(size: int):
    for path in FONT_CANDIDATES:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def ocr_inputs(n: int, seed: int) -> Inputs:
    """Dark text rendered on a light background, the quoted words of each prompt."""
    rng = np.random.default_rng(seed + 1)
    font = _font(56)
    images, prompts = [], []
    for i in range(n):
        word = OCR_WORDS[i % len(OCR_WORDS)]
        background = tuple(int(v) for v in rng.integers(200, 256, 3))
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
        draw = ImageDraw.Draw(image)
        draw.text((int(rng.integers(16, 64)), int(rng.integers(80, 380))), word, fill=(20, 20, 20), font=font)
        images.append(image)
        prompts.append(OCR_TEMPLATES[i % len(OCR_TEMPLATES)].format(word))
    return Inputs(images, prompts)


def shapes_inputs(n: int, seed: int) -> Inputs:
    """Shapes-world scenes of GenEval test rows (one tag after another), rendered at 64 px, upscaled to 512."""
    from soarbench.geneval import grammar
    from soarbench.worlds.shapes import MAX_IMAGE_SIZE, render_metadata, shapes_metadata

    per_tag = math.ceil(n / len(grammar.TAGS))
    rows = shapes_metadata("test", n_per_tag=per_tag)
    by_tag: dict[str, list] = {}
    for row in rows:
        by_tag.setdefault(row["tag"], []).append(row)
    mixed = [r for group in zip(*by_tag.values()) for r in group][:n]
    rng = np.random.default_rng(seed + 2)
    images = [Image.fromarray(render_metadata(row, rng, size=MAX_IMAGE_SIZE).image).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST) for row in mixed]
    return Inputs(images, [r["prompt"] for r in mixed], mixed)


# -------------------------------------------------------------------------------------------------- weights


class Weights:
    """Where each scorer's weights come from: the published files, or synthetic ones written once on demand."""

    def __init__(self, mode: str, scale: str, seed: int, root: str | None, log: Callable[[str], None]):
        self.mode, self.scale, self.seed, self.root, self.log = mode, scale, seed, root, log
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._built: dict[str, Any] = {}

    @property
    def synthetic_label(self) -> str:
        kind = "real architecture" if self.scale == "real" else "tiny test architecture"
        return f"random weights, {kind}"

    def published(self, entries: Sequence[str]) -> bool:
        from soarbench.metrics import weights

        if self.mode == "synthetic" or not entries:
            return False
        return all(not weights.missing_files(e, self.root) for e in entries)

    @property
    def folder(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="soarbench-perf-")
        return Path(self._tmp.name)

    def _once(self, key: str, what: str, build: Callable[[], Any]) -> Any:
        if key not in self._built:
            start = time.perf_counter()
            self._built[key] = build()
            self.log(f"  wrote {what} ({self.synthetic_label}) to {self.folder} in "
                     f"{time.perf_counter() - start:.1f} s")
        return self._built[key]

    def clip(self) -> Path:
        from soarbench.metrics import synthetic

        return self._once("clip", "CLIP ViT-L/14 folder" if self.scale == "real" else "tiny CLIP folder",
                          lambda: synthetic.write_clip_folder(self.folder / synthetic.CLIP_FOLDER, self.scale,
                                                              seed=self.seed))

    def pickscore(self) -> tuple[Path, Path]:
        from soarbench.metrics import synthetic

        return self._once("pickscore", "PickScore_v1 (CLIP ViT-H/14) + processor folders",
                          lambda: synthetic.write_pickscore(self.folder, self.scale, seed=self.seed))

    def hps(self) -> tuple[Path, str]:
        from soarbench.metrics import synthetic

        return self._once("hps", "HPS v2.1 checkpoint (open_clip ViT-H-14)" if self.scale == "real" else
                          "tiny HPS checkpoint", lambda: synthetic.write_hps(self.folder, self.scale, seed=self.seed))

    def aesthetic_head(self) -> Path:
        from soarbench.metrics import synthetic

        return self._once("aesthetic", "aesthetic MLP head",
                          lambda: synthetic.write_aesthetic_head(self.folder / synthetic.AESTHETIC_FILE,
                                                                 scale=self.scale, seed=self.seed))

    def imagereward(self) -> tuple[Path, Path]:
        from soarbench.metrics import synthetic

        return self._once("imagereward", "ImageReward.pt (BLIP ViT-L + cross-attention BERT) + tokenizer"
                          if self.scale == "real" else "tiny ImageReward checkpoint + tokenizer",
                          lambda: synthetic.write_imagereward(self.folder, self.scale, seed=self.seed))

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@dataclass
class Built:
    metric: Any
    source: str  # what weights it runs
    device: str
    inputs: str  # "natural" | "ocr" | "shapes"
    clip_folder: Path | None = None  # ClipScore's CLIP folder, for the torchmetrics comparison


# The constructor options that point each neural scorer at its synthetic weights (written on first use).
SYNTHETIC_OPTIONS: dict[str, Callable[[Weights], dict[str, str]]] = {
    "clipscore": lambda w: {"model": str(w.clip())},
    "aesthetic": lambda w: {"clip": str(w.clip()), "head": str(w.aesthetic_head())},
    "pickscore": lambda w: dict(zip(("model", "processor"), map(str, w.pickscore()))),
    "hpsv2": lambda w: dict(zip(("weights", "architecture"), map(str, w.hps()))),
    "imagereward": lambda w: dict(zip(("model", "tokenizer"), map(str, w.imagereward()))),
}


def build(name: str, args: argparse.Namespace, weights: Weights) -> Built:
    """The metric through the registry's real constructor, with published or synthetic weights."""
    from soarbench.metrics.registry import METRICS, availability, build_metric

    meta = METRICS.meta(name)
    lacking_modules = [m for m in availability(name, args.weights_root) if m.startswith("python module")]
    if lacking_modules:
        raise UserError(f"not installed: {', '.join(lacking_modules)}")
    device, batch = str(args.device), max(args.batch_sizes)
    published = weights.published(meta.get("weights", []))
    common = {"device": device, "batch_size": batch}
    root = {"weights_root": args.weights_root}
    if name in SYNTHETIC_OPTIONS:
        if published:
            metric, source = build_metric(name, **common, **root), "published (reward_ckpts)"
        else:
            metric, source = build_metric(name, **common, **SYNTHETIC_OPTIONS[name](weights)), weights.synthetic_label
        clip_folder = Path(metric.info.needs[0]) if name == "clipscore" else None  # for the torchmetrics check
        return Built(metric, source, device, "natural", clip_folder)
    if name == "ocr":
        metric = build_metric(name, engine="rapidocr", device="cpu", threads=args.threads)
        return Built(metric, "published (models in the rapidocr wheel)", "cpu", "ocr")
    if name == "geneval":
        return Built(build_metric(name, backend="shapes"), "none: exact shapes-world detector", "cpu", "shapes")
    # A metric registered after this script was written: build it with its defaults when its weights are here.
    entries = meta.get("weights", [])
    if entries and not published:
        raise UserError(f"no synthetic builder for '{name}' and its weights are not under the weights root "
                        f"({', '.join(entries)})")
    accepted = inspect.signature(METRICS.load(name)).parameters
    options = {k: v for k, v in {**common, **root}.items() if k in accepted}
    source = "published (reward_ckpts)" if entries else "its own defaults"
    return Built(build_metric(name, **options), source, options.get("device", "cpu"), "natural")


# --------------------------------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_scoring(metric: Any, inputs: Inputs, batch: int, device: str) -> tuple[float, list[dict[str, Any]]]:
    """(seconds for all images in score() calls of `batch`, the records), after one warm-up call."""
    def call(start: int, stop: int) -> list[dict[str, Any]]:
        meta = inputs.metadata[start:stop] if inputs.metadata is not None else None
        return metric.score(inputs.images[start:stop], inputs.prompts[start:stop], meta)

    n = len(inputs.images)
    call(0, batch)
    synchronize(device)
    records = []
    start = time.perf_counter()
    for lo in range(0, n, batch):
        records.extend(call(lo, min(lo + batch, n)))
    synchronize(device)
    return time.perf_counter() - start, records


@dataclass
class Row:
    metric: str
    weights: str
    device: str
    batch_size: int
    images: int
    seconds: float
    images_per_s: float
    ms_per_image: float
    version: str = ""


@dataclass
class Results:
    machine: dict[str, Any]
    options: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    clipscore_vs_torchmetrics: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------- torchmetrics


def torchmetrics_clip(folder: Path, device: str) -> Callable[[], tuple[Any, Any]]:
    """A model_name_or_path factory for torchmetrics' CLIPScore over a local CLIP folder, in fp32 on `device`.

    transformers 5's get_image_features / get_text_features return model outputs where torchmetrics expects
    the projected embedding tensor, so a thin module hands over `.pooler_output` (the projection) when needed.
    """
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    from soarbench.metrics.clipscore import pil_image_processor

    class ProjectedFeatures(torch.nn.Module):
        def __init__(self, model: Any):
            super().__init__()
            self.model, self.config = model, model.config

        @staticmethod
        def _embedding(out: Any) -> torch.Tensor:
            return out if torch.is_tensor(out) else out.pooler_output

        def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self._embedding(self.model.get_image_features(pixel_values=pixel_values))

        def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self._embedding(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    clip = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    model = ProjectedFeatures(clip.to(device=device, dtype=torch.float32).eval().requires_grad_(False))
    processor = CLIPProcessor(image_processor=pil_image_processor(folder),
                              tokenizer=AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
    return lambda: (model, processor)


def compare_with_torchmetrics(ours: Built, inputs: Inputs, batch: int, our_seconds: float,
                              our_records: list[dict[str, Any]]) -> dict[str, Any]:
    from torchmetrics.functional.multimodal.clip_score import clip_score
    from torchmetrics.multimodal.clip_score import CLIPScore

    device = ours.device
    factory = torchmetrics_clip(ours.clip_folder, device)
    tensors = [torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device) for im in inputs.images]
    n = len(tensors)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        batched = CLIPScore(model_name_or_path=factory).to(device)
        batched.update(tensors[:batch], inputs.prompts[:batch])  # warm-up
        batched.reset()
        synchronize(device)
        start = time.perf_counter()
        for lo in range(0, n, batch):
            batched.update(tensors[lo:lo + batch], inputs.prompts[lo:lo + batch])
        batched.compute()
        synchronize(device)
        tm_seconds = time.perf_counter() - start
        per_image = [float(clip_score(t, p, model_name_or_path=factory)) for t, p in zip(tensors, inputs.prompts)]
    cosines = [float(r["cosine"]) for r in our_records]
    # torchmetrics returns max(100 * cos, 0) per image; ours is the raw cosine
    diffs = [abs(max(100.0 * c, 0.0) - t) for c, t in zip(cosines, per_image, strict=True)]
    clamped = sum(c <= 0 for c in cosines)
    ours_ips, tm_ips = n / our_seconds, n / tm_seconds
    return {
        "clip_folder": str(ours.clip_folder),
        "weights": ours.source,
        "device": device,
        "batch_size": batch,
        "images": n,
        "ours_images_per_s": ours_ips,
        "torchmetrics_images_per_s": tm_ips,
        "speed_ratio_ours_over_torchmetrics": ours_ips / tm_ips,
        "max_abs_diff_100cos": max(diffs),
        "pairs": n,
        "pairs_clamped_at_zero": clamped,
        "torchmetrics_version": _version("torchmetrics"),
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# ------------------------------------------------------------------------------------------------- printing


def format_table(rows: Sequence[Row]) -> str:
    head = ("metric", "weights", "device", "batch", "images/s", "ms/image")
    body = [(r.metric, r.weights, r.device, str(r.batch_size), f"{r.images_per_s:.2f}", f"{r.ms_per_image:.1f}")
            for r in rows]
    widths = [max(len(x) for x in column) for column in zip(head, *body)]
    right = {3, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def format_comparison(c: dict[str, Any]) -> str:
    note = ""
    if c["pairs_clamped_at_zero"]:
        note = (f" ({c['pairs_clamped_at_zero']} of {c['pairs']} pairs have cosine <= 0, which torchmetrics clamps "
                "to 0; compared clamped)")
    return "\n".join([
        f"ClipScore vs torchmetrics {c['torchmetrics_version']} CLIPScore, same CLIP folder ({c['weights']}), "
        f"{c['images']} images, batch {c['batch_size']}, {c['device']}:",
        f"  ours          {c['ours_images_per_s']:.2f} images/s",
        f"  torchmetrics  {c['torchmetrics_images_per_s']:.2f} images/s",
        f"  speed ratio (ours / torchmetrics)  {c['speed_ratio_ours_over_torchmetrics']:.2f}",
        f"  max |100 * ours - torchmetrics| per image  {c['max_abs_diff_100cos']:.2e}{note}",
    ])


# ----------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, log: Callable[[str], None]) -> Results:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    results = Results(
        machine={"cpu": cpu_model(), "cores": available_cores(), "threads": args.threads,
                 "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "python": platform.python_version()},
        options={"metrics": args.metrics, "scale": args.scale, "weights": args.weights, "images": args.images,
                 "batch_sizes": args.batch_sizes, "device": str(args.device), "seed": args.seed},
    )
    makers = {"natural": natural_inputs, "ocr": ocr_inputs, "shapes": shapes_inputs}
    inputs: dict[str, Inputs] = {}
    weights = Weights(args.weights, args.scale, args.seed, args.weights_root, log)
    try:
        for name in args.metrics:
            log(f"{name}:")
            try:
                built = build(name, args, weights)
            except UserError as e:
                log(f"  skipped: {e}")
                results.skipped.append({"metric": name, "reason": str(e)})
                continue
            log(f"  weights: {built.source}; device {built.device}")
            data = inputs.setdefault(built.inputs, makers[built.inputs](args.images, args.seed))
            last = None
            for batch in args.batch_sizes:
                seconds, records = time_scoring(built.metric, data, batch, built.device)
                row = Row(name, built.source, built.device, batch, args.images, seconds, args.images / seconds,
                          1000.0 * seconds / args.images, str(built.metric.info.version))
                results.rows.append(row)
                log(f"  batch {batch}: {row.images_per_s:.2f} images/s, {row.ms_per_image:.1f} ms/image")
                last = (batch, seconds, records)
            if name == "clipscore" and built.clip_folder is not None and last is not None:
                log("  against torchmetrics CLIPScore on the same folder ...")
                results.clipscore_vs_torchmetrics = compare_with_torchmetrics(built, data, *last)
            del built
            gc.collect()
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        weights.close()
        torch.set_num_threads(previous_threads)  # main() may run inside another process (the tests)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        args = parse_args(argv)
        results = run(args, log)
    except UserError as e:
        print(f"scorers.py: error: {e}", file=sys.stderr)
        return 2
    print(f"\nscorers on {results.machine['cpu']} ({results.machine['threads']} threads"
          + (f", {results.machine['gpu']}" if results.machine["gpu"] else "") + f"), {args.images} images of "
          f"{IMAGE_SIZE}x{IMAGE_SIZE}, synthetic scale {args.scale}")
    print(format_table(results.rows))
    for skip in results.skipped:
        print(f"skipped {skip['metric']}: {skip['reason']}")
    if results.clipscore_vs_torchmetrics is not None:
        print()
        print(format_comparison(results.clipscore_vs_torchmetrics))
    if args.json:
        from soarbench.io import atomic_write_json

        payload = asdict(results)
        atomic_write_json(args.json, payload)
        print(f"\nwrote {args.json}")
    requested_but_skipped = args.metrics_given and results.skipped
    return 1 if requested_but_skipped else 0


if __name__ == "__main__":
    sys.exit(main())
