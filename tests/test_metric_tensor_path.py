"""The tensor path of the metric contract (Metric.score_tensor) on tiny scorers in their real file layouts:
differentiable scorers match score() on the 8-bit images within their stated tolerances and pass gradients to
the pixels (checked against central finite differences); non-differentiable ones return score()'s reward field,
detached; batching and order do not change scores; the training reward (RewardFunction) on pixels: counting of
no-grad and grad forwards, the budget meter, scoring on a worker thread."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.metrics import aesthetic, clipscore, hpsv2, pickscore, synthetic
from soarbench.metrics import pixels as pixels_lib
from soarbench.metrics.base import Metric, MetricInfo
from soarbench.geneval.metric import GenEvalMetric
from soarbench.rl.rewards import REWARD_FIELDS, RewardFunction

torch.set_num_threads(1)

PROMPTS = ["a red cube", "two cats on a sofa", "a photo of a dog", "a sign that says hello"]
# (height, width): downscaled, upscaled, non-square both ways, and the model's own size (no resize)
SIZES = [(256, 256), (64, 48), (90, 160), (224, 224)]


def decoded(height: int, width: int, n: int = 4, seed: int = 0, noise: float = 0.3) -> torch.Tensor:
    """Pixels as a decoder returns them: smooth content plus texture, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)
    return (x + noise * torch.randn(n, 3, height, width, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpts")
    synthetic.write_clip_folder(root / synthetic.CLIP_FOLDER, "tiny", seed=39)
    synthetic.write_pickscore(root, "tiny", seed=7, projection_dim=24, logit_scale=3.0)
    synthetic.write_hps(root, "tiny", seed=0)
    synthetic.write_aesthetic_head(root / synthetic.AESTHETIC_FILE)
    return root


@pytest.fixture(scope="module")
def scorers(ckpts) -> dict[str, Metric]:
    hps_arch = str(ckpts / f"{synthetic.HPS_TINY_NAME}.json")
    return {
        "clipscore": clipscore.ClipScoreMetric(model=str(ckpts / synthetic.CLIP_FOLDER), device="cpu"),
        "clipscore-paper": clipscore.ClipScoreMetric(model=str(ckpts / synthetic.CLIP_FOLDER), device="cpu",
                                                     protocol="paper"),
        "pickscore": pickscore.PickScoreMetric(model=str(ckpts / synthetic.PICKSCORE_FOLDER),
                                               processor=str(ckpts / synthetic.PICKSCORE_PROCESSOR_FOLDER),
                                               device="cpu"),
        "hpsv2": hpsv2.HPSv2Metric(weights=str(ckpts / synthetic.HPS_FILE), architecture=hps_arch, device="cpu"),
        "aesthetic": aesthetic.AestheticMetric(clip=str(ckpts / synthetic.CLIP_FOLDER),
                                               head=str(ckpts / synthetic.AESTHETIC_FILE), device="cpu"),
    }


def stated_tolerance(name: str, metric: Metric) -> float:
    """The tolerance each module's docstring states, in the metric's score units."""
    if name == "clipscore":
        return clipscore.TENSOR_COSINE_ATOL
    if name == "clipscore-paper":
        return 1e-3  # same steps as score(); only the 8-bit rounding of the input differs
    if name == "pickscore":
        return metric.logit_scale * clipscore.TENSOR_COSINE_ATOL
    return {"hpsv2": hpsv2.TENSOR_ATOL, "aesthetic": aesthetic.TENSOR_ATOL}[name]


DIFFERENTIABLE = ["clipscore", "clipscore-paper", "pickscore", "hpsv2", "aesthetic"]


# ----------------------------------------------------------------------------------------- 8-bit conversion


def test_to_pil_is_evaluations_conversion():
    from soarbench.evaluate import to_pil as evaluate_to_pil

    x = decoded(20, 12, n=3) * 1.2  # also values outside [-1, 1]: clamped
    x[0, 0, 0, 0] = -1 + 1 / 255  # (x + 1) * 127.5 = 0.5: the rounding edge
    ours, theirs = pixels_lib.to_pil(x), evaluate_to_pil(x)
    assert [np.array(a).tolist() for a in ours] == [np.array(b).tolist() for b in theirs]
    assert ours[0].mode == "RGB" and ours[0].size == (12, 20)


def test_bad_pixel_tensors_are_one_line_user_errors(scorers):
    from soarbench.errors import UserError

    for bad in (torch.zeros(3, 8, 8), torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8)):
        with pytest.raises(UserError, match=r"\(B, 3, H, W\) float tensor in \[-1, 1\]") as info:
            scorers["hpsv2"].score_tensor(bad, ["x"] * len(bad))
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------- preprocessing, model-free


@pytest.mark.parametrize("size", SIZES)
def test_processor_steps_in_torch_match_the_pil_processor(scorers, size):
    """The measured bound behind TENSOR_COSINE_ATOL: at most 0.024 (1.5 / 255 before normalisation) per pixel."""
    clip = scorers["clipscore"].clip
    x = decoded(*size)
    expected = clip.image_processor(images=pixels_lib.to_pil(x), return_tensors="pt")["pixel_values"]
    ours = clip.tensor_pixels(pixels_lib.unit_pixels(x))
    assert ours.shape == expected.shape == (4, 3, 224, 224)
    diff = (ours - expected).abs()
    assert diff.max() < 0.026 and diff.mean() < 0.007
    # the pixel path itself is the processor's: on an image already at 224 only the 8-bit rounding remains
    if size == (224, 224):
        assert diff.max() < 0.5 / 255 / min(clipscore.OPENAI_STD) + 1e-6


def test_hps_tensor_preprocessing_equals_the_pil_one_on_8bit_exact_pixels():
    x = torch.tensor(np.random.default_rng(0).integers(0, 256, (2, 3, 90, 160)), dtype=torch.float32) / 127.5 - 1
    batched = hpsv2.hps_preprocess_tensor(pixels_lib.unit_pixels(x))
    one_by_one = torch.stack([hpsv2.hps_preprocess(im) for im in pixels_lib.to_pil(x)])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


# ------------------------------------------------------------------------------- tensor path == PIL path


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_tensor_path_matches_score_within_the_stated_tolerance(scorers, name):
    metric = scorers[name]
    assert metric.differentiable
    tolerance = stated_tolerance(name, metric)
    for i, size in enumerate(SIZES):
        x = decoded(*size, seed=i)
        expected = torch.tensor([r["score"] for r in metric.score(pixels_lib.to_pil(x), PROMPTS)])
        got = metric.score_tensor(x, PROMPTS)
        assert got.dtype == torch.float32 and got.shape == (4,)
        assert (got - expected).abs().max() <= tolerance, (size, got, expected)
        # the tolerance is tight enough to tell the images apart: their scores spread wider than it
        assert expected.max() - expected.min() > tolerance


def test_paper_clipscore_tensor_path_is_the_pil_path_on_8bit_exact_pixels(scorers):
    metric = scorers["clipscore-paper"]
    x = torch.tensor(np.random.default_rng(1).integers(0, 256, (4, 3, 90, 160)), dtype=torch.float32) / 127.5 - 1
    expected = [r["score"] for r in metric.score(pixels_lib.to_pil(x), PROMPTS)]
    assert metric.score_tensor(x, PROMPTS).tolist() == pytest.approx(expected, abs=1e-5)


def test_clipscore_scales_apply_on_the_tensor_path(ckpts, scorers):
    x = decoded(64, 48)
    cosine = scorers["clipscore"].score_tensor(x, PROMPTS)
    folder = str(ckpts / synthetic.CLIP_FOLDER)
    tm = clipscore.ClipScoreMetric(model=folder, device="cpu", scale="torchmetrics").score_tensor(x, PROMPTS)
    hessel = clipscore.ClipScoreMetric(model=folder, device="cpu", scale="hessel").score_tensor(x, PROMPTS)
    assert torch.allclose(tm, 100 * cosine, atol=1e-4)
    assert torch.allclose(hessel, 2.5 * cosine.clamp(min=0), atol=1e-6)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("name", DIFFERENTIABLE)
def test_gradient_reaches_the_pixels(scorers, name):
    x = decoded(90, 160).requires_grad_(True)
    scores = scorers[name].score_tensor(x, PROMPTS)
    assert scores.requires_grad
    scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for i in range(len(x)):  # every image gets its own nonzero gradient
        assert x.grad[i].abs().sum() > 0


@pytest.mark.parametrize("name", ["clipscore", "hpsv2"])
def test_gradient_matches_central_finite_differences_on_one_pixel(scorers, name):
    """d score / d pixel from autograd equals (f(x + h e) - f(x - h e)) / 2h for the pixel with the largest
    gradient; the image stays away from the clamps (no kink within h), computed in float32."""
    metric = scorers[name]
    x = decoded(64, 64, n=1, noise=0.1) * 0.6
    x.requires_grad_(True)
    metric.score_tensor(x, PROMPTS[:1]).sum().backward()
    grad = x.grad.detach()
    index = np.unravel_index(int(grad.abs().argmax()), tuple(grad.shape))
    h = 2e-2
    with torch.no_grad():
        plus, minus = x.detach().clone(), x.detach().clone()
        plus[index] += h
        minus[index] -= h
        estimate = (metric.score_tensor(plus, PROMPTS[:1]) - metric.score_tensor(minus, PROMPTS[:1])).item() / (2 * h)
    assert grad[index].item() == pytest.approx(estimate, rel=0.05)
    assert abs(estimate) > 1e-4  # a direction the score actually moves along


def test_no_graph_under_no_grad(scorers):
    x = decoded(64, 48).requires_grad_(True)
    with torch.no_grad():
        assert not scorers["pickscore"].score_tensor(x, PROMPTS).requires_grad


# -------------------------------------------------------------------------------------- batching and order


@pytest.mark.parametrize("name", ["clipscore", "pickscore", "hpsv2", "aesthetic"])
def test_batching_and_order_do_not_change_scores(scorers, name):
    metric = scorers[name]
    x = decoded(90, 160)
    full = metric.score_tensor(x, PROMPTS)
    saved = metric.batch_size
    try:
        metric.batch_size = 1
        one_at_a_time = metric.score_tensor(x, PROMPTS)
    finally:
        metric.batch_size = saved
    order = [2, 0, 3, 1]
    permuted = metric.score_tensor(x[order], [PROMPTS[i] for i in order])
    assert torch.allclose(one_at_a_time, full, atol=1e-5)
    assert torch.allclose(permuted, full[order], atol=1e-5)


# ------------------------------------------------------------------------------- non-differentiable metrics


def shapes_batch():
    from soarbench.geneval import grammar
    from soarbench.worlds.shapes import render_metadata

    rows = [grammar.counting("circle", 2), grammar.counting("circle", 4), grammar.colors("square", "red"),
            grammar.colors("square", "blue")]
    drawn = [grammar.counting("circle", 2), grammar.counting("circle", 2), grammar.colors("square", "red"),
             grammar.colors("square", "red")]
    images = np.stack([render_metadata(r, np.random.default_rng(i)).image for i, r in enumerate(drawn)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, [r["prompt"] for r in rows], rows


def test_geneval_tensor_path_returns_partial_credit_detached():
    metric = GenEvalMetric()
    assert not metric.differentiable and metric.reward_field == REWARD_FIELDS["geneval"] == "partial_credit"
    pixels, prompts, rows = shapes_batch()
    expected = [r["partial_credit"] for r in metric.score(pixels_lib.to_pil(pixels), prompts, rows)]
    assert expected == [1.0, 0.5, 1.0, 0.5]  # by hand: 2 of 4 circles; right count, wrong colour
    got = metric.score_tensor(pixels.requires_grad_(True), prompts, rows)
    assert got.tolist() == expected and got.dtype == torch.float32 and not got.requires_grad


def test_imagereward_tensor_path_returns_its_score_detached(tmp_path):
    from soarbench.metrics.imagereward import ImageRewardMetric

    model_dir, tokenizer_dir = synthetic.write_imagereward(tmp_path, "tiny")
    metric = ImageRewardMetric(model=str(model_dir), tokenizer=str(tokenizer_dir), device="cpu")
    assert not metric.differentiable
    x = decoded(48, 40, n=2).requires_grad_(True)
    prompts = ["a red cube", "two blue balls"]
    expected = [r["score"] for r in metric.score(pixels_lib.to_pil(x), prompts)]
    got = metric.score_tensor(x, prompts)
    assert got.tolist() == pytest.approx(expected, abs=0) and not got.requires_grad


# ----------------------------------------------------------------------------------------- the reward


class Meter:
    def __init__(self):
        self.added: list[tuple[str, int]] = []

    def add(self, name: str, n: int) -> None:
        self.added.append((name, n))


class Recorder(Metric):
    """A non-differentiable stand-in that records what it was handed and on which thread."""

    info = MetricInfo(name="recorder", version="test", scale="mean pixel")

    def __init__(self):
        self.seen: list[tuple[torch.Tensor, str]] = []

    def score_tensor(self, images, prompts, metadata=None):
        self.seen.append((images, threading.current_thread().name))
        return images.detach().float().mean(dim=(1, 2, 3))

    def score(self, images, prompts, metadata=None):
        return [{"score": float(np.asarray(im, dtype=np.float64).mean())} for im in images]


def test_reward_on_pixels_counts_grad_and_no_grad_forwards(scorers):
    reward = RewardFunction({"clipscore": scorers["clipscore"], "hpsv2": scorers["hpsv2"]},
                            {"clipscore": 2.0, "hpsv2": -1.0})
    reward.meter = Meter()
    assert reward.differentiable
    x = decoded(64, 48).requires_grad_(True)
    total, parts = reward(x, PROMPTS)
    expected = 2.0 * scorers["clipscore"].score_tensor(x, PROMPTS) - scorers["hpsv2"].score_tensor(x, PROMPTS)
    assert torch.allclose(total, expected, atol=1e-6) and total.requires_grad
    total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert reward.grad_calls == {"clipscore": 4, "hpsv2": 4} and reward.calls == {"clipscore": 0, "hpsv2": 0}
    with torch.no_grad():
        reward(x, PROMPTS)
    reward(x.detach(), PROMPTS)  # grad enabled, but nothing to differentiate: a plain forward
    assert reward.calls == {"clipscore": 8, "hpsv2": 8} and reward.total_grad_calls == 8
    assert reward.meter.added == [("reward_fwd_bwd", 4)] * 2 + [("reward_calls", 4)] * 4
    described = reward.describe()
    assert described["hpsv2"]["weight"] == -1.0 and described["clipscore"]["protocol"] == "official"


def test_a_non_differentiable_metric_makes_the_reward_non_differentiable(scorers):
    reward = RewardFunction({"clipscore": scorers["clipscore"], "geneval": GenEvalMetric()},
                            {"clipscore": 1.0, "geneval": 1.0})
    assert not reward.differentiable
    pixels, prompts, rows = shapes_batch()
    pixels.requires_grad_(True)
    total, parts = reward(pixels, prompts, rows)
    assert parts["geneval"].tolist() == [1.0, 0.5, 1.0, 0.5] and not parts["geneval"].requires_grad
    assert reward.calls == {"clipscore": 0, "geneval": 4} and reward.grad_calls == {"clipscore": 4, "geneval": 0}
    assert torch.allclose(total, parts["clipscore"] + parts["geneval"])


def test_score_async_equals_the_synchronous_reward_and_detaches_to_cpu_when_not_differentiable():
    recorder = Recorder()
    reward = RewardFunction({"recorder": recorder}, {"recorder": 3.0})
    x = decoded(16, 16).requires_grad_(True)
    future = reward.score_async(x, PROMPTS)
    total, parts = future.result(timeout=60)
    handed, thread = recorder.seen[-1]
    assert thread.startswith("reward") and thread != threading.current_thread().name
    assert not handed.requires_grad and handed.device.type == "cpu"
    assert torch.allclose(total, 3.0 * x.detach().mean(dim=(1, 2, 3)))
    assert reward.calls == {"recorder": 4}
    # calls run in submission order on one worker
    futures = [reward.score_async(x[i:i + 1], PROMPTS[i:i + 1]) for i in range(4)]
    assert [f.result(timeout=60)[0].item() for f in futures] == pytest.approx(total.tolist())
    assert len({t for _, t in recorder.seen}) == 1
    reward.close()


def test_score_async_keeps_the_graph_and_the_callers_grad_mode(scorers):
    reward = RewardFunction({"aesthetic": scorers["aesthetic"]}, {"aesthetic": 1.0})
    x = decoded(64, 48).requires_grad_(True)
    total, _ = reward.score_async(x, PROMPTS).result(timeout=120)
    assert total.requires_grad
    total.sum().backward()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        future = reward.score_async(x, PROMPTS)
    assert not future.result(timeout=120)[0].requires_grad
    assert reward.grad_calls == {"aesthetic": 4} and reward.calls == {"aesthetic": 4}
    reward.close()
