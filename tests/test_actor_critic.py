"""The reconstructed actor-critic (soarbench/methods/actor_critic.py): the value loss, critic advantages, the
per-reward heads, value-gradient steering, meter == plan in both phases, checkpoints and bad input."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from soarbench.errors import UserError
from soarbench.harness.train import train
from soarbench.methods import build_method
from soarbench.methods.actor_critic import ActorCritic, Epoch, critic_advantages
from soarbench.methods.base import Micro, RunShape
from soarbench.metrics.base import Metric, MetricInfo
from soarbench.metrics.registry import METRICS
from soarbench.models.value_head import ValueHead, ValueSteering, backbone_features, feature_dim, load_steering
from soarbench.sampling.ode import euler_sample, sampling_sigmas

class Brightness(Metric):
    """A second reward for the multi-head tests."""

    info = MetricInfo(name="ac_brightness", version="1", scale="mean pixel value in [0, 1]")

    def score(self, images, prompts, metadata=None):
        return [{"score": float(np.asarray(im, dtype=np.float32).mean() / 255)} for im in images]


METRICS.add("ac_brightness", f"{__name__}:Brightness")

OPTIONS = {"group_size": 2, "batch_size": 4, "num_steps": 3, "rewards": {"shapes_soft": 1.0}, "lora_r": 4,
           "lora_alpha": 8, "ema_every": 1, "optimizer_steps_per_epoch": 1}


# ---- pure pieces ---------------------------------------------------------------------------------------------
def test_advantages_from_a_hand_made_value_table():
    # 2 samples, 2 steps, 2 rewards with weights 1 and 0.5
    rewards = torch.tensor([[1.0, 4.0], [0.0, 2.0]])
    values = torch.tensor([[[0.5, 2.0], [1.0, 4.0]],
                           [[0.5, 0.0], [-1.0, 2.0]]])
    weights = torch.tensor([1.0, 0.5])
    # raw A[n, t] = (R_1 - V_1) + 0.5 (R_2 - V_2), by hand
    raw = np.array([[0.5 + 1.0, 0.0 + 0.0], [-0.5 + 1.0, 1.0 + 0.0]])
    expected = raw / (raw.std() + 1e-4)  # population std over all 4 entries, no mean removed
    got = critic_advantages(rewards, values, weights, clip=5.0)
    assert got.shape == (2, 2)
    assert np.allclose(got.numpy(), expected, atol=1e-5)
    # the clip
    clipped = critic_advantages(rewards, values, weights, clip=0.5)
    assert np.allclose(clipped.numpy(), np.clip(expected, -0.5, 0.5), atol=1e-6)


def _constant_head(biases):
    """A hand-made head: every output layer's weight 0, so V_k = biases[k] for any input."""
    head = ValueHead(list(biases), feature_dim=6, width=4)
    with torch.no_grad():
        for name, b in biases.items():
            head.heads[name].weight.zero_()
            head.heads[name].bias.fill_(b)
    return head


def test_value_loss_on_a_hand_made_batch():
    method = ActorCritic(**{**OPTIONS, "rewards": {"shapes_soft": 1.0, "ac_brightness": 0.5},
                            "value_loss_weight": 2.0, "critic": "head"})
    method.head = _constant_head({"shapes_soft": 0.25, "ac_brightness": -1.0})
    targets = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, -1.0]])  # 3 samples x 2 rewards
    epoch = Epoch(prompts=[], groups=torch.arange(3), rewards=torch.zeros(3), scores={}, embeddings={},
                  steps=torch.zeros(3, 2, dtype=torch.long), advantages=torch.zeros(3, 2), train_policy=False,
                  extra={"features": torch.randn(3, 2, 6), "targets": targets})
    row = torch.tensor([0, 2])
    for world in (1, 2):
        out = method.loss(SimpleNamespace(world_size=world), Micro((epoch, row[:1], row, None, 1), 1.0))
        # by hand: rows 0 and 2, (0.25 - R_1)^2 + (-1 - R_2)^2
        sq = [(0.25 - 1.0) ** 2 + (-1.0 - 0.0) ** 2, (0.25 - 0.0) ** 2 + (-1.0 + 1.0) ** 2]
        assert math.isclose(float(out.loss.detach()), 2.0 * sum(sq) / world, rel_tol=1e-6)
        total, count = out.logs["value_loss"]
        assert math.isclose(total * world, sum(sq), rel_tol=1e-6) and count * world == 2
        assert math.isclose(out.logs["value_loss_shapes_soft"][0] * world, 0.75**2 + 0.25**2, rel_tol=1e-6)
        assert "policy_loss" not in out.logs  # phase 1: no policy term


