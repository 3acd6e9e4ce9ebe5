"""Benchmarks: a prompt set, the metrics that score it, and the sampling protocol it is evaluated with.

Lazy entries, so naming a benchmark imports only what it needs. The papers' protocol for the real benchmarks is
512 px, 40 Euler steps, CFG 4.5, one image per line of the prompt file; the shapes world uses its own size.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from soarbench.registry import LazyRegistry


@dataclass
class Benchmark:
    name: str
    prompts: list[str]
    metadata: list[dict] | None  # GenEval-style rows, one per prompt, or None
    metrics: dict[str, dict[str, Any]]  # metric name -> options
    height: int = 512
    width: int = 512
    num_steps: int = 40
    guidance: float = 4.5
    images_per_prompt: int = 1
    source: dict[str, Any] = field(default_factory=dict)
    # GenEval's overall score is the mean of its task means, so a task of few prompts (the shapes world has five
    # single_object prompts) dominates its variance; each of its prompts gets enough images that the task has at
    # least this many (never fewer than images_per_prompt). 0: images_per_prompt everywhere.
    min_images_per_task: int = 0

    def image_counts(self) -> list[int]:
        """Images to draw for each prompt, in prompt order."""
        if self.min_images_per_task <= 0 or self.metadata is None:
            return [self.images_per_prompt] * len(self.prompts)
        size = Counter(row.get("tag") for row in self.metadata)
        return [max(self.images_per_prompt, -(-self.min_images_per_task // size[row.get("tag")]))
                for row in self.metadata]

    def sampling_settings(self) -> dict[str, int]:
        """The image-count fields of a result's settings (min_images_per_task only where it is used)."""
        out = {"images_per_prompt": self.images_per_prompt}
        if self.min_images_per_task > 0:
            out["min_images_per_task"] = self.min_images_per_task
        return out


def shapes_benchmark(seed: int | None = None, n_per_tag: int | None = None, image_size: int = 32,
                     images_per_prompt: int = 1, min_images_per_task: int = 0) -> Benchmark:
    """The shapes world's held-out test split, scored by the GenEval rules engine with the exact detector.

    n_per_tag None: every held-out prompt (378); a number takes at most that many per task (a quick subset).
    min_images_per_task: see Benchmark (the shapes world's five single_object and five counting prompts need it)."""
    from soarbench.worlds import shapes

    n_per_tag = shapes.ALL_TEST_PROMPTS if n_per_tag is None else n_per_tag
    seed = shapes.TEST_SEED if seed is None else seed
    rows = shapes.shapes_metadata("test", seed=seed, n_per_tag=n_per_tag)
    return _shapes(rows, "shapes", {"world": "shapes", "split": "test", "seed": seed, "n_per_tag": n_per_tag},
                   image_size, images_per_prompt, min_images_per_task)


def shapes_train_benchmark(seed: int | None = None, n_per_tag: int | None = None, image_size: int = 32,
                           images_per_prompt: int = 1, min_images_per_task: int = 0, train_images: int = 4000,
                           train_seed: int = 1) -> Benchmark:
    """Prompts the runs trained on: the distinct prompts of the shapes world's generated training data (the draw
    train_images, train_seed: the shipped configs' data.generate), at most n_per_tag per task, scored like
    `shapes` and sampled with the evaluation's own seeds (fresh noise). Beside the held-out split it tells "did
    not learn" (no gain here either) from "did not generalise" (a gain here only)."""
    from soarbench.worlds import shapes

    n_per_tag = shapes.ALL_TEST_PROMPTS if n_per_tag is None else n_per_tag
    seed = shapes.TEST_SEED if seed is None else seed
    rows = shapes.training_prompt_metadata(int(train_images), int(train_seed), seed, n_per_tag)
    source = {"world": "shapes", "split": "train", "seed": seed, "n_per_tag": n_per_tag,
              "train_images": int(train_images), "train_seed": int(train_seed)}
    return _shapes(rows, "shapes_train", source, image_size, images_per_prompt, min_images_per_task)


def _shapes(rows: list[dict], name: str, source: dict, image_size: int, images_per_prompt: int,
            min_images_per_task: int) -> Benchmark:
    if min_images_per_task < 0:
        from soarbench.errors import UserError

        raise UserError(f"{name} benchmark: min_images_per_task must be >= 0, got {min_images_per_task}")
    return Benchmark(name=name, prompts=[r["prompt"] for r in rows], metadata=rows,
                     metrics={"geneval": {"backend": "shapes"}}, height=image_size, width=image_size,
                     images_per_prompt=images_per_prompt, min_images_per_task=min_images_per_task, source=source)


