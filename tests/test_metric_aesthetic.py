"""The LAION aesthetic predictor: a head state dict with the official keys, written with torch.save and loaded
through the real loader (weights_only), over a tiny CLIP folder; the output equals a hand computation."""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.metrics.aesthetic import AestheticMetric, load_head
from soarbench.metrics.registry import build_metric
from soarbench.metrics.synthetic import aesthetic_head_state, write_aesthetic_head, write_clip_folder

torch.set_num_threads(1)

WIDTH = 16  # the tiny CLIP's projection width; the real head takes 768
HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def write_clip(folder: Path, projection_dim: int = WIDTH) -> Path:
    return write_clip_folder(folder, "tiny", seed=3, projection_dim=projection_dim)


def head_state(width: int = WIDTH) -> OrderedDict:
    """Random weights under the published checkpoint's keys: layers.{0,2,4,6,7}.{weight,bias}."""
    return aesthetic_head_state(width, seed=11)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(512, 512), (120, 80),
                                                                                             (64, 64)]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    clip = write_clip(root / "clip-vit-large-patch14")
    write_aesthetic_head(root / HEAD_FILE, WIDTH, seed=11)
    return clip, root / HEAD_FILE


@pytest.fixture(scope="module")
def metric(files):
    clip, head = files
    return AestheticMetric(clip=str(clip), head=str(head), device="cpu")


def hand_scores(clip_dir: Path) -> list[float]:
    """CLIP image embedding (transformers' API), L2-normalised, through the five linear maps; no activations."""
    from transformers import CLIPModel

    from soarbench.metrics.clipscore import pil_image_processor

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    pixels = pil_image_processor(clip_dir)(images=images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
        x = out if torch.is_tensor(out) else out.pooler_output
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        state = head_state()
        for index in ("0", "2", "4", "6", "7"):
            x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x.squeeze(-1).tolist()


def test_output_equals_the_hand_computation_and_is_deterministic(files, metric):
    expected = hand_scores(files[0])
    first = [r["score"] for r in metric.score(images(), ["unused"] * 3)]
    assert first == pytest.approx(expected, abs=1e-5)
    assert [r["score"] for r in metric.score(images(), None)] == first  # eval mode: dropout off, prompts unused


def test_head_has_the_official_layout(files):
    head = load_head(files[1])
    assert [name for name, _ in head.state_dict().items()] == list(head_state())
    assert head.layers[0].in_features == WIDTH and not head.training
    assert [type(m).__name__ for m in head.layers] == ["Linear", "Dropout", "Linear", "Dropout", "Linear",
                                                       "Dropout", "Linear", "Linear"]
    assert [m.p for m in head.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]


def test_info_and_registry(files, metric):
    clip, head = files
    assert metric.info.name == "aesthetic" and metric.info.higher_is_better
    assert metric.info.version == f"laion-aesthetic-v2/local:{head}/local:{clip}"
    assert "aesthetic" in metric.info.scale and "5-6.5" in metric.info.scale
    built = build_metric("aesthetic", clip=str(clip), head=str(head), device="cpu", batch_size=1)
    assert [r["score"] for r in built.score(images(), None)] == pytest.approx(
        [r["score"] for r in metric.score(images(), None)], abs=1e-5)


def test_the_manifest_pin_refuses_a_file_that_is_not_the_published_head(files):
    clip, head = files  # head sits at reward_ckpts' layout under a tmp root, but it is not the real file
    with pytest.raises(UserError, match="expected 3714759.*soarbench ckpts download aesthetic-mlp"):
        AestheticMetric(clip=str(clip), weights_root=str(head.parent), device="cpu")


def test_pickles_beyond_tensors_need_trust(files, tmp_path):
    clip, _ = files
    rich = tmp_path / "rich.pth"
    torch.save({"state_dict": head_state(), "hparams": argparse.Namespace(lr=1e-3)}, rich)
    with pytest.raises(UserError, match="trust_pickle=True"):
        AestheticMetric(clip=str(clip), head=str(rich), device="cpu")
    trusted = AestheticMetric(clip=str(clip), head=str(rich), device="cpu", trust_pickle=True)
    assert [r["score"] for r in trusted.score(images()[:1], None)] == pytest.approx(hand_scores(clip)[:1], abs=1e-5)


def test_wrong_heads_are_user_errors(files, tmp_path):
    clip, _ = files
    wrong_width = tmp_path / "wide.pth"
    torch.save(head_state(width=768), wrong_width)
    with pytest.raises(UserError, match="takes 768-d embeddings but the CLIP .* projects to 16"):
        AestheticMetric(clip=str(clip), head=str(wrong_width), device="cpu")
    wrong_keys = tmp_path / "keys.pth"
    torch.save({"fc.weight": torch.zeros(1, 16)}, wrong_keys)
    with pytest.raises(UserError, match="not an aesthetic-predictor head"):
        load_head(wrong_keys)
    with pytest.raises(UserError, match="2 images and 1 prompts"):
        AestheticMetric(clip=str(clip), head=str(files[1]), device="cpu").score(images()[:2], ["x"])
