"""The group-rollout base (soarbench/methods/group.py) hook by hook on a fake context, without a model or a training
run: its options' checks, the epoch `collect` assembles (gathered rewards, the kept samples shuffled by the epoch's
keyed draw into optimizer steps), the micro-batches `updates` deals, and the PPO step loss in closed form."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from soarbench.errors import UserError
from soarbench.meter import Meter
from soarbench.methods import build_method
from soarbench.methods.base import Ctx, RunShape
from soarbench.methods.group import Epoch, GroupOptions, GroupRollout, trained_timesteps
from soarbench.models.sd3 import TextEmbeddings
from soarbench.rng import keyed_generator


# ---- options ----------------------------------------------------------------------------------------------------
def test_options_take_toml_numbers_as_their_fields_types():
    o = GroupOptions(lora_alpha=64, guidance=1, group_size=2.0, batch_size=4, lora=True)
    assert isinstance(o.lora_alpha, float) and o.lora_alpha == 64.0
    assert isinstance(o.guidance, float) and o.guidance == 1.0
    assert isinstance(o.group_size, int) and o.group_size == 2 and o.lora is True and o.rewards is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.group_size = 3  # frozen: a method cannot change its options under a run


@pytest.mark.parametrize("options, message", [
    ({"group_size": 1}, "group_size must be >= 2 for group-relative advantages, got 1"),
    ({"group_size": 8, "batch_size": 4}, "group_size = 8 is larger than the batch of 4 images per epoch"),
    ({"group_size": 3, "batch_size": 16}, "batch_size = 16 images is not a whole number of groups of 3"),
    ({"optimizer_steps_per_epoch": 3}, "do not split into optimizer_steps_per_epoch = 3"),
])
def test_each_option_problem_is_one_line(options, message):
    with pytest.raises(UserError, match=message) as e:
        GroupOptions(**options)
    assert "\n" not in str(e.value)


def test_each_method_has_its_own_defaults_and_unknown_options_are_refused():
    assert build_method("dance_grpo", {}).opt.group_size == 12  # the reference's groups of 12
    assert build_method("flow_grpo", {}).opt.group_size == 4
    assert build_method("actor_critic", {"group_size": 1}).group_size == 1  # the critic is the baseline
    with pytest.raises(UserError, match="options for 'flow_grpo'.*grop_size"):
        build_method("flow_grpo", {"grop_size": 4})


# ---- one epoch on a fake context --------------------------------------------------------------------------------
class FakeAdapter:
    """Text as a 4-vector per prompt, latents (1, 2, 2), 'decoding' that keeps the latents' mean as the pixels."""

    transformer = torch.nn.Identity()
    device = torch.device("cpu")
    vae = SimpleNamespace(config=SimpleNamespace(sample_size=16))

    def encode_prompts(self, prompts):
        tokens = torch.tensor([[float(len(p)), float(sum(map(ord, p)) % 7), 0.0, 1.0] for p in prompts])
        return TextEmbeddings(tokens[:, None, :], tokens)

    def latent_shape(self, height, width):
        return (1, 2, 2)

    def decode(self, latents):
        return latents.mean(dim=(1, 2, 3))


@dataclass
class Share:
    prompts: list
    ids: list
    groups: list
    metadata: list


class Toy(GroupRollout):
    """A group method whose rollout is its initial noise, rewarded by the noise's mean, dropping group 1."""

    name = "toy_group"
    shared_embeddings = False

    def sample(self, ctx, share, text, noise):
        return noise * 1.0

    def observe(self, ctx, rollout, text):
        return {"text_sum": text.tokens.sum(dim=(1, 2))}

    def advantages(self, ctx, epoch):
        epoch.advantages = epoch.rewards - epoch.rewards.mean()
        epoch.kept = epoch.groups != 1

    def trained_columns(self, ctx, epoch):
        return trained_timesteps(ctx.seed, ctx.unit, range(len(epoch.prompts)), 5, 2)

    def loss(self, ctx, micro):
        raise AssertionError("not trained here")


