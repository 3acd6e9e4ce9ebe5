"""Every metric soarbench knows, as lazy entries: heavy imports happen only when a metric is built."""
from __future__ import annotations

from typing import Any

from soarbench.metrics.base import Metric
from soarbench.registry import LazyRegistry

METRICS = LazyRegistry("metric")
METRICS.add("geneval", "soarbench.metrics.geneval:GenEvalMetric", needs=["a detector backend (shapes: built in)"])
METRICS.add("clipscore", "soarbench.metrics.clipscore:ClipScoreMetric",
            needs=["reward_ckpts/clip-vit-large-patch14/ (soarbench ckpts download clip-vit-large-patch14)"])
METRICS.add("pickscore", "soarbench.metrics.pickscore:PickScoreMetric",
            needs=["reward_ckpts/PickScore_v1/ (soarbench ckpts download pickscore-v1)",
                   "reward_ckpts/CLIP-ViT-H-14-laion2B-s32B-b79K/ (soarbench ckpts download clip-vit-h-14-processor)"])
METRICS.add("hpsv2", "soarbench.metrics.hpsv2:HPSv2Metric",
            needs=["reward_ckpts/HPS_v2.1_compressed.pt (soarbench ckpts download hpsv2.1)"])
METRICS.add("aesthetic", "soarbench.metrics.aesthetic:AestheticMetric",
            needs=["reward_ckpts/clip-vit-large-patch14/ (soarbench ckpts download clip-vit-large-patch14)",
                   "reward_ckpts/sac+logos+ava1-l14-linearMSE.pth (soarbench ckpts download aesthetic-mlp)"])
METRICS.add("ocr", "soarbench.metrics.ocr:OCRMetric",
            needs=["rapidocr + onnxruntime (pip install rapidocr==3.10.* onnxruntime; models ship in the wheel)",
                   "optional reference engine: pip install paddleocr==2.9.1 paddlepaddle"])


def build_metric(name: str, **options: Any) -> Metric:
    return METRICS.load(name)(**options)