def test_one_output_per_reward_and_heads_train_independently():
    torch.manual_seed(0)
    head = ValueHead(["shapes_soft", "ac_brightness"], feature_dim=6, width=8)
    x = torch.randn(5, 6)
    assert head(x).shape == (5, 2)
    loss = (head(x)[:, 0] - 1.0).pow(2).sum()  # the first reward's head only
    loss.backward()
    assert head.heads["shapes_soft"].weight.grad.abs().sum() > 0
    other = head.heads["ac_brightness"]
    # no gradient reaches another head's output layer (exact zeros through the concatenation)
    assert all(g is None or not g.any() for g in (other.weight.grad, other.bias.grad))
    # and a head's output does not depend on another head's output layer
    before = head(x)[:, 0].detach().clone()
    with torch.no_grad():
        other.weight.add_(1.0)
    assert torch.equal(head(x)[:, 0], before)


def test_unknown_reward_for_a_head_is_one_line():
    with pytest.raises(UserError, match=r"^unknown reward for a value head 'shapes_sofft'.*did you mean 'shapes_soft'"):
        ValueHead(["shapes_sofft"], feature_dim=4)


def test_version_says_reconstructed():
    method = build_method("actor_critic", dict(OPTIONS))
    assert "reconstructed" in method.version and method.describe()["version"] == method.version


# ---- features and steering -----------------------------------------------------------------------------------
def _hand_head(adapter, seed=0):
    torch.manual_seed(seed)
    return ValueHead(["shapes_soft"], feature_dim(adapter.transformer.config), width=8).eval()


def test_features_come_from_norm_out_and_are_counted(adapter):
    from soarbench.meter import Meter

    adapter.meter = Meter()
    text = adapter.encode_prompts(["a red circle", "a blue square"])
    z = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    f = backbone_features(adapter, adapter.transformer, z, torch.tensor([0.7]), text)
    assert f.shape == (2, feature_dim(adapter.transformer.config))
    # independently: norm_out's inputs via a hook-free recomputation of the transformer's temb
    t = adapter.transformer
    temb = t.time_text_embed(torch.full((2,), 700.0), text.pooled)
    assert torch.allclose(f[:, f.shape[1] // 2:], temb, atol=1e-5)
    assert adapter.meter.counts["value_passes"] == 2 and adapter.meter.counts["no_grad_fwd"] == 0  # grad enabled
    assert adapter.meter.counts["fwd_bwd"] == 2


def test_steering_gradient_matches_a_finite_difference(adapter):
    steering = ValueSteering(adapter, adapter.transformer, _hand_head(adapter), scale=1.0)
    text = adapter.encode_prompts(["a red circle"])
    z = torch.randn(1, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.6])
    g = steering.gradient(z, sigma, text)
    d = g / g.norm()
    h = 1e-2

    def value(x):
        with torch.no_grad():
            return float(steering.head.weighted(backbone_features(adapter, adapter.transformer, x, sigma, text)))

    slope = (value(z + h * d) - value(z - h * d)) / (2 * h)
    assert slope > 0 and math.isclose(slope, float(g.norm()), rel_tol=5e-2)  # the value grows along it


def test_steering_moves_the_first_step_along_the_value_gradient(adapter):
    scale = 3.0
    steering = ValueSteering(adapter, adapter.transformer, _hand_head(adapter), scale=scale)
    text = adapter.encode_prompts(["a red circle", "two green triangles"])
    noise = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(3))
    seen = {}

    def recorder(name, push):
        def steer(z, sigma, text_):
            seen.setdefault(name, []).append(z.clone())
            return push(z, sigma, text_) if len(seen[name]) == 1 else torch.zeros_like(z)
        return steer

    with torch.no_grad():
        euler_sample(adapter, text, noise, num_steps=3, guidance=2.0,
                     steer=recorder("plain", lambda z, s, t: torch.zeros_like(z)))
        euler_sample(adapter, text, noise, num_steps=3, guidance=2.0, steer=recorder("steered", steering))
        plain = euler_sample(adapter, text, noise, num_steps=3, guidance=2.0)
    sig = sampling_sigmas(adapter.scheduler_config, 3)
    dt = float(sig[1] - sig[0])
    expected = scale * abs(dt) * steering.gradient(noise, sig[:1], text)
    assert expected.abs().max() > 1e-4
    assert torch.allclose(seen["steered"][1] - seen["plain"][1], expected, atol=1e-5, rtol=1e-4)
    # a steer that adds zeros is the plain sampler exactly
    with torch.no_grad():
        zeros = euler_sample(adapter, text, noise, num_steps=3, guidance=2.0,
                             steer=lambda z, s, t: torch.zeros_like(z))
    assert torch.equal(zeros, plain)


