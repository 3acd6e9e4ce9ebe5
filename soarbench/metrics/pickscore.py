"""PickScore: Kirstain et al.'s preference model, a CLIP ViT-H/14 fine-tuned on Pick-a-Pic.

    metric = PickScoreMetric()     # reward_ckpts/PickScore_v1 + reward_ckpts/CLIP-ViT-H-14-laion2B-s32B-b79K
    records = metric.score(images, prompts)   # [{"score": ...}, ...]

As in the reference code, the model is PickScore_v1 and the processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's
(resize shortest side 224 bicubic, centre crop 224, OpenAI mean/std; text padded, truncated at 77 tokens).
Score = exp(logit_scale) * cos(text, image) with the model's own learnt logit_scale: about 21-24 for SD-class
images. Stored raw; Flow-GRPO's training reward divides it by 26 (FLOW_GRPO_DIVISOR), which advantages
normalised per group do not see.

score_tensor(pixels, prompts) is the differentiable path for decoded pixels (ClipScore's, see
soarbench.metrics.clipscore): it matches score() on the 8-bit images within TENSOR_COSINE_ATOL (1e-3) on the
cosine, i.e. exp(logit_scale) * 1e-3 on the score (about 0.1 for PickScore_v1, whose exp(logit_scale) is about
100; measured on the tiny test model: 4.5e-4 on the cosine).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from soarbench.metrics.base import Metric, MetricInfo, check_protocol
from soarbench.metrics.clipscore import (HFClip, check_pairs, clip_cosine_tensor, clip_image_embeddings,
                                         positive_int, resolve_device)
from soarbench.metrics.weights import locate

FLOW_GRPO_DIVISOR = 26.0


class PickScoreMetric(Metric):
    differentiable = True

    def __init__(self, model: str = "pickscore-v1", processor: str = "clip-vit-h-14-processor",
                 weights_root: str | None = None, device: str = "auto", batch_size: int = 32,
                 protocol: str = "official"):
        # The papers score PickScore with the reference processor too: "paper" is accepted and changes nothing.
        self.protocol = check_protocol("PickScore", protocol)
        self.batch_size = positive_int("batch_size", batch_size)
        model_path, model_label = locate(model, weights_root)
        processor_path, processor_label = locate(processor, weights_root)
        self.clip = HFClip(model_path, processor_path, device=resolve_device(device))
        self.logit_scale = self.clip.logit_scale
        self.weights = {"model": model_label, "processor": processor_label}
        self.info = MetricInfo(
            name="pickscore",
            version=f"pickscore/{model_label}/{processor_label}",
            scale=f"exp(logit_scale) * cosine, raw (exp(logit_scale) = {self.logit_scale:.4g}; PickScore_v1 on "
                  f"SD-class images about 21-24; Flow-GRPO's reward is this / {FLOW_GRPO_DIVISOR:g})",
            higher_is_better=True,
            needs=[str(model_path), str(processor_path)],
        )

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str],
              metadata: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        check_pairs("PickScore", images, prompts)
        cosines = self.clip.cosine(list(images), list(prompts), self.batch_size)
        return [{"score": s} for s in (self.logit_scale * cosines).tolist()]

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str],
                     metadata: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        """(B,) scores of decoded pixels in [-1, 1], differentiable: the processor's bicubic resize done by torch
        on the float pixels; within exp(logit_scale) * TENSOR_COSINE_ATOL of score() on the 8-bit images."""
        check_pairs("PickScore", images, prompts)
        return self.logit_scale * clip_cosine_tensor(self.clip, images, list(prompts), self.batch_size)

    # ---- embeddings for SRPO's semantic relative reward (soarbench.methods.direct_align) --------------------
    def embed_images_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised image embeddings of decoded pixels in [-1, 1] (score_tensor's preprocessing), on
        the autograd graph, on the pixels' device."""
        return clip_image_embeddings(self.clip, images, self.batch_size)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings, without gradient, on the CPU."""
        return self.clip.embed_texts(list(texts))

    @property
    def relative_scale(self) -> float:
        """SRPO's factor for PickScore: exp(logit_scale) / 20, as the reference (comparable with HPS)."""
        return self.logit_scale / 20.0

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": self.weights, "logit_scale_exp": self.logit_scale,
                "flow_grpo_divisor": FLOW_GRPO_DIVISOR}
