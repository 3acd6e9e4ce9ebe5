"""LoRA on the micro SD3 transformer: what trains, the reference policy, save/load, merging, and EMA."""
from __future__ import annotations

import copy

import pytest
import torch

from soarbench.errors import UserError
from soarbench.models import SD3Adapter
from soarbench.models.lora import (EMA, adapters_disabled, add_lora, load_lora, lora_parameters, lora_state_dict,
                               merged_copy, save_lora)


def _inputs(adapter):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, *adapter.latent_shape(32, 32), generator=g)
    return z, torch.tensor([0.8, 0.3]), adapter.encode_prompts(["a photo of a red circle", "a photo of a cross"])


def _velocity(adapter, model, inputs):
    with torch.no_grad():
        return adapter.velocity(*inputs, net=model)


def _train_step(adapter, model, inputs, lr=0.5):
    """One SGD step on mean(v^2): enough to move the LoRA B matrices off zero."""
    params = lora_parameters(model)
    optimizer = torch.optim.SGD(params, lr=lr)
    adapter.velocity(*inputs, net=model).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def pristine(tiny_model_dir):
    return SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=0)


@pytest.fixture()
def adapter(pristine):
    """A fresh micro adapter per test (peft changes the transformer in place); copying beats reloading."""
    return copy.deepcopy(pristine)


@pytest.fixture()
def lora(adapter):
    """(adapter, its transformer with the reference LoRA, inputs, the base transformer's output before LoRA)."""
    inputs = _inputs(adapter)
    base_out = _velocity(adapter, None, inputs)
    return adapter, add_lora(adapter.transformer), inputs, base_out


def test_only_lora_trains_and_it_sits_on_the_attention_projections(lora):
    adapter, model, inputs, base_out = lora
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == len(lora_parameters(model))
    wrapped = {n.split(".lora_")[0].split("base_model.model.")[1] for n in trainable}
    # one micro block; as the last block it has no text output projection (to_add_out)
    assert wrapped == {f"transformer_blocks.0.attn.{t}" for t in
                       ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")}
    r, alpha = 32, 64
    module = model.base_model.model.transformer_blocks[0].attn.to_q
    assert module.r["default"] == r and module.scaling["default"] == alpha / r
    assert torch.equal(module.lora_B["default"].weight, torch.zeros_like(module.lora_B["default"].weight))
    assert torch.equal(_velocity(adapter, model, inputs), base_out)  # B = 0: training starts at the base model


def test_disabled_adapters_give_the_base_model_exactly(lora):
    adapter, model, inputs, base_out = lora
    _train_step(adapter, model, inputs)
    tuned = _velocity(adapter, model, inputs)
    assert not torch.allclose(tuned, base_out, atol=1e-4)  # the gradient step moved the policy
    with adapters_disabled(model):
        assert torch.equal(_velocity(adapter, model, inputs), base_out)
    assert torch.equal(_velocity(adapter, model, inputs), tuned)  # and the LoRA is back on
    # peft injects in place: the adapter's own transformer is the LoRA model too
    assert torch.equal(_velocity(adapter, None, inputs), tuned)


def test_a_gradient_step_changes_only_lora_weights(lora):
    adapter, model, inputs, _ = lora
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    _train_step(adapter, model, inputs)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_save_load_round_trip(lora, pristine, tmp_path):
    adapter, model, inputs, _ = lora
    _train_step(adapter, model, inputs)
    tuned = _velocity(adapter, model, inputs)
    save_lora(model, tmp_path / "lora")
    fresh = copy.deepcopy(pristine)
    loaded = load_lora(fresh.transformer, tmp_path / "lora")  # a bare transformer gets the saved LoRA layers
    assert torch.equal(_velocity(fresh, loaded, inputs), tuned)
    state, reloaded = lora_state_dict(model), lora_state_dict(loaded)
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)
    other = add_lora(copy.deepcopy(pristine.transformer), r=4, alpha=8)
    with pytest.raises(UserError, match="do not fit"):
        load_lora(other, tmp_path / "lora")
    with pytest.raises(UserError, match="no LoRA weights"):
        load_lora(other, tmp_path / "missing")


def test_merged_copy_is_a_plain_transformer_with_the_same_output(lora, tmp_path):
    adapter, model, inputs, _ = lora
    _train_step(adapter, model, inputs)
    tuned = _velocity(adapter, model, inputs)
    merged = merged_copy(model)
    assert type(merged) is type(adapter.pipe.transformer)  # e.g. SD3Transformer2DModel: save_pretrained as usual
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_velocity(adapter, merged, inputs), tuned, atol=1e-5)
    assert torch.equal(_velocity(adapter, model, inputs), tuned)  # the LoRA model is untouched
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    assert torch.equal(_velocity(adapter, reloaded, inputs), _velocity(adapter, merged, inputs))


def test_ema_matches_a_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMA([p], decay=0.9, every=1)
    e = torch.tensor([1.0, -2.0])
    for step, value in enumerate(([3.0, 0.0], [-1.0, 4.0], [2.0, 2.0])):
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        assert ema.step(step)
        d = [1 / 10, 2 / 11, 3 / 12][step]  # min((1 + k) / (10 + k), 0.9) while warming up
        e = d * e + (1 - d) * torch.tensor(value)
        assert torch.allclose(ema.shadow[0], e, atol=1e-6)
    assert ema.decay_at(100) == 0.9
    with ema.swap():
        assert torch.equal(p.detach(), ema.shadow[0])
    assert p.tolist() == [2.0, 2.0]
    state = ema.state_dict()
    other = EMA([torch.nn.Parameter(torch.zeros(2))])
    other.load_state_dict(state)
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.every == 1


def test_ema_updates_every_n_steps():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([p], decay=0.9, every=8)
    with torch.no_grad():
        p.fill_(1.0)
    assert [ema.step(k) for k in range(8)] == [False] * 7 + [True]
    assert ema.shadow[0].item() == pytest.approx(1 - 8 / 17)  # step 7: d = min(8 / 17, 0.9)


def test_ema_of_lora_weights(lora):
    adapter, model, inputs, _ = lora
    ema = EMA(lora_parameters(model), every=1)
    _train_step(adapter, model, inputs)
    tuned = _velocity(adapter, model, inputs)
    ema.step(0)  # d = 0.1: the shadow moves 90 % of the way to the trained weights
    with ema.swap():
        averaged = _velocity(adapter, model, inputs)
    assert not torch.equal(averaged, tuned)
    assert torch.equal(_velocity(adapter, model, inputs), tuned)