# ---- training runs -------------------------------------------------------------------------------------------
def _cfg(model, data, units, **method):
    return {"model": {"path": str(model), "max_sequence_length": 0}, "data": {"jsonl": str(data)},
            "method": {"name": "actor_critic", **OPTIONS, **method},
            "train": {"seed": 4, "batch_size": 2, "lr": 1e-3, "threads": 2},
            "budget": {"unit": "optimizer_steps", "amount": units},
            "eval": {"benchmark": "shapes", "points": 1, "num_steps": 2, "batch_size": 4,
                     "benchmark_options": {"n_per_tag": 1}}}


@pytest.fixture(scope="module")
def run(tiny_model_dir, shapes_data, tmp_path_factory):
    """One value pre-training epoch, then two PPO epochs (one optimizer step each), evaluated at the end."""
    out = tmp_path_factory.mktemp("ac") / "run"
    train(_cfg(tiny_model_dir, shapes_data, 3, value_pretrain_units=1), out, log=lambda m: None)
    return out


def test_meter_equals_plan_in_both_phases(run):
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1.0, 2.0, 2.0]
    method = build_method("actor_critic", {**OPTIONS, "value_pretrain_units": 1})
    shape = RunShape(1, 1, 2)
    spent = {k: 0 for k in method.plan(shape).counted()}
    for unit, row in enumerate(rows):
        for k, v in method.unit_plan(shape, unit).counted().items():
            spent[k] += v
        assert {k: row["budget"][k] for k in spent} == spent, unit
    one, two = method.unit_plan(shape, 0), method.unit_plan(shape, 1)
    assert two == method.plan(shape)
    # by hand (the default diffusion critic), 4 images x 2 trained states: the critic's values before the updates
    # (no-grad) and its value loss (forward+backward), in both phases
    assert one.fwd_bwd == 4 * 2 and one.value_passes == two.value_passes == 4 * 2 + 4 * 2
    # phase 2: 4 images x 3 steps x CFG 2 rollout + 4 x 2 critic states + 4 x 2 x 2 KL forwards; 4 x 2 x 2 PPO
    assert two.no_grad_fwd == 4 * 3 * 2 + 8 + 16 and two.fwd_bwd == 16 + 8
    assert "policy_loss" not in rows[0] and "policy_loss" in rows[1] and "value_loss" in rows[0]
    # the recorded options: the critic in the method version, its passes in the recorded unit cost
    record = json.loads((run / "run.json").read_text())
    assert record["method_version"].endswith("; critic = diffusion")
    assert record["budget"]["per_unit"]["fwd_bwd"] == 24 and record["budget"]["per_unit"]["value_passes"] == 16


