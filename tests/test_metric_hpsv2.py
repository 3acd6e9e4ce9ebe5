"""HPSv2.1: the resize-longest-side-and-zero-pad preprocessing against hand-made examples, and the score against
open_clip's own loading path (create_model with the {"state_dict": ...} checkpoint) on a tiny model config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.metrics import synthetic
from soarbench.metrics.hpsv2 import OPENAI_MEAN, OPENAI_STD, HPSv2Metric, _model_config, hps_preprocess
from soarbench.metrics.registry import build_metric

torch.set_num_threads(1)

TINY = synthetic.HPS_TINY
ARCH = synthetic.HPS_TINY_NAME
PROMPTS = ["a watercolor fox in the snow", "a robot reading a newspaper", " ".join(["long words"] * 60)]

MEAN = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_STD).view(3, 1, 1)
BLACK = (0.0 - MEAN) / STD  # a zero-padded pixel after normalisation


def grey(width: int, height: int, value: int = 128) -> Image.Image:
    return Image.new("RGB", (width, height), (value, value, value))


# --------------------------------------------------------------------------------------------- preprocessing


def test_wide_image_is_resized_to_224_wide_and_padded_top_and_bottom():
    x = hps_preprocess(grey(100, 50))  # 100 wide, 50 high -> content 224 x 112, bands of 56 rows
    assert x.shape == (3, 224, 224)
    content = (128 / 255 - MEAN) / STD
    assert torch.allclose(x[:, 56:168, :], content.expand(3, 112, 224), atol=1e-5)
    assert torch.allclose(x[:, :56, :], BLACK.expand(3, 56, 224), atol=1e-6)
    assert torch.allclose(x[:, 168:, :], BLACK.expand(3, 56, 224), atol=1e-6)


def test_odd_remainder_goes_right():
    x = hps_preprocess(grey(50, 101, value=200))  # scale 224/101: width round(110.89) = 111, pad 113 = 56 + 57
    content = (200 / 255 - MEAN) / STD
    assert torch.allclose(x[:, :, 56:167], content.expand(3, 224, 111), atol=1e-5)
    assert torch.allclose(x[:, :, :56], BLACK.expand(3, 224, 56), atol=1e-6)
    assert torch.allclose(x[:, :, 167:], BLACK.expand(3, 224, 57), atol=1e-6)


def test_resize_is_antialiased_bicubic_on_the_0_1_tensor():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (224, 448, 3), dtype=np.uint8)  # 448 wide: halved to 224 x 112
    x = hps_preprocess(Image.fromarray(pixels))
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255
    expected = torch.nn.functional.interpolate(tensor, size=(112, 224), mode="bicubic", antialias=True,
                                               align_corners=False)[0]
    assert torch.allclose(x[:, 56:168, :], (expected - MEAN) / STD, atol=1e-4)
    assert torch.allclose(x[:, :56, :], BLACK.expand(3, 56, 224), atol=1e-6)


def test_square_224_is_only_normalised_and_a_224_tall_image_is_still_padded():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = hps_preprocess(Image.fromarray(pixels))
    assert torch.allclose(x, (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - MEAN) / STD, atol=1e-6)
    tall = hps_preprocess(grey(100, 224))  # no resize needed; the reference would skip the pad, we do not
    assert tall.shape == (3, 224, 224)
    assert torch.allclose(tall[:, :, :62], BLACK.expand(3, 224, 62), atol=1e-6)


# ------------------------------------------------------------------------------------------------------ score


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    checkpoint, config = synthetic.write_hps(tmp_path_factory.mktemp("hps"), "tiny", seed=0)
    config = Path(config)
    return config, checkpoint


@pytest.fixture(scope="module")
def metric(files):
    config, checkpoint = files
    return HPSv2Metric(weights=str(checkpoint), architecture=str(config), device="cpu")


def images() -> list[Image.Image]:
    rng = np.random.default_rng(2)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(512, 512), (120, 300),
                                                                                             (64, 40)]]


def test_score_equals_open_clip_loading_the_same_checkpoint(files, metric):
    import open_clip

    config, checkpoint = files
    open_clip.add_model_config(config)  # registers the tiny architecture under its file stem
    reference = open_clip.create_model(ARCH, pretrained=str(checkpoint), output_dict=True).eval()
    tokens = open_clip.get_tokenizer("ViT-H-14")(PROMPTS)  # HPS's tokenizer: CLIP BPE, 77 tokens
    pixels = torch.stack([hps_preprocess(im) for im in images()])
    with torch.no_grad():
        out = reference(pixels, tokens)
    expected = torch.diagonal(out["image_features"] @ out["text_features"].T).tolist()
    records = metric.score(images(), PROMPTS)
    assert [set(r) for r in records] == [{"score"}] * 3
    assert [r["score"] for r in records] == pytest.approx(expected, abs=1e-5)
    assert torch.equal(metric.tokenizer(PROMPTS), tokens)


def test_batching_info_and_registry(files, metric):
    config, checkpoint = files
    one = build_metric("hpsv2", weights=str(checkpoint), architecture=str(config), device="cpu", batch_size=1)
    assert [r["score"] for r in one.score(images(), PROMPTS)] == pytest.approx(
        [r["score"] for r in metric.score(images(), PROMPTS)], abs=1e-6)
    assert metric.info.name == "hpsv2" and metric.info.higher_is_better
    assert metric.info.version == f"hpsv2/local:{checkpoint}/local:{config.name}"
    assert metric.info.scale.startswith("cosine similarity")


def test_the_default_architecture_is_open_clip_vit_h_14():
    cfg, label = _model_config("ViT-H-14")
    assert label == "ViT-H-14" and cfg["embed_dim"] == 1024 and cfg["vision_cfg"]["width"] == 1280
    assert cfg["vision_cfg"]["image_size"] == 224 and cfg["text_cfg"]["context_length"] == 77


def test_bad_weights_and_architectures_are_user_errors(files, tmp_path):
    config, checkpoint = files
    with pytest.raises(UserError, match="did you mean 'ViT-H-14'"):
        HPSv2Metric(weights=str(checkpoint), architecture="ViT-H14")
    with pytest.raises(UserError, match="soarbench ckpts download hpsv2.1"):
        HPSv2Metric(weights_root=str(tmp_path), architecture=str(config))
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(checkpoint)["state_dict"], bare)
    with pytest.raises(UserError, match="'state_dict' entry"):
        HPSv2Metric(weights=str(bare), architecture=str(config))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**TINY, "embed_dim": 8}))
    with pytest.raises(UserError, match="does not fit architecture local:other.json"):
        HPSv2Metric(weights=str(checkpoint), architecture=str(other))
    with pytest.raises(UserError, match="2 images and 3 prompts"):
        HPSv2Metric(weights=str(checkpoint), architecture=str(config), device="cpu").score(images()[:2], PROMPTS)
