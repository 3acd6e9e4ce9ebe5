"""The LAION improved aesthetic predictor: an MLP head over L2-normalised CLIP ViT-L/14 image embeddings.

    metric = AestheticMetric()     # reward_ckpts/clip-vit-large-patch14 + reward_ckpts/sac+logos+ava1-l14-linearMSE.pth
    records = metric.score(images, prompts)   # [{"score": ...}, ...]; prompts are ignored

The head is Linear(768,1024) Dropout(0.2) Linear(1024,128) Dropout(0.2) Linear(128,64) Dropout(0.1)
Linear(64,16) Linear(16,1) with no activations (state-dict keys layers.{0,2,4,6,7}), run in eval mode. Output is
a 1-10 style rating, about 5-6.5 for SD-class images.

The image encoder is the transformers CLIPModel of openai/clip-vit-large-patch14 (image processor with its PIL
backend), not the `clip` package the head was trained with: the weights are the same OpenAI ones, the folder is
the one ClipScore already uses (one download, one manifest entry), and it is what Flow-GRPO's aesthetic reward
runs. The embedding width is read from the head's checkpoint and must equal the CLIP's projection width.

score_tensor(pixels) is the differentiable path for decoded pixels in [-1, 1] (ClipScore's preprocessing in
torch, see soarbench.metrics.clipscore). Against score() on the 8-bit images it differs by at most 2.4e-4
(measured on the tiny test encoder and head over 8 image sizes); TENSOR_ATOL = 1e-3 is the stated tolerance.
The real head's sensitivity was not measured here (no weights on this machine).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from soarbench.errors import UserError
from soarbench.metrics import pixels as pixels_lib
from soarbench.metrics.base import Metric, MetricInfo, check_protocol
from soarbench.metrics.clipscore import HFClip, batches, positive_int, resolve_device
from soarbench.metrics.weights import load_checkpoint, locate

TENSOR_ATOL = 1e-3  # |score_tensor - score| (rating units), see the module docstring
HEAD_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")


class AestheticMLP(nn.Module):
    """The predictor's head; parameter names match the published state dict."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def load_head(path, trust_pickle: bool = False) -> AestheticMLP:
    """The head from its checkpoint (a plain state dict saved with torch.save), width taken from layers.0."""
    state = load_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    expected = {f"{k}.{p}" for k in HEAD_KEYS for p in ("weight", "bias")}
    if not isinstance(state, dict) or set(state) != expected:
        got = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path}: not an aesthetic-predictor head (expected keys {sorted(expected)}, got {got})")
    head = AestheticMLP(embed_dim=int(state["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: layer shapes do not match the aesthetic head ({str(e).splitlines()[-1].strip()})") \
            from None
    return head.eval().requires_grad_(False)


class AestheticMetric(Metric):
    differentiable = True

    def __init__(self, clip: str = "clip-vit-large-patch14", head: str = "aesthetic-mlp",
                 weights_root: str | None = None, device: str = "auto", batch_size: int = 32,
                 trust_pickle: bool = False, protocol: str = "official"):
        # The papers' aesthetic reward runs the same encoder and head: "paper" is accepted and changes nothing.
        self.protocol = check_protocol("aesthetic", protocol)
        self.batch_size = positive_int("batch_size", batch_size)
        clip_path, clip_label = locate(clip, weights_root)
        head_path, head_label = locate(head, weights_root)
        device = resolve_device(device)
        self.clip = HFClip(clip_path, device=device)
        self.head = load_head(head_path, trust_pickle=trust_pickle).to(device)
        width = self.head.layers[0].in_features
        if width != self.clip.projection_dim:
            raise UserError(f"aesthetic head {head_path} takes {width}-d embeddings but the CLIP at {clip_path} "
                            f"projects to {self.clip.projection_dim}")
        self.weights = {"clip": clip_label, "head": head_label}
        self.info = MetricInfo(
            name="aesthetic",
            version=f"laion-aesthetic-v2/{head_label}/{clip_label}",
            scale="LAION aesthetic rating, about 1-10 (SD-class images about 5-6.5)",
            higher_is_better=True,
            needs=[str(clip_path), str(head_path)],
        )

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None,
              metadata: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        images = list(images)
        if prompts is not None and len(prompts) != len(images):
            raise UserError(f"aesthetic: got {len(images)} images and {len(prompts)} prompts")
        device = next(self.head.parameters()).device
        scores = []
        for s in batches(len(images), self.batch_size):
            embeds = self.clip.embed_images(images[s]).to(device)  # already L2-normalised
            scores.extend(self.head(embeds).squeeze(-1).float().cpu().tolist())
        return [{"score": v} for v in scores]

    def score_tensor(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
                     metadata: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        """(B,) ratings of decoded pixels in [-1, 1], differentiable: the processor's bicubic resize done by
        torch on the float pixels; within TENSOR_ATOL of score() on the 8-bit images."""
        x = pixels_lib.unit_pixels(images)
        if prompts is not None and len(prompts) != len(x):
            raise UserError(f"aesthetic: got {len(x)} images and {len(prompts)} prompts")
        out = []
        for s in batches(len(x), self.batch_size):
            embeds = self.clip.image_features(self.clip.tensor_pixels(x[s]))  # L2-normalised
            out.append(self.head(embeds.to(next(self.head.parameters()).device)).squeeze(-1).float())
        return (torch.cat(out) if out else x.new_zeros(0)).to(images.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "weights": self.weights}