def test_the_head_critic_costs_what_it_did(tiny_model_dir, shapes_data, tmp_path):
    """critic = "head": no critic backward; meter == unit_plan epoch by epoch; no critic weights are saved."""
    out = tmp_path / "head"
    cfg = _cfg(tiny_model_dir, shapes_data, 2, value_pretrain_units=1, critic="head")
    del cfg["eval"]
    train(cfg, out, log=lambda m: None)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    method = build_method("actor_critic", {**OPTIONS, "value_pretrain_units": 1, "critic": "head"})
    shape = RunShape(1, 1, 2)
    # by hand, cumulative: phase 1 = 24 rollout + 8 feature forwards, no backward; phase 2 the same and 16 KL
    # forwards, 16 PPO fwd_bwd
    expected = [{"no_grad_fwd": 32, "fwd_bwd": 0, "value_passes": 8},
                {"no_grad_fwd": 32 + 48, "fwd_bwd": 16, "value_passes": 16}]
    planned = {k: 0 for k in expected[0]}
    for unit, (row, hand) in enumerate(zip(rows, expected)):
        assert {k: row["budget"][k] for k in hand} == hand
        planned = {k: planned[k] + getattr(method.unit_plan(shape, unit), k) for k in planned}
        assert planned == hand
    assert json.loads((out / "run.json").read_text())["method_version"].endswith("; critic = head")
    ckpt = out / "checkpoints" / "step_000002" / "value_head"
    assert json.loads((ckpt / "value_head.json").read_text())["backbone"] == "reference"
    assert not (ckpt / "critic_lora").exists() and not (ckpt / "critic_transformer").exists()


def test_phase_one_leaves_the_policy_alone(tiny_model_dir, shapes_data, tmp_path):
    from soarbench.models import SD3Adapter

    out = tmp_path / "p1"
    cfg = _cfg(tiny_model_dir, shapes_data, 1, value_pretrain_units=1, ema=False)  # the live weights are saved
    del cfg["eval"]
    train(cfg, out, log=lambda m: None)
    base = SD3Adapter.from_pretrained(tiny_model_dir).transformer.state_dict()
    after = SD3Adapter.from_pretrained(out / "checkpoints" / "step_000001").transformer.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)  # the critic's adapter is not merged into it
    head = json.loads((out / "checkpoints" / "step_000001" / "value_head" / "value_head.json").read_text())
    assert head["rewards"] == ["shapes_soft"] and head["backbone"] == "critic_lora"
    # while the critic's own LoRA trained (B starts at 0)
    from safetensors.torch import load_file

    lora = load_file(out / "checkpoints" / "step_000001" / "value_head" / "critic_lora" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())


def test_version_and_value_head_reach_the_records(run):
    assert "reconstructed" in json.loads((run / "run.json").read_text())["method_version"]
    ckpt = run / "checkpoints" / "step_000003"
    record = json.loads((ckpt / "soarbench_checkpoint.json").read_text())
    assert "reconstructed" in record["method_version"] and "value_head" in record["components"]
    assert (ckpt / "value_head" / "value_head.safetensors").is_file()
    summary = json.loads((run / "evals" / "step_000003" / "shapes" / "summary.json").read_text())
    assert "reconstructed" in summary["model"]["method_version"]


def test_steer_zero_is_plain_sampling_and_is_recorded(run, tmp_path):
    from soarbench.benchmarks import build_benchmark
    from soarbench.evaluate import evaluate
    from soarbench.models import SD3Adapter

    ckpt = run / "checkpoints" / "step_000003"
    adapter = SD3Adapter.from_pretrained(ckpt, max_sequence_length=0)
    bench = build_benchmark("shapes", n_per_tag=1)
    kw = dict(num_steps=2, batch_size=4, metric_names=["shapes_soft"])
    plain = evaluate(adapter, bench, tmp_path / "plain", **kw)
    zero = evaluate(adapter, bench, tmp_path / "zero", steering=load_steering(ckpt, adapter, 0.0), **kw)
    images = sorted(p.name for p in (tmp_path / "plain" / "images").iterdir())
    assert images and all((tmp_path / "plain" / "images" / n).read_bytes() == (tmp_path / "zero" / "images" / n)
                          .read_bytes() for n in images)
    assert plain["scores"] == zero["scores"] and zero["sampling"]["steer"] == {"value": 0.0,
                                                                             "weights": {"shapes_soft": 1.0}}
    assert "steer" not in plain["sampling"]
    settings = json.loads((tmp_path / "zero" / "settings.json").read_text())
    assert settings["steer"]["value"] == 0.0
    with pytest.raises(UserError, match=r"holds an eval with steer = .*choose another --out"):
        evaluate(adapter, bench, tmp_path / "zero", steering=load_steering(ckpt, adapter, 2.0), **kw)
    steered = evaluate(adapter, bench, tmp_path / "two", steering=load_steering(ckpt, adapter, 50.0), **kw)
    assert any((tmp_path / "plain" / "images" / n).read_bytes() != (tmp_path / "two" / "images" / n).read_bytes()
               for n in images)
    assert steered["sampling"]["steer"]["value"] == 50.0


