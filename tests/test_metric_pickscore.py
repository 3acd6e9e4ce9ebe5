"""PickScore on a tiny random CLIPModel saved as the PickScore_v1 folder, with a processor folder laid out like
laion/CLIP-ViT-H-14-laion2B-s32B-b79K's: the score equals exp(logit_scale) * cos computed by hand, the way the
PickScore reference code computes it, from the model's own embeddings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.metrics import synthetic
from soarbench.metrics.pickscore import FLOW_GRPO_DIVISOR, PickScoreMetric
from soarbench.metrics.registry import build_metric

torch.set_num_threads(1)

LOGIT_SCALE = 3.0  # not CLIP's default 2.6592: the score must use the model's own learnt scale
PROMPTS = ["a corgi wearing sunglasses", "an oil painting of a lighthouse at dusk",
           " ".join(["a very long prompt"] * 40)]  # > 77 tokens: truncated, as the reference does


def write_pickscore(root: Path) -> tuple[Path, Path]:
    return synthetic.write_pickscore(root, "tiny", seed=7, projection_dim=24, logit_scale=LOGIT_SCALE)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(512, 512), (90, 160),
                                                                                             (300, 200)]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_pickscore(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(scope="module")
def metric(folders):
    model_dir, processor_dir = folders
    return PickScoreMetric(model=str(model_dir), processor=str(processor_dir), device="cpu")


def reference_scores(model_dir: Path, processor_dir: Path) -> list[float]:
    """The PickScore reference computation with transformers' own processor and model API."""
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    from soarbench.metrics.clipscore import pil_image_processor

    processor = CLIPProcessor(image_processor=pil_image_processor(processor_dir),
                              tokenizer=AutoTokenizer.from_pretrained(str(processor_dir)))
    model = CLIPModel.from_pretrained(str(model_dir)).eval()

    def tensor(out):
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns model outputs

    with torch.no_grad():
        image_inputs = processor(images=images(), return_tensors="pt")
        text_inputs = processor(text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = tensor(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = tensor(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)
    return scores.diagonal().tolist()


def test_score_is_exp_logit_scale_times_cosine(folders, metric):
    records = metric.score(images(), PROMPTS)
    assert [set(r) for r in records] == [{"score"}] * 3
    assert [r["score"] for r in records] == pytest.approx(reference_scores(*folders), abs=1e-4)
    assert metric.logit_scale == pytest.approx(float(np.exp(LOGIT_SCALE)), rel=1e-6)
    cosines = metric.clip.cosine(images(), PROMPTS, batch_size=3)
    assert [r["score"] for r in records] == pytest.approx((cosines * np.exp(LOGIT_SCALE)).tolist(), abs=1e-4)


def test_info_records_the_raw_scale_and_flow_grpo_divisor(folders, metric):
    model_dir, processor_dir = folders
    assert metric.info.name == "pickscore" and metric.info.higher_is_better
    assert metric.info.version == f"pickscore/local:{model_dir}/local:{processor_dir}"
    assert "exp(logit_scale) * cosine" in metric.info.scale and "/ 26" in metric.info.scale
    described = metric.describe()
    assert described["flow_grpo_divisor"] == FLOW_GRPO_DIVISOR == 26.0
    assert described["logit_scale_exp"] == pytest.approx(float(np.exp(LOGIT_SCALE)), rel=1e-6)


def test_registry_and_default_names_under_the_weights_root(folders):
    model_dir, _ = folders
    metric = build_metric("pickscore", weights_root=str(model_dir.parent), device="cpu", batch_size=2)
    assert isinstance(metric, PickScoreMetric)
    assert metric.weights["model"].startswith("pickscore-v1@")
    assert metric.weights["processor"].startswith("clip-vit-h-14-processor@")
    assert len(metric.score(images()[:2], PROMPTS[:2])) == 2


def test_missing_weights_and_bad_input(folders, tmp_path):
    model_dir, processor_dir = folders
    with pytest.raises(UserError, match="soarbench ckpts download pickscore-v1"):
        PickScoreMetric(weights_root=str(tmp_path), device="cpu")
    with pytest.raises(UserError, match="3 images and 2 prompts"):
        PickScoreMetric(model=str(model_dir), processor=str(processor_dir), device="cpu").score(images(), PROMPTS[:2])
    with pytest.raises(UserError, match="device must be"):
        PickScoreMetric(model=str(model_dir), processor=str(processor_dir), device="gpu0")