def _collect(seed=7, unit=3):
    method = Toy(group_size=2, batch_size=6, optimizer_steps_per_epoch=2, num_steps=5, timestep_fraction=0.4,
                 rewards={"shapes_soft": 1.0})  # a registered name; the reward function is a stand-in
    method.reward_fn = lambda pixels, prompts, metadata: (pixels.float(), {"toy": 2 * pixels.float()})
    ctx = Ctx(adapter=FakeAdapter(), roles=None, engine=None, meter=Meter(), sigmas=torch.zeros(1), seed=seed,
              unit=unit, shape=RunShape(1, 2, 1))
    prompts = ["a red circle", "a red circle", "two squares", "two squares", "a cross", "a cross"]
    share = Share(prompts, list(range(6)), [0, 0, 1, 1, 2, 2], [None] * 6)
    epoch = method.collect(ctx, SimpleNamespace(next=lambda c: share))
    return method, ctx, epoch


def test_collect_gathers_the_epoch_and_deals_the_kept_samples_by_the_epochs_keyed_shuffle():
    method, ctx, epoch = _collect()
    assert isinstance(epoch, Epoch) and epoch.traj is None and epoch.embeddings is None
    assert epoch.latents.shape == (6, 1, 2, 2)
    assert torch.equal(epoch.rewards, epoch.latents.mean(dim=(1, 2, 3)))
    assert torch.equal(epoch.scores["toy"], 2 * epoch.rewards)
    assert epoch.logs == {"reward_mean": pytest.approx(float(epoch.rewards.mean())),
                          "reward_toy": pytest.approx(float(2 * epoch.rewards.mean()))}
    assert epoch.extra["text_sum"].shape == (6,)
    # every sample its own start (no init_same_noise): the draws of a group differ
    assert not torch.equal(epoch.latents[0], epoch.latents[1])
    # group 1 (samples 2, 3) dropped; the rest shuffled by randperm keyed (seed, unit, "order"), in 2 steps
    kept = torch.tensor([0, 1, 4, 5])
    order = kept[torch.randperm(4, generator=keyed_generator(7, 3, "order"))]
    assert [b.tolist() for b in epoch.batches] == [order[:2].tolist(), order[2:].tolist()]
    assert torch.equal(epoch.steps, trained_timesteps(7, 3, range(6), 5, 2))


def test_collect_is_a_function_of_the_seed_and_the_epoch():
    a, b, c = _collect()[2], _collect()[2], _collect(unit=4)[2]
    assert torch.equal(a.latents, b.latents) and [x.tolist() for x in a.batches] == [x.tolist() for x in b.batches]
    assert not torch.equal(a.latents, c.latents)


def test_updates_give_one_micro_batch_per_slot_and_trained_column():
    method, ctx, epoch = _collect()
    steps = list(method.updates(ctx, epoch))
    assert len(steps) == 2  # optimizer_steps_per_epoch
    for part, micros in zip(epoch.batches, steps):
        assert len(micros) == ctx.shape.accumulation * epoch.steps.shape[1]  # 2 slots x 2 columns
        for micro in micros:
            ep, idx, row, text, column = micro.data
            assert ep is epoch and micro.weight == len(idx) == 1 and torch.equal(idx, row)
            assert int(idx) in part.tolist() and 0 <= column < 2
            assert torch.equal(text.tokens, FakeAdapter().encode_prompts([epoch.prompts[int(idx)]]).tokens)
        dealt = sorted(int(m.data[1]) for m in micros[::2])
        assert dealt == sorted(part.tolist())  # each of the step's samples in exactly one slot


# ---- the PPO step loss in closed form ---------------------------------------------------------------------------
def test_ppo_step_on_policy_is_minus_the_advantage_and_no_kl(adapter):
    """Recomputed under the weights that sampled the trajectory, every ratio is exactly 1: the per-sample loss is
    -A (the clip is inactive) and the KL to the same weights is 0."""
    from soarbench.rl.ppo import ppo_step
    from soarbench.rl.rollout import sde_rollout

    text = adapter.encode_prompts(["a photo of a red circle", "a photo of two squares"])
    noise = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
    traj = sde_rollout(adapter, text, noise, num_steps=3, guidance=2.0, noise_level=0.7,
                       generator=torch.Generator().manual_seed(4))
    advantages = torch.tensor([0.5, -1.5])
    step = ppo_step(adapter, traj, 1, text, 2.0, advantages, clip_range=1e-4, beta=0.04,
                    policy=adapter.velocity, reference=adapter.velocity)
    assert torch.equal(step.policy.ratio, torch.ones(2))
    assert torch.allclose(step.total, -advantages) and torch.equal(step.kl, torch.zeros(2))
    assert ppo_step(adapter, traj, 1, text, 2.0, advantages, clip_range=1e-4).kl is None  # beta 0: no reference pass