def test_bad_steering_input_is_one_line(run, tiny_model_dir, cli, tmp_path):
    code, _, err = cli("eval", "--model", tiny_model_dir, "--benchmark", "shapes", "--steps", "1",
                       "--steer", "value=1.0", "--out", tmp_path / "a")
    assert code == 2 and len(err.splitlines()) == 1
    assert str(tiny_model_dir) in err and "has no value head" in err
    ckpt = run / "checkpoints" / "step_000003"
    code, _, err = cli("eval", "--model", ckpt, "--benchmark", "shapes", "--steps", "1",
                       "--steer", "value=1.0,geneval=2", "--out", tmp_path / "b")
    assert code == 2 and len(err.splitlines()) == 1 and "no head for reward 'geneval'" in err
    code, _, err = cli("eval", "--model", ckpt, "--benchmark", "shapes", "--steer", "scale=1", "--out", tmp_path / "c")
    assert code == 2 and len(err.splitlines()) == 1 and "value=SCALE" in err


# ---- the diffusion critic (critic = "diffusion", the default) ------------------------------------------------
def _lora_setup(adapter, **options):
    """ActorCritic.setup on the tiny adapter outside the loop (one process, no engine)."""
    from soarbench.meter import Meter
    from soarbench.methods.base import Ctx
    from soarbench.models.roles import Roles

    torch.manual_seed(0)
    method = ActorCritic(**{**OPTIONS, **options})
    ctx = Ctx(adapter=adapter, roles=Roles(adapter), engine=None, meter=Meter(), sigmas=torch.linspace(1, 0, 1000))
    adapter.meter = ctx.meter
    groups = method.setup(ctx)
    return method, ctx, groups


def _merged_by_hand(base_state, named, adapter_tag, scale):
    """The base weights with one LoRA adapter folded in by hand: W + scale * B @ A per targeted layer."""
    out = {k: v.clone() for k, v in base_state.items()}
    for name, a in named.items():
        if f".lora_A{adapter_tag}weight" not in name:
            continue
        b = named[name.replace(".lora_A", ".lora_B")]
        layer = name.removeprefix("base_model.model.").split(".lora_A")[0]
        out[layer + ".weight"] = out[layer + ".weight"] + scale * b.detach() @ a.detach()
    return out


def _plain(tiny_model_dir, state):
    from soarbench.models import SD3Adapter

    net = SD3Adapter.from_pretrained(tiny_model_dir).transformer
    net.load_state_dict(state)
    return net.requires_grad_(False)


