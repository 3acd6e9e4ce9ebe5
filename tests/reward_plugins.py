"""Test-only rewards that subprocess runs can import (SOARBENCH_PLUGINS=reward_plugins, tests/ on PYTHONPATH).

`test_brightness`: the mean pixel value, which differs from image to image so no group is ever dropped.
`test_embed`: a differentiable CLIP-type reward (image and text embeddings, as SRPO's relative reward needs):
the image's mean colour against a fixed direction per text, both normalised.
"""
from __future__ import annotations

import numpy as np
import torch

from soarbench.metrics.base import Metric, MetricInfo
from soarbench.metrics.registry import METRICS

FOLDER = __file__.rsplit("/", 1)[0]
ENV = {"SOARBENCH_PLUGINS": "reward_plugins"}


class Brightness(Metric):
    info = MetricInfo(name="test_brightness", version="1", scale="mean pixel value in [0, 1]")

    def score(self, images, prompts, metadata=None):
        return [{"score": float(np.asarray(im, dtype=np.float32).mean() / 255)} for im in images]


class Embed(Metric):
    info = MetricInfo(name="test_embed", version="1", scale="cosine")
    differentiable = True
    relative_scale = 1.0

    def embed_images_tensor(self, images):
        return torch.nn.functional.normalize(images.mean(dim=(2, 3)), dim=-1)

    def embed_texts(self, texts):
        rows = [torch.randn(3, generator=torch.Generator().manual_seed(len(t))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def score_tensor(self, images, prompts, metadata=None):
        return (self.embed_images_tensor(images) * self.embed_texts(prompts).to(images)).sum(-1)


METRICS.add("test_brightness", "reward_plugins:Brightness")
METRICS.add("test_embed", "reward_plugins:Embed")
