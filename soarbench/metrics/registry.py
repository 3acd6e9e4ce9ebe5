"""Every metric soarbench knows, as lazy entries: heavy imports happen only when a metric is built.

Each entry carries its display facts beside what it needs: the title a report's column shows, the decimals its
values are printed with, and the benchmark the papers read it on (`metric_display`); adding a metric is one entry
here and its class.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from soarbench.registry import LazyRegistry

if TYPE_CHECKING:  # metrics.base imports torch: naming and checking metrics must not
    from soarbench.metrics.base import Metric

PREFERENCE_BENCHMARK = "drawbench"  # where the papers read the preference metrics


class MetricDisplay(NamedTuple):
    title: str  # a report column's title
    decimals: int  # how its values are printed
    paper_benchmark: str  # the benchmark the papers read it on (a column measured elsewhere says so)


def metric_display(name: str) -> MetricDisplay:
    """The registered metric's display facts (no metric is built, nothing heavy is imported)."""
    meta = METRICS.meta(name)
    return MetricDisplay(meta.get("title", name), int(meta.get("decimals", 3)),
                         meta.get("paper_benchmark", PREFERENCE_BENCHMARK))


METRICS = LazyRegistry("metric")
METRICS.add("geneval", "soarbench.geneval.metric:GenEvalMetric",
            needs=["a detector backend: shapes (built in); mask2former, the official one (mmdet in-process, or "
                   "`soarbench metrics serve-geneval` + SOARBENCH_GENEVAL_SERVER; weights mask2former-mmdet and "
                   "clip-vit-large-patch14)"],
            modules=["scipy"],
            title="GenEval", decimals=3, paper_benchmark="geneval")
METRICS.add("clipscore", "soarbench.metrics.clipscore:ClipScoreMetric",
            needs=["reward_ckpts/clip-vit-large-patch14/ (soarbench ckpts download clip-vit-large-patch14)"],
            weights=["clip-vit-large-patch14"], modules=["transformers"],
            title="ClipScore", decimals=3)
METRICS.add("pickscore", "soarbench.metrics.pickscore:PickScoreMetric",
            needs=["reward_ckpts/PickScore_v1/ (soarbench ckpts download pickscore-v1)",
                   "reward_ckpts/CLIP-ViT-H-14-laion2B-s32B-b79K/ (soarbench ckpts download clip-vit-h-14-processor)"],
            weights=["pickscore-v1", "clip-vit-h-14-processor"], modules=["transformers"],
            title="PickScore", decimals=2)
METRICS.add("hpsv2", "soarbench.metrics.hpsv2:HPSv2Metric",
            needs=["reward_ckpts/HPS_v2.1_compressed.pt (soarbench ckpts download hpsv2.1)"],
            weights=["hpsv2.1"], modules=["open_clip"],
            title="HPSv2.1", decimals=3)
METRICS.add("aesthetic", "soarbench.metrics.aesthetic:AestheticMetric",
            needs=["reward_ckpts/clip-vit-large-patch14/ (soarbench ckpts download clip-vit-large-patch14)",
                   "reward_ckpts/sac+logos+ava1-l14-linearMSE.pth (soarbench ckpts download aesthetic-mlp)"],
            weights=["clip-vit-large-patch14", "aesthetic-mlp"], modules=["transformers"],
            title="Aesthetic", decimals=2)
METRICS.add("imagereward", "soarbench.metrics.imagereward:ImageRewardMetric",
            needs=["reward_ckpts/ImageReward/ (soarbench ckpts download imagereward-v1)",
                   "reward_ckpts/bert-base-uncased/ (soarbench ckpts download bert-base-uncased-tokenizer)"],
            weights=["imagereward-v1", "bert-base-uncased-tokenizer"], modules=["transformers"],
            title="ImgRwd", decimals=2)
METRICS.add("shapes_soft", "soarbench.metrics.shapes_soft:ShapesSoftMetric",
            needs=["nothing (built in): a differentiable colour / position reward for the shapes world"],
            title="ShapesSoft", decimals=3, paper_benchmark="shapes")
METRICS.add("ocr", "soarbench.metrics.ocr:OCRMetric",
            needs=["rapidocr + onnxruntime (pip install rapidocr==3.10.* onnxruntime; models ship in the wheel)",
                   "optional reference engine: pip install paddleocr==2.9.1 paddlepaddle"],
            modules=["rapidocr", "onnxruntime"],
            title="OCR", decimals=3, paper_benchmark="ocr")


def availability(name: str, weights_root=None) -> list[str]:
    """What a metric still lacks on this machine: uninstalled modules and weight files not on disk."""
    import importlib.util

    from soarbench.metrics import weights

    meta = METRICS.meta(name)
    lacking = [f"python module {m}" for m in meta.get("modules", []) if importlib.util.find_spec(m) is None]
    for entry in meta.get("weights", []):
        missing = weights.missing_files(entry, weights_root)
        if missing:
            lacking.append(f"{len(missing)} file(s) of {entry} (soarbench ckpts download {entry})")
    return lacking


def require_weights(names: list[str], options: dict[str, dict[str, Any]] | None = None) -> None:
    """Before any model loads: the weight files these metrics will read (named by their options, else their
    defaults) are on disk; a missing one is a UserError naming the metric, the file and the download command.
    Only presence is checked here; sizes and hashes are checked when the metric is built."""
    import inspect

    from soarbench.errors import UserError
    from soarbench.metrics import weights

    entries = set(weights.names())
    for name in names:
        given = dict((options or {}).get(name) or {})
        for param in inspect.signature(METRICS.load(name).__init__).parameters.values():
            value = given.get(param.name, param.default)
            if not isinstance(value, str) or value not in entries:
                continue  # not a weights option, or a path of one's own (checked when the metric is built)
            missing = weights.missing_files(value, given.get("weights_root"))
            if missing:
                raise UserError(f"metric '{name}': {weights.weights_root(given.get('weights_root')) / missing[0]} "
                                f"is missing (weights '{value}'{f': {len(missing)} files missing' if len(missing) > 1 else ''}"
                                f"); fix: soarbench ckpts download {value}")


def build_metric(name: str, **options: Any) -> Metric:
    return METRICS.load(name)(**options)
