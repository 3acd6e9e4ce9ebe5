"""ClipScore on a tiny random CLIPModel saved in the real openai/clip-vit-large-patch14 folder layout: the cosine
equals torchmetrics' CLIPScore / 100 on the same model and inputs; the named scales; the weights lookup."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.metrics.clipscore import ClipScoreMetric
from soarbench.metrics.registry import build_metric
from soarbench.metrics.synthetic import write_clip_folder

torch.set_num_threads(1)

PROMPTS = ["a red cube", "two blue spheres on a table", "a photo of a cat", "text that says hello"]
SIZES = [(64, 48), (100, 100), (30, 70), (256, 256)]  # (height, width): crops, upscales, non-square
SEED = 39  # a random model whose four cosines below are all clearly positive (torchmetrics clamps at 0)


def write_tiny_clip(folder: Path, seed: int = SEED, projection_dim: int = 16) -> Path:
    """A randomly initialised CLIPModel with the files of the real HF folder (config, safetensors, processor)."""
    return write_clip_folder(folder, "tiny", seed=seed, projection_dim=projection_dim)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("ckpts") / "clip-vit-large-patch14")


@pytest.fixture(scope="module")
def metric(clip_folder) -> ClipScoreMetric:
    return ClipScoreMetric(model=str(clip_folder), device="cpu")


@pytest.fixture(scope="module")
def records(metric):
    return metric.score(images(), PROMPTS)


def torchmetrics_factory(folder: Path):
    """(model, processor) for torchmetrics from the same folder; transformers 5's get_*_features return model
    outputs, so the projected pooled embedding is handed over as the tensor torchmetrics expects."""
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    from soarbench.metrics.clipscore import pil_image_processor

    class Features(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        @staticmethod
        def _tensor(out):
            return out if torch.is_tensor(out) else out.pooler_output

        def get_image_features(self, pixel_values):
            return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

        def get_text_features(self, input_ids, attention_mask):
            return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    processor = CLIPProcessor(image_processor=pil_image_processor(folder),
                              tokenizer=AutoTokenizer.from_pretrained(str(folder)))
    model = Features(CLIPModel.from_pretrained(str(folder)).eval().requires_grad_(False))
    return lambda: (model, processor)


def test_cosine_equals_torchmetrics_clipscore_over_100(clip_folder, records):
    from torchmetrics.functional.multimodal.clip_score import clip_score
    from torchmetrics.multimodal.clip_score import CLIPScore

    cosines = [r["cosine"] for r in records]
    assert all(c > 0.05 for c in cosines), "the test model must give positive cosines (torchmetrics clamps at 0)"
    factory = torchmetrics_factory(clip_folder)
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images()]
    for tensor, prompt, cosine in zip(tensors, PROMPTS, cosines, strict=True):
        assert abs(float(clip_score(tensor, prompt, model_name_or_path=factory)) / 100 - cosine) < 1e-4
    batch = CLIPScore(model_name_or_path=factory)
    batch.update(tensors, PROMPTS)
    assert abs(float(batch.compute()) / 100 - np.mean(cosines)) < 1e-4


def test_records_are_raw_cosines_and_batching_does_not_change_them(clip_folder, records):
    assert [set(r) for r in records] == [{"score", "cosine"}] * 4
    assert all(r["score"] == r["cosine"] and -1 <= r["score"] <= 1 for r in records)
    one_at_a_time = ClipScoreMetric(model=str(clip_folder), device="cpu", batch_size=1).score(images(), PROMPTS)
    assert [r["score"] for r in one_at_a_time] == pytest.approx([r["score"] for r in records], abs=1e-6)


def test_cosine_is_the_diagonal_of_logits_per_image_over_the_logit_scale(clip_folder, metric, records):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(clip_folder)).eval()
    tokens = metric.clip.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    pixels = metric.clip.image_processor(images=images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       pixel_values=pixels).logits_per_image
    expected = (logits.diagonal() / model.logit_scale.exp()).tolist()
    assert [r["cosine"] for r in records] == pytest.approx(expected, abs=1e-5)


def test_named_scales(clip_folder, records):
    cosines = [r["cosine"] for r in records]
    tm = ClipScoreMetric(model=str(clip_folder), scale="torchmetrics", device="cpu")
    hessel = ClipScoreMetric(model=str(clip_folder), scale="hessel", device="cpu")
    assert [r["score"] for r in tm.score(images(), PROMPTS)] == pytest.approx([100 * c for c in cosines], abs=1e-4)
    assert [r["score"] for r in hessel.score(images(), PROMPTS)] == pytest.approx([2.5 * c for c in cosines],
                                                                                  abs=1e-5)
    # torchmetrics clamps the MEAN at 0; Hessel clamps each image; the raw cosine mean is always reported
    mixed = [{"score": 100 * c, "cosine": c} for c in (0.2, -0.5)]
    assert tm.summarize(mixed) == {"clipscore": 0.0, "clipscore/cosine": pytest.approx(-0.15)}
    assert hessel._scaled(-0.3) == 0.0 and hessel._scaled(0.3) == pytest.approx(0.75)
    assert "torchmetrics" in tm.info.scale and tm.info.version.endswith("/torchmetrics")


def test_info_describe_and_registry(clip_folder, metric):
    assert metric.info.name == "clipscore" and metric.info.higher_is_better
    assert metric.info.version == f"hf-clip/local:{clip_folder}/cosine"
    assert metric.info.scale.startswith("cosine similarity")
    assert metric.describe()["weights"] == f"local:{clip_folder}"
    built = build_metric("clipscore", model=str(clip_folder), device="cpu", batch_size=2)
    assert isinstance(built, ClipScoreMetric) and built.summarize([{"score": 0.2, "cosine": 0.2}]) == {
        "clipscore": 0.2}


def test_default_name_resolves_under_the_weights_root(clip_folder):
    metric = ClipScoreMetric(weights_root=clip_folder.parent, device="cpu")
    label = metric.describe()["weights"]
    assert label.startswith("clip-vit-large-patch14@") and len(label.split("@")[1]) == 12
    assert metric.info.version == f"hf-clip/{label}/cosine"


def test_bad_input_is_a_user_error(clip_folder, tmp_path):
    with pytest.raises(UserError, match="did you mean 'hessel'"):
        ClipScoreMetric(model=str(clip_folder), scale="hesel")
    with pytest.raises(UserError, match="soarbench ckpts download clip-vit-large-patch14"):
        ClipScoreMetric(weights_root=tmp_path, device="cpu")
    with pytest.raises(UserError, match="2 images and 1 prompts"):
        ClipScoreMetric(model=str(clip_folder), device="cpu").score(images()[:2], PROMPTS[:1])
    with pytest.raises(UserError, match="positive integer"):
        ClipScoreMetric(model=str(clip_folder), batch_size=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a CLIP model"):
        ClipScoreMetric(model=str(tmp_path / "empty"), device="cpu")


def test_openai_clip_pixels_equal_open_clips_openai_transform():
    """The transform GenEval's colour crops and ImageReward use: open_clip's own, built without weights."""
    from open_clip.transform import image_transform

    from soarbench.metrics.clipscore import openai_clip_pixels

    official = image_transform(224, is_train=False)
    rng = np.random.default_rng(5)
    # odd long-side remainders after the resize (227, 229, 231 px) are where rounding half to even matters
    for width, height in ((227, 224), (224, 229), (47, 54), (19, 31), (300, 300), (500, 61)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        torch.testing.assert_close(openai_clip_pixels(image, 224), official(image), atol=1e-6, rtol=0)
    grey = Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8))  # converted to RGB after the crop
    torch.testing.assert_close(openai_clip_pixels(grey, 224), official(grey), atol=1e-6, rtol=0)