def test_the_critic_is_a_lora_of_its_own(adapter, tiny_model_dir):
    from soarbench.models import SD3Adapter
    from soarbench.models import lora as L

    base = SD3Adapter.from_pretrained(tiny_model_dir).transformer.state_dict()
    method, ctx, groups = _lora_setup(adapter)
    assert [g.name for g in groups] == ["policy", "value", "critic"]
    peft = L.peft_model(ctx.roles.base)
    named = dict(peft.named_parameters())
    critic = {id(p) for p in groups[2].params}
    assert critic == {id(p) for n, p in named.items() if "lora_" in n and ".critic." in n}
    assert not critic & {id(p) for p in groups[0].params} and len(critic) == len(groups[0].params)
    torch.manual_seed(1)
    with torch.no_grad():  # both adapters away from B = 0, so that each one changes its network
        for n, p in named.items():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    scale = OPTIONS["lora_alpha"] / OPTIONS["lora_r"]
    text = adapter.encode_prompts(["a red circle", "a blue square"])
    z = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor([0.6, 0.3])
    with torch.no_grad():
        with method._backbone(ctx) as net:
            got = backbone_features(adapter, net, z, sigma, text)
        expected = backbone_features(adapter, _plain(tiny_model_dir, _merged_by_hand(base, named, ".critic.", scale)),
                                     z, sigma, text)
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(method.critic_values(ctx, z, sigma, text), method.head(expected), atol=1e-5)
        # the policy still computes with its own adapter alone
        policy = ctx.roles.velocity(z, sigma, text)
        by_hand = _plain(tiny_model_dir, _merged_by_hand(base, named, ".default.", scale))
        assert torch.allclose(policy, adapter.velocity(z, sigma, text, by_hand), atol=1e-5)
        assert not torch.allclose(got, backbone_features(adapter, by_hand, z, sigma, text), atol=1e-3)
    # the value loss reaches the critic's adapter and the head, never the policy's adapter or the base
    method.critic_values(ctx, z, sigma, text).sum().backward()
    assert all(p.grad is not None for p in groups[2].params + groups[1].params)  # each one, as DDP needs
    # nonzero for all but the last block's text queries, which that block (context_pre_only) discards
    last = f"transformer_blocks.{adapter.transformer.config.num_layers - 1}.attn.add_q_proj."
    names = {id(p): n for n, p in named.items()}
    assert all(p.grad.abs().max() > 0 for p in groups[2].params + groups[1].params if last not in names.get(id(p), ""))
    assert all(p.grad is None for p in groups[0].params)
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n)
    assert all(p.requires_grad for p in groups[0].params + groups[2].params)  # the flags are as they were


def test_the_critic_backpropagates_correctly_under_gradient_checkpointing(adapter):
    """Checkpointed blocks are recomputed in the backward, when the policy's adapter is active again: the critic's
    gradient must still be its own (the same as without checkpointing), and the policy's beside it unchanged."""
    from soarbench.models import lora as L

    method, ctx, groups = _lora_setup(adapter)
    named = dict(L.peft_model(ctx.roles.base).named_parameters())
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in named.items():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    text = adapter.encode_prompts(["a red circle", "two green triangles"])
    z = torch.randn(2, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.7, 0.4])
    trained = groups[0].params + groups[2].params

    def grads(critic_call):
        for p in trained:
            p.grad = None
        policy = ctx.roles.velocity(z, sigma, text).pow(2).mean()  # a phase-2 micro-batch: policy, then critic
        (policy + critic_call().sum()).backward()
        return [p.grad.clone() for p in trained]

    plain = grads(lambda: method.critic_values(ctx, z, sigma, text))
    adapter.transformer.enable_gradient_checkpointing()
    try:
        checkpointed = grads(lambda: method.critic_values(ctx, z, sigma, text))
        peft = L.peft_model(ctx.roles.base)

        def naive():  # the critic's adapter switched for the forward only
            from soarbench.models.value_head import lora_adapter_active

            with lora_adapter_active(peft, "critic"):
                return method._critic(ctx)(z, sigma, text)

        wrong = grads(naive)
    finally:
        adapter.transformer.disable_gradient_checkpointing()
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(plain, checkpointed))
    # without the recomputation's switch the critic's gradient would be another one (the control)
    critic = slice(len(groups[0].params), None)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(plain[critic], wrong[critic]))


def test_the_critic_adapter_is_part_of_the_resumable_state(adapter):
    from soarbench.models import lora as L

    method, ctx, groups = _lora_setup(adapter)
    state = ctx.roles.state_dict()
    assert {n for n in state["lora"] if ".critic." in n} == {n for n, _ in L.peft_model(ctx.roles.base)
                                                              .named_parameters() if "lora_" in n and ".critic." in n}
    saved = [p.detach().clone() for p in groups[2].params]
    with torch.no_grad():
        for p in groups[2].params:
            p.add_(1.0)
    ctx.roles.load_state_dict(state)
    assert all(torch.equal(p, s) for p, s in zip(groups[2].params, saved))