def _lines_benchmark(name: str, prompt_set: str, metrics: dict[str, dict[str, Any]]) -> Benchmark:
    """One image per line of a pinned text prompt set, at the papers' protocol (the dataclass defaults)."""
    from soarbench import prompts

    return Benchmark(name=name, prompts=prompts.load_prompts(prompt_set), metadata=None, metrics=metrics,
                     source=prompts.get(prompt_set).provenance())


def geneval_benchmark(backend: str = "mask2former", images_per_prompt: int = 4) -> Benchmark:
    """GenEval: the 553 official rows, 4 images each (the 2212 lines of Flow-GRPO's test file, reordered).

    "mask2former" is the official detector (mmdetection Mask2Former Swin-S + CLIP ViT-L/14 colours), in-process when
    mmdet imports, else through `soarbench metrics serve-geneval` (soarbench.geneval.mmdet_backend).
    """
    from soarbench import prompts

    rows = prompts.load_metadata("geneval")
    return Benchmark(name="geneval", prompts=[r["prompt"] for r in rows], metadata=rows,
                     metrics={"geneval": {"backend": backend}}, images_per_prompt=images_per_prompt,
                     source=prompts.get("geneval").provenance())


def ocr_benchmark() -> Benchmark:
    """Flow-GRPO's 1018 OCR test prompts, one image each."""
    return _lines_benchmark("ocr", "ocr", {"ocr": {}})


def pickscore_benchmark() -> Benchmark:
    """Flow-GRPO's 2048 PickScore test prompts, one image each."""
    return _lines_benchmark("pickscore", "pickscore", {"pickscore": {}})


# The papers score DrawBench with PickScore, ClipScore, HPSv2.1, Aesthetic and ImageReward.
DRAWBENCH_METRICS = ("pickscore", "clipscore", "hpsv2", "aesthetic", "imagereward")


def drawbench_benchmark() -> Benchmark:
    """DiffusionNFT's DrawBench file: 200 prompts written 5 times each, one image per line (1000)."""
    return _lines_benchmark("drawbench", "drawbench", {m: {} for m in DRAWBENCH_METRICS})


BENCHMARKS = LazyRegistry("benchmark")
BENCHMARKS.add("shapes", "soarbench.benchmarks:shapes_benchmark")
BENCHMARKS.add("shapes_train", "soarbench.benchmarks:shapes_train_benchmark")
BENCHMARKS.add("geneval", "soarbench.benchmarks:geneval_benchmark")
BENCHMARKS.add("ocr", "soarbench.benchmarks:ocr_benchmark")
BENCHMARKS.add("pickscore", "soarbench.benchmarks:pickscore_benchmark")
BENCHMARKS.add("drawbench", "soarbench.benchmarks:drawbench_benchmark")


def build_benchmark(name: str, **options: Any) -> Benchmark:
    factory = BENCHMARKS.load(name)
    try:
        return factory(**options)
    except TypeError as e:
        from soarbench.errors import UserError

        raise UserError(f"benchmark '{name}': bad option ({e})") from None


def eval_benchmarks(ecfg: dict[str, Any]) -> list[Benchmark]:
    """The benchmarks of a config's [eval]: the main one (eval.benchmark), then eval.extra_benchmarks, each sampled
    with eval.num_steps Euler steps (its protocol's when unset); then, for each count k of eval.extra_num_steps,
    every one of them again at k steps, named "<name>@<k>" (e.g. "shapes@8": a few-step endpoint, a benchmark of
    its own in the results and the report)."""
    extras = ecfg.get("extra_benchmarks") or {}
    benches = [build_benchmark(ecfg["benchmark"], **ecfg.get("benchmark_options", {}))] + \
        [build_benchmark(name, **options) for name, options in extras.items()]
    if ecfg.get("num_steps") is not None:
        benches = [replace(b, num_steps=int(ecfg["num_steps"])) for b in benches]
    return benches + [replace(b, name=endpoint_name(b.name, k), num_steps=int(k))
                      for k in ecfg.get("extra_num_steps") or [] for b in benches]


def endpoint_name(benchmark: str, num_steps: int) -> str:
    """The name of a benchmark evaluated at another number of sampling steps: "shapes@8"."""
    return f"{benchmark}@{int(num_steps)}"
