"""Direct-Align and SRPO: the one-step x0 recovery, the branches' sigmas and directions, the semantic relative
reward, the gradient through decode and reward (against finite differences on the tiny model in float64), the
shared rollout noise, the CLIP-type embeddings, the shapes_soft reward, and the refusal of rewards it cannot use."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.harness.data import PromptShare
from soarbench.meter import Meter
from soarbench.methods import build_method
from soarbench.methods.base import Ctx, RunShape
from soarbench.methods.direct_align import (SRPO, branch_sigmas, branch_x0, gap, noisy, one_step_x0,
                                            relative_reward, shift_sigmas, training_grid)
from soarbench.metrics.shapes_soft import ShapesSoftMetric

RED_CIRCLE = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}],
              "prompt": "a photo of a red circle"}


def _hand_grid() -> np.ndarray:
    """g = linspace(s~_5, s~_25, 1000), s~_i = 3 t / (1 + 2 t), t = 1 - i / 50, written out by hand."""
    s5, s25 = 3 * 0.9 / (1 + 2 * 0.9), 3 * 0.5 / (1 + 2 * 0.5)
    return s5 + (s25 - s5) * np.arange(1000) / 999


# ------------------------------------------------------------------------------------------- the arithmetic
def test_training_grid_and_branch_sigmas_by_hand():
    grid = training_grid(3.0)
    hand = _hand_grid()
    assert np.allclose(grid.numpy(), hand, atol=1e-12) and abs(hand[0] - 27 / 28) < 1e-12 and hand[-1] == 0.75
    # the reference's int((1 - 0.9) * 1000) + 1: 1 - 0.9 is 0.09999999999999998 in binary floating point, so 100
    assert gap(500) == 100 and gap(5) == 5 and gap(995) == 5 and gap(950) == 50
    # m = 500, dj = 100: denoise from g[400] down to g[500]; inversion m' = 400 from g[600] up to g[500]
    assert branch_sigmas(grid, 500, 100, False) == pytest.approx((hand[400], hand[500], 500), abs=1e-12)
    assert branch_sigmas(grid, 500, 100, True) == pytest.approx((hand[600], hand[500], 400), abs=1e-12)
    # m = 5: dj = 5, m' = max(0, 1) = 1: from g[999] up to g[1000 - 6] = g[994]
    assert branch_sigmas(grid, 5, 5, True) == pytest.approx((hand[999], hand[994], 1), abs=1e-12)


@pytest.mark.parametrize("m", [5, 137, 500, 995])
@pytest.mark.parametrize("inversion", [False, True])
def test_x0_recovery_is_exact_with_the_true_velocity(m, inversion):
    g = torch.Generator().manual_seed(m)
    x0 = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 6, 6, generator=g, dtype=torch.float64).expand_as(x0)
    s_from, s_to, _ = branch_sigmas(training_grid(), m, gap(m), inversion)

    def true_velocity(z, sigma):  # v = eps - x0, written without looking at z
        return eps - x0

    assert torch.allclose(branch_x0(true_velocity, x0, eps, s_from, s_to), x0, atol=1e-12)


def test_inversion_steps_toward_noise_and_denoise_away_from_it():
    """With v = (eps - x0) + delta, x0_hat = x0 + (s_to - s_from) / (1 - s_to) delta: the denoise step lowers sigma
    (the velocity's error enters x0_hat with -), the inversion step raises it (the error enters with +)."""
    grid = training_grid()
    x0, eps, delta = torch.zeros(1, 1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, 1, dtype=torch.float64), 0.3
    for inversion, sign in ((False, -1.0), (True, 1.0)):
        s_from, s_to, _ = branch_sigmas(grid, 300, gap(300), inversion)
        assert (s_to > s_from) == inversion
        x = s_from * eps + (1 - s_from) * x0
        moved = one_step_x0(x, eps - x0 + delta, eps, s_from, s_to)
        expected = sign * abs(s_to - s_from) / (1 - s_to) * delta
        assert float(moved) == pytest.approx(expected, rel=1e-9)


def test_semantic_relative_reward_on_hand_made_embeddings():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    pos = torch.tensor([[0.6, 0.8], [0.6, 0.8]], dtype=torch.float64)
    neg = torch.tensor([[0.8, 0.6], [0.8, 0.6]], dtype=torch.float64)
    # image 0: 2 * (1.2 * 0.6 - 0.8) = -0.16; image 1: 2 * (1.2 * 0.8 - 0.6) = 0.72
    assert relative_reward(img, pos, neg, 0.2, 2.0).tolist() == pytest.approx([-0.16, 0.72], abs=1e-12)


class WordEmbed:
    """A CLIP-type reward stub: the image embedding is the pixels' per-channel mean (unnormalised, so the test can
    compute it), each text maps to a fixed vector chosen by its first word."""

    differentiable = True
    relative_scale = 0.5
    VECTORS = {"Real": [1.0, 0.0, 0.0], "Anime": [0.0, 1.0, 0.0]}

    def embed_images_tensor(self, images):
        return images.mean(dim=(2, 3))

    def embed_texts(self, texts):
        return torch.tensor([self.VECTORS[t.split(".")[0]] for t in texts], dtype=torch.float64)


def _stub_reward(metrics, method, meter):
    """What setup builds (RewardFunction over the method's weights, counting into the meter), with metrics that
    load no weights."""
    from soarbench.rl.rewards import RewardFunction

    reward_fn = RewardFunction(metrics, {name: method.weights[name] for name in metrics})
    reward_fn.meter = meter
    return reward_fn


def test_srpo_reward_swaps_words_and_uses_each_branch_k():
    method = SRPO(rewards={"clipscore": 2.0}, control_words=["Real"], negative_words=["Anime"])
    meter = Meter()
    method.reward_fn = _stub_reward({"clipscore": WordEmbed()}, method, meter)
    pixels = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    pixels[:, 0], pixels[:, 1] = 0.5, -0.25  # per-channel means (0.5, -0.25, 0)
    words = (method.control_word(7), method.negative_word(7))
    assert words == ("Real", "Anime")
    k, k_inv = 0.1 + 0.15 * 600 / 999, 0.3 - 0.29 * 450 / 999  # linspace(0.1, 0.25)[600], linspace(0.3, 0.01)[450]
    denoise = method.reward(pixels, ["a cat"], [None], words, 600, False)
    inversion = method.reward(pixels, ["a cat"], [None], words, 450, True)
    # weight 2 x scale 0.5 x img . [(1 + k) txt+ - txt-]; txt+ = Real = e0, txt- = Anime = e1 (swapped: inversion)
    assert float(denoise) == pytest.approx(2 * 0.5 * ((1 + k) * 0.5 - (-0.25)), rel=1e-9)
    assert float(inversion) == pytest.approx(2 * 0.5 * ((1 + k_inv) * (-0.25) - 0.5), rel=1e-9)
    assert meter.counts["reward_fwd_bwd"] == 2


# ------------------------------------------------------------------------------- the tiny model end to end
def _ctx(adapter, meter=None, unit=0):
    from soarbench.models.roles import Roles

    meter = meter or Meter()
    adapter.meter = meter
    return Ctx(adapter=adapter, roles=Roles(adapter), engine=None, meter=meter, sigmas=torch.zeros(1000), seed=4,
               unit=unit, shape=RunShape(1, 1, 2))


class Share:
    def __init__(self, ids, prompts, metadata):
        self.share = PromptShare(ids=ids, groups=list(ids), prompts=prompts, metadata=metadata)

    def next(self, ctx):
        return self.share


def test_rollout_noise_is_shared_by_every_sample_and_keyed_by_the_unit(adapter):
    method = build_method("direct_align", {"num_steps": 2, "guidance": 1.0})
    prompts, rows = [RED_CIRCLE["prompt"]] * 2, [RED_CIRCLE] * 2
    first = method.collect(_ctx(adapter), Share([0, 1], prompts, rows))
    assert torch.equal(first.x0[0], first.x0[1])  # the same prompt and the same noise: the same image
    other_ids = method.collect(_ctx(adapter), Share([6, 7], prompts, rows))  # another process's samples
    assert torch.equal(other_ids.eps, first.eps) and torch.equal(other_ids.x0, first.x0)
    later = method.collect(_ctx(adapter, unit=1), Share([0, 1], prompts, rows))
    assert not torch.equal(later.eps, first.eps)
    assert all(5 <= m <= 995 for m in first.m.tolist())
    assert first.dj.tolist() == [gap(m) for m in first.m.tolist()]


def test_one_step_reaches_the_transformer_through_decode_and_reward(adapter):
    meter = Meter()
    ctx = _ctx(adapter, meter)
    method = build_method("srpo", {"num_steps": 2, "guidance": 1.0, "rewards": {"clipscore": 1.0}})
    params = ctx.roles.full(("transformer",))  # what setup does, without loading CLIP weights (a stub scores)
    method.reward_fn = _stub_reward({"clipscore": WordEmbed()}, method, meter)
    method.control_words, method.negative_words = ("Real",), ("Anime",)
    rollouts = method.collect(ctx, Share([0, 1], ["a red circle", "a blue square"], [None, None]))
    (micros,) = list(method.updates(ctx, rollouts))
    assert [m.data[2] for m in micros] == [False, True] and [m.weight for m in micros] == [1.0, 1.0]
    method.threshold = 10.0  # keep the hinge open so every sample has a gradient
    for micro in micros:
        for p in params:
            p.grad = None
        method.loss(ctx, micro).loss.backward()
        norms = [p.grad.abs().sum() for p in params if p.grad is not None]
        assert norms and float(sum(norms)) > 0
    assert meter.counts == {"images": 2, "data_images": 0, "no_grad_fwd": 4, "fwd_bwd": 4, "reward_calls": 0,
                            "reward_fwd_bwd": 4, "vae_decodes": 4, "value_passes": 0}


def test_gradient_equals_finite_difference_in_float64(tiny_model_dir):
    """d loss / d theta along one random direction of one transformer weight: autograd through the velocity, the
    one-step x0, the VAE decoder and shapes_soft, against a central difference."""
    from soarbench.models import SD3Adapter

    adapter = SD3Adapter.from_pretrained(tiny_model_dir, dtype=torch.float64, max_sequence_length=0)
    metric = ShapesSoftMetric()
    text = adapter.encode_prompts([RED_CIRCLE["prompt"]])
    g = torch.Generator().manual_seed(0)
    shape = adapter.latent_shape(32, 32)
    x0 = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    eps = torch.randn(1, *shape, generator=g, dtype=torch.float64)
    s_from, s_to, _ = branch_sigmas(training_grid(), 400, gap(400), False)
    net = adapter.transformer
    weight = net.pos_embed.proj.weight  # the first layer: the gradient crosses the whole transformer
    direction = torch.randn(weight.shape, generator=g, dtype=torch.float64)

    def loss() -> torch.Tensor:
        def velocity(z, s):
            return adapter.velocity(z, torch.tensor([s], dtype=torch.float64), text)

        pixels = adapter.decode(branch_x0(velocity, x0, eps, s_from, s_to), grad=True)
        reward = metric.score_tensor(pixels, [RED_CIRCLE["prompt"]], [RED_CIRCLE])
        return (torch.relu(2.0 - reward) / 2).sum()

    weight.requires_grad_(True)
    loss().backward()
    analytic = float((weight.grad * direction).sum())
    h = 1e-4  # measured: h = 1e-3 .. 1e-4 agree to 4e-5 .. 3e-6; below, float32 steps inside diffusers add noise
    with torch.no_grad():
        weight += h * direction
        up = float(loss())
        weight -= 2 * h * direction
        down = float(loss())
        weight += h * direction
    numeric = (up - down) / (2 * h)
    assert abs(analytic) > 1e-8
    assert analytic == pytest.approx(numeric, rel=1e-4)


def test_decode_without_grad_stays_the_default(adapter):
    meter = Meter()
    adapter.meter = meter
    z = torch.randn(2, *adapter.latent_shape(32, 32), requires_grad=True)
    assert not adapter.decode(z).requires_grad
    assert adapter.decode(z, grad=True).requires_grad
    assert meter.counts["vae_decodes"] == 4


# ------------------------------------------------------------------------------------------------- rewards
def test_non_differentiable_reward_is_refused_in_one_line():
    with pytest.raises(UserError) as e:
        build_method("direct_align", {"rewards": {"geneval": 1.0}})
    message = str(e.value)
    assert "\n" not in message and "'geneval' is not differentiable" in message
    assert all(name in message for name in ("shapes_soft", "clipscore", "pickscore", "hpsv2"))
    with pytest.raises(UserError) as e:
        build_method("srpo", {"rewards": {"shapes_soft": 1.0}})
    assert "\n" not in str(e.value) and "'shapes_soft'" in str(e.value) and "hpsv2" in str(e.value)
    with pytest.raises(UserError, match="unknown options"):
        build_method("direct_align", {"control_words": ["Real"]})


def _render(row, seed=0):
    from soarbench.worlds.shapes import render_metadata

    scene = render_metadata(row, np.random.default_rng(seed), size=32)
    return torch.from_numpy(scene.image.astype(np.float64) / 127.5 - 1).permute(2, 0, 1)[None]


def test_shapes_soft_scores_colours_and_positions_of_real_renders():
    metric = ShapesSoftMetric()
    image = _render(RED_CIRCLE)
    blue = {**RED_CIRCLE, "include": [{"class": "circle", "count": 1, "color": "blue"}]}
    red, wrong = metric.score_tensor(image.repeat(2, 1, 1, 1), ["p", "p"], [RED_CIRCLE, blue]).tolist()
    assert red > 0.75 and wrong < 0.05
    row = {"tag": "position", "include": [{"class": "circle", "count": 1, "color": "red"},
                                          {"class": "square", "count": 1, "color": "blue",
                                           "position": ["left of", 0]}]}
    image = _render(row, seed=1)
    flipped = {**row, "include": [row["include"][0], {**row["include"][1], "position": ["right of", 0]}]}
    right, wrong = metric.score_tensor(image.repeat(2, 1, 1, 1), ["p", "p"], [row, flipped]).tolist()
    assert right > 0.85 and wrong < right - 0.3
    # flipping the relation turns sigmoid(d / T) into 1 - sigmoid(d / T): right + wrong = (2 p1 + 2 p2 + 1) / 3
    presences = [metric.presence(metric.membership((image[0] + 1) / 2, e["color"])) for e in row["include"]]
    assert right + wrong == pytest.approx((2 * float(sum(presences)) + 1) / 3, abs=1e-9)
    # the PIL path scores the same 8-bit image alike
    from soarbench.metrics.pixels import to_pil

    assert metric.score(to_pil(image), ["p"], [row])[0]["score"] == pytest.approx(right, abs=1e-6)


def test_shapes_soft_presence_and_centroid_match_hand_computations():
    metric = ShapesSoftMetric(tau=0.1, area0=0.05)
    x = torch.full((1, 3, 4, 4), 153 / 127.5 - 1, dtype=torch.float64)  # background everywhere
    x[0, :, 0, 0] = torch.tensor([215, 20, 30], dtype=torch.float64) / 127.5 - 1  # one exact red pixel, top left
    row = {"include": [{"class": "circle", "count": 1, "color": "red"}]}
    background_red = np.exp(-np.sum((np.array([153, 153, 153]) - np.array([215, 20, 30])) ** 2 / 255**2) / 0.02)
    area = (1 + 15 * background_red) / 16
    assert float(metric.score_tensor(x, ["p"], [row])) == pytest.approx(1 - np.exp(-area / 0.05), rel=1e-9)
    mask = torch.zeros(4, 4, dtype=torch.float64)
    mask[0, 0], mask[3, 1] = 1.0, 3.0
    assert metric.centroid(mask).tolist() == pytest.approx([(0.125 + 3 * 0.375) / 4, (0.125 + 3 * 0.875) / 4])


def test_shapes_soft_bad_input_is_one_line():
    metric = ShapesSoftMetric()
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(UserError, match="metadata"):
        metric.score_tensor(x, ["p"], None)
    with pytest.raises(UserError, match="did you mean 'red'"):
        metric.score_tensor(x, ["p"], [{"include": [{"class": "circle", "color": "rde"}]}])


def test_clip_type_embeddings_reproduce_score_tensor(tmp_path):
    """img . txt from the new embedding methods equals each metric's own score_tensor (cosine, PickScore's
    logit-scaled cosine, HPS's cosine), and the image side keeps the graph to the pixels."""
    from soarbench.metrics import synthetic
    from soarbench.metrics.clipscore import ClipScoreMetric
    from soarbench.metrics.hpsv2 import HPSv2Metric
    from soarbench.metrics.pickscore import PickScoreMetric

    clip = ClipScoreMetric(model=str(synthetic.write_clip_folder(tmp_path / "clip", "tiny", seed=1)), device="cpu")
    model, processor = synthetic.write_pickscore(tmp_path / "ps", "tiny", seed=2)
    pick = PickScoreMetric(model=str(model), processor=str(processor), device="cpu")
    checkpoint, architecture = synthetic.write_hps(tmp_path / "hps", "tiny", seed=3)
    hps = HPSv2Metric(weights=str(checkpoint), architecture=str(architecture), device="cpu")
    pixels = (torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)
    prompts = ["a red circle", "two blue squares"]
    for metric, factor in ((clip, 1.0), (pick, pick.logit_scale), (hps, 1.0)):
        image = metric.embed_images_tensor(pixels)
        text = metric.embed_texts(prompts)
        assert torch.allclose(image.norm(dim=-1), torch.ones(2), atol=1e-5)
        via_embeddings = factor * (image * text).sum(-1)
        assert torch.allclose(via_embeddings, metric.score_tensor(pixels, prompts), atol=1e-6)
        assert image.requires_grad
    assert clip.relative_scale == pytest.approx(clip.clip.logit_scale / 20) and hps.relative_scale == 1.0


def test_lora_run_with_accumulation_spends_its_plan(tiny_model_dir, shapes_data, tmp_path):
    """A LoRA Direct-Align run over 2 accumulation slots: the meter equals the plan, per step, and the LoRA moved."""
    import json

    from soarbench.harness.train import train

    options = {"num_steps": 2, "guidance": 1.0, "lora": True, "lora_r": 4, "lora_alpha": 8}
    cfg = {"model": {"path": str(tiny_model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(shapes_data)},
           "method": {"name": "direct_align", **options},
           "train": {"seed": 1, "batch_size": 1, "gradient_accumulation_steps": 2, "lr": 1e-2, "threads": 2},
           "budget": {"unit": "optimizer_steps", "amount": 2}}
    train(cfg, tmp_path / "r", log=lambda m: None)
    log = [json.loads(x) for x in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    plan = build_method("direct_align", options).plan(RunShape(1, 2, 1))
    assert plan.micro_batches == 2 and plan.images == 2 and plan.no_grad_fwd == 4 and plan.reward_fwd_bwd == 2
    assert {k: log[-1]["budget"][k] for k in plan.counted()} == {k: 2 * v for k, v in plan.counted().items()}
    assert all("reward_denoise" in row and "loss_denoise" in row for row in log)


def test_cli_refuses_a_non_differentiable_reward_in_one_line(tiny_model_dir, shapes_data, tmp_path, cli):
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{tiny_model_dir}"\nmax_sequence_length = 0\n[data]\njsonl = "{shapes_data}"\n'
                      '[method]\nname = "direct_align"\nrewards = { geneval = 1.0 }\n'
                      '[budget]\nunit = "optimizer_steps"\namount = 1\n')
    code, _, err = cli("train", "--config", config, "--out", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'geneval' is not differentiable" in err


# ------------------------------------------------------------- issue 24: timesteps, words, rounding (reference)
def test_timestep_is_drawn_per_sample_by_global_index_or_once_per_step():
    from soarbench.rng import keyed_generator

    def expected(*key):  # the draw re-implemented here: uniform in [5, 995] from the keyed generator
        return int(torch.randint(5, 996, (1,), generator=keyed_generator(*key)))

    per_sample = build_method("direct_align", {})
    assert per_sample.timestep_per == "sample"
    m = per_sample.draw_m(4, 3, [0, 1, 2, 3])
    assert m.tolist() == [expected(4, 3, "timestep", i) for i in range(4)]
    assert len(set(m.tolist())) > 1  # a step averages several timesteps
    # the same sample draws the same m whichever process holds it (1 process: ids 0..3; 2 processes: 0..1, 2..3)
    assert torch.equal(torch.cat([per_sample.draw_m(4, 3, [0, 1]), per_sample.draw_m(4, 3, [2, 3])]), m)
    per_step = build_method("direct_align", {"timestep_per": "step"})
    assert per_step.draw_m(4, 3, [0, 5, 9]).tolist() == [expected(4, 3, "timestep")] * 3
    with pytest.raises(UserError, match="timestep_per"):
        build_method("direct_align", {"timestep_per": "epoch"})


@contextlib.contextmanager
def sigmas_seen(adapter):
    """The sigma (timestep) input of every velocity call made inside the block, one (B,) float64 row per call."""
    seen = []
    real = adapter.velocity

    def spy(z, sigma, text, net=None):
        seen.append(sigma.detach().cpu().double().reshape(-1))
        return real(z, sigma, text, net)

    adapter.velocity = spy
    try:
        yield seen
    finally:
        adapter.velocity = real


def test_per_sample_branches_use_each_samples_own_sigmas(adapter):
    method = build_method("srpo", {"num_steps": 2, "guidance": 1.0, "rewards": {"clipscore": 1.0}})
    ctx = _ctx(adapter)
    method.reward_fn = _stub_reward({"clipscore": WordEmbed()}, method, ctx.meter)
    method.control_words, method.negative_words = ("Real",), ("Anime",)
    rollouts = method.collect(ctx, Share([0, 1], ["a red circle", "a blue square"], [None, None]))
    rollouts.m = torch.tensor([100, 700])  # two different timesteps in one micro-batch
    rollouts.dj = torch.tensor([gap(100), gap(700)])
    with sigmas_seen(adapter) as seen:
        (micros,) = list(method.updates(ctx, rollouts))
        for micro in micros:
            method.loss(ctx, micro)
    grid = training_grid()
    # the grid by hand: s_hi = g[1000 - m - dj] (denoise), m' = max(m - dj, 1) and s_lo' = g[1000 - m'] (inversion)
    want_denoise = [float(grid[1000 - m - gap(m)]) for m in (100, 700)]
    want_inversion = [float(grid[1000 - max(m - gap(m), 1)]) for m in (100, 700)]
    assert seen[0].tolist() == pytest.approx(want_denoise, abs=1e-7)
    assert seen[1].tolist() == pytest.approx(want_inversion, abs=1e-7)


def test_control_words_follow_the_reference_counter_from_one(adapter):
    method = build_method("srpo", {"num_steps": 1, "guidance": 1.0, "rewards": {"clipscore": 1.0}})
    ctx = _ctx(adapter, unit=0)
    rollouts = method.collect(ctx, Share([0], ["a cat"], [None]))
    # the reference: realism_adjectives[step % 4], cg_oily_adjectives[step % 5] with step = 1 on the first step
    realism = ["Natural-lighting", "Detail", "Detailed", "Real"]
    cg_oily = ["Concept art", "Painting", "Anime", "Flat", "Oil"]
    assert rollouts.words == (realism[1 % 4], cg_oily[1 % 5])
    rollouts = method.collect(_ctx(adapter, unit=4), Share([0], ["a cat"], [None]))
    assert rollouts.words == (realism[5 % 4], cg_oily[5 % 5])


@pytest.mark.parametrize("rounded", [False, True])
def test_model_timestep_is_rounded_as_the_reference_and_the_update_is_not(adapter, rounded):
    method = build_method("direct_align", {"num_steps": 3, "guidance": 1.0, "round_timestep": rounded})
    ctx = _ctx(adapter)
    method.reward_fn = _stub_reward({"shapes_soft": ShapesSoftMetric()}, method, ctx.meter)
    with sigmas_seen(adapter) as seen:
        rollouts = method.collect(ctx, Share([0, 1], [RED_CIRCLE["prompt"]] * 2, [RED_CIRCLE] * 2))
        rollouts.m, rollouts.dj = torch.tensor([123, 871]), torch.tensor([gap(123), gap(871)])
        (micros,) = list(method.updates(ctx, rollouts))
        out = method.loss(ctx, micros[0])

    def ref(sigma):  # the reference's timestep input: int(sigma * 1000) / 1000
        return int(sigma * 1000) / 1000 if rounded else sigma

    rollout_grid = [float(s) for s in shift_sigmas(3.0, 3)][:-1]
    for got, sigma in zip(seen[:3], rollout_grid):
        assert got.tolist() == pytest.approx([ref(sigma)] * len(got), abs=1e-7)
    grid = training_grid()
    s_hi = [float(grid[1000 - m - gap(m)]) for m in (123, 871)]
    assert seen[3].tolist() == pytest.approx([ref(s) for s in s_hi], abs=1e-7)
    if rounded:
        assert seen[3].tolist() != pytest.approx(s_hi, abs=1e-7)  # the rounding did change the model's input
    assert torch.isfinite(out.loss)
    assert method.describe()["round_timestep"] is rounded


def test_one_step_x0_with_per_sample_sigmas_matches_the_scalar_formula():
    torch.manual_seed(0)
    x0, eps, v = (torch.randn(2, 4, 3, 3, dtype=torch.float64) for _ in range(3))
    s_from, s_to = torch.tensor([0.9, 0.8], dtype=torch.float64), torch.tensor([0.85, 0.78], dtype=torch.float64)
    x = noisy(x0, eps, s_from)
    got = one_step_x0(x, v, eps, s_from, s_to)
    for b in range(2):  # x' = x + (s_to - s_from) v; x0_hat = (x' - s_to eps) / (1 - s_to), per sample by hand
        xb = float(s_from[b]) * eps[b] + (1 - float(s_from[b])) * x0[b]
        want = (xb + (float(s_to[b]) - float(s_from[b])) * v[b] - float(s_to[b]) * eps[b]) / (1 - float(s_to[b]))
        assert torch.allclose(got[b], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["srpo", "direct_align"])
def test_sd35m_configs_follow_the_reference_script(name):
    """Tencent-Hunyuan/SRPO at 81e5898, scripts/finetune/SRPO_training_hpsv2.sh, flags copied as written."""
    from pathlib import Path

    from soarbench import config as C

    script = ("--learning_rate 5e-6 --sampling_steps 25 --max_grad_norm 0.1 --weight_decay 0.0001 --shift 3 "
              "--h 720 --groundtruth_ratio 0.9")
    flags = dict(zip(script.split()[::2], (float(v) for v in script.split()[1::2])))
    cfg = C.load_toml(Path(__file__).resolve().parents[1] / "benchmarks" / "sd35m" / f"{name}.toml")
    train_, method = cfg["train"], cfg["method"]
    assert (train_["lr"], train_["grad_clip"], train_["weight_decay"]) == (
        flags["--learning_rate"], flags["--max_grad_norm"], flags["--weight_decay"])
    assert method["num_steps"] == flags["--sampling_steps"] and method["resolution"] == flags["--h"]
    assert method["groundtruth_ratio"] == flags["--groundtruth_ratio"] and method["m_range"] == [5, 995]
    assert method["round_timestep"] is True and method["timestep_per"] == "sample"
    assert method["train_guidance"] == 1.0  # no CFG in the trained step (the reference's rollout: train_guidence 1)