def test_steering_reads_the_critics_own_backbone(run, tiny_model_dir):
    """The checkpoint's critic LoRA, merged by hand into the base, gives the features steering computes."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    from soarbench.models import SD3Adapter

    folder = run / "checkpoints" / "step_000003" / "value_head"
    assert json.loads((folder / "value_head.json").read_text())["backbone"] == "critic_lora"
    lora = load_file(folder / "critic_lora" / "adapter_model.safetensors")
    config = LoraConfig.from_pretrained(str(folder / "critic_lora"))
    assert (config.r, config.lora_alpha) == (OPTIONS["lora_r"], OPTIONS["lora_alpha"])
    base = SD3Adapter.from_pretrained(tiny_model_dir).transformer.state_dict()
    by_hand = _plain(tiny_model_dir, _merged_by_hand(base, lora, ".", config.lora_alpha / config.r))
    adapter = SD3Adapter.from_pretrained(run / "checkpoints" / "step_000003", max_sequence_length=0)
    steering = load_steering(run / "checkpoints" / "step_000003", adapter, 1.0)
    text = adapter.encode_prompts(["a red circle"])
    z = torch.randn(1, *adapter.latent_shape(32, 32), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = backbone_features(adapter, steering.backbone, z, torch.tensor([0.5]), text)
        expected = backbone_features(adapter, by_hand, z, torch.tensor([0.5]), text)
        reference = backbone_features(adapter, _plain(tiny_model_dir, base), z, torch.tensor([0.5]), text)
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, reference, atol=1e-4)


def test_full_finetuning_trains_a_copy_as_the_critic(tiny_model_dir, shapes_data, tmp_path):
    """lora = false: the critic is a trainable copy of the initial transformer (norm_out and proj_out, which the
    features do not read, stay frozen); meter == unit_plan; steering loads the copy."""
    from diffusers import SD3Transformer2DModel

    from soarbench.models import SD3Adapter

    out = tmp_path / "full"
    options = {"value_pretrain_units": 1, "lora": False, "beta": 0.0, "ema": False}
    cfg = _cfg(tiny_model_dir, shapes_data, 2, **options)
    del cfg["eval"]
    cfg["train"]["lr"] = 1e-4
    train(cfg, out, log=lambda m: None)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    method = build_method("actor_critic", {**OPTIONS, **options})
    shape = RunShape(1, 1, 2)
    one, two = method.unit_plan(shape, 0), method.unit_plan(shape, 1)
    # by hand: 8 critic fwd_bwd per epoch, 16 PPO fwd_bwd in phase 2, no KL (beta 0)
    assert (one.fwd_bwd, two.fwd_bwd, two.no_grad_fwd) == (8, 24, 24 + 8)
    for row, cumulative in zip(rows, (one.counted(), {k: v + two.counted()[k] for k, v in one.counted().items()})):
        assert {k: row["budget"][k] for k in cumulative} == cumulative
    ckpt = out / "checkpoints" / "step_000002"
    base = SD3Adapter.from_pretrained(tiny_model_dir).transformer.state_dict()
    critic = SD3Transformer2DModel.from_pretrained(ckpt / "value_head" / "critic_transformer").state_dict()
    frozen = [k for k in base if k.startswith(("norm_out.", "proj_out."))]
    assert frozen and all(torch.equal(base[k], critic[k]) for k in frozen)
    assert any(not torch.equal(base[k], critic[k]) for k in base if k not in frozen)
    policy = SD3Adapter.from_pretrained(ckpt).transformer.state_dict()
    assert any(not torch.equal(policy[k], critic[k]) for k in base)  # two different networks
    adapter = SD3Adapter.from_pretrained(ckpt, max_sequence_length=0)
    loaded = load_steering(ckpt, adapter, 1.0).backbone.state_dict()
    assert all(torch.equal(loaded[k], critic[k]) for k in critic)


def test_bad_critic_option_is_one_line():
    with pytest.raises(UserError, match=r"critic must be \"diffusion\" .* got 'value'"):
        ActorCritic(**{**OPTIONS, "critic": "value"})
    with pytest.raises(UserError, match=r"critic_lr must be > 0"):
        ActorCritic(**{**OPTIONS, "critic_lr": 0.0})
