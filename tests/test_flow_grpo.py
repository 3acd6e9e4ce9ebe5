"""Flow-GRPO in the harness: counters equal the config's arithmetic, checkpoints load, bad configs are refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from soarbench.errors import UserError
from soarbench.harness.train import train
from soarbench.metrics.base import Metric, MetricInfo
from soarbench.metrics.registry import METRICS
from soarbench.models import SD3Adapter


class Brightness(Metric):
    """A hand-made reward that varies from image to image, so that no group is dropped."""

    info = MetricInfo(name="test_brightness", version="1", scale="mean pixel value in [0, 1]")

    def score(self, images, prompts, metadata=None):
        return [{"score": float(np.asarray(im, dtype=np.float32).mean() / 255)} for im in images]


METRICS.add("test_brightness", f"{__name__}:Brightness")


def _cfg(model_dir, data, **method):
    return {"model": {"path": str(model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(data)},
            "method": {"name": "flow_grpo", "group_size": 2, "batch_size": 4, "num_steps": 3,
                       "rewards": {"test_brightness": 1.0}, "lora_r": 4, "lora_alpha": 8, "ema_every": 1,
                       **method},
            "train": {"seed": 1, "lr": 1e-3, "threads": 2},
            "budget": {"unit": "optimizer_steps", "amount": 4}}


def test_counters_equal_the_arithmetic(tiny_model_dir, shapes_data, tmp_path):
    train(_cfg(tiny_model_dir, shapes_data), tmp_path / "r", log=lambda m: None)
    log = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["kept_fraction"] == 1.0 for r in log)
    epochs, n, T, K = 2, 4, 3, int(3 * 0.99)
    b = log[-1]["budget"]
    assert b["images"] == epochs * n and b["reward_calls"] == epochs * n
    assert b["fwd_bwd"] == epochs * n * K * 2  # CFG counts double
    assert b["no_grad_fwd"] == epochs * (n * T * 2 + n * K * 2)  # rollouts + reference forwards for the KL
    assert b["optimizer_steps"] == 4 and b["unique_prompts"] <= 4
    ckpt = SD3Adapter.from_pretrained(tmp_path / "r" / "checkpoints" / "step_000004")
    assert "lora" not in json.dumps([n for n, _ in ckpt.transformer.named_parameters()])


def test_unknown_reward_name_suggests_the_nearest(tiny_model_dir, shapes_data, tmp_path):
    with pytest.raises(UserError, match="did you mean 'geneval'"):
        train(_cfg(tiny_model_dir, shapes_data, rewards={"genevall": 1.0}), tmp_path / "r", log=lambda m: None)


def test_group_of_one_is_refused(tiny_model_dir, shapes_data, tmp_path):
    with pytest.raises(UserError, match="group_size must be >= 2"):
        train(_cfg(tiny_model_dir, shapes_data, group_size=1), tmp_path / "r", log=lambda m: None)


def test_group_larger_than_the_batch_is_refused(tiny_model_dir, shapes_data, tmp_path):
    with pytest.raises(UserError, match="group_size = 8 is larger than the batch of 4 images"):
        train(_cfg(tiny_model_dir, shapes_data, group_size=8), tmp_path / "r", log=lambda m: None)


def test_budget_below_one_epoch_is_refused(tiny_model_dir, shapes_data, tmp_path):
    cfg = _cfg(tiny_model_dir, shapes_data)
    cfg["budget"] = {"unit": "fwd_bwd", "amount": 10}  # one epoch costs 4 images x 2 steps x 2 (CFG) = 16
    with pytest.raises(UserError, match="cannot buy one whole step"):
        train(cfg, tmp_path / "r", log=lambda m: None)


@pytest.mark.parametrize("method", [{"lora": False}, {"sde_window": 2, "num_steps": 4, "cfg_train": False}])
def test_full_finetune_and_fast_window_counters(tiny_model_dir, shapes_data, tmp_path, method):
    train(_cfg(tiny_model_dir, shapes_data, **method), tmp_path / "r", log=lambda m: None)
    b = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()][-1]["budget"]
    T = method.get("num_steps", 3)
    K = method.get("sde_window") or int(T * 0.99)
    train_cfg = 1 if method.get("cfg_train") is False else 2
    assert b["fwd_bwd"] == 2 * 4 * K * train_cfg
    assert b["no_grad_fwd"] == 2 * (4 * T * 2 + 4 * K * train_cfg)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_first_step_of_an_epoch_is_exactly_on_policy(tiny_model_dir, shapes_data, tmp_path, precision):
    """Before the epoch's first update the recomputed log-probs equal the rollout's: ratio exactly 1, also under
    bf16 autocast (rollout and training share the epoch's prompt embeddings and precision)."""
    cfg = _cfg(tiny_model_dir, shapes_data)
    cfg["train"]["mixed_precision"] = precision
    cfg["budget"] = {"unit": "optimizer_steps", "amount": 2}
    train(cfg, tmp_path / "r", log=lambda m: None)
    first, second = [json.loads(line) for line in (tmp_path / "r" / "train_log.jsonl").read_text().splitlines()]
    assert first["approx_kl"] == 0.0 and first["clipfrac"] == 0.0
    assert second["approx_kl"] > 0.0  # the second step sees the updated policy


@pytest.mark.parametrize("same", [False, True])
def test_init_same_noise_gives_a_group_one_start(tiny_model_dir, shapes_data, tmp_path, monkeypatch, same):
    """The reference draws each sample's start on its own; init_same_noise shares one per group (DanceGRPO's
    draw), so a group's rewards differ only by the SDE noise the loss credits."""
    import torch

    import soarbench.methods.group as fg  # Flow-GRPO's rollout is the PPO family's (methods/group.py)

    starts = []
    real = fg.sde_rollout

    def recording(adapter, text, noise, **kw):
        starts.append(noise.clone())
        return real(adapter, text, noise, **kw)

    monkeypatch.setattr(fg, "sde_rollout", recording)
    cfg = _cfg(tiny_model_dir, shapes_data, init_same_noise=same)
    cfg["budget"] = {"unit": "optimizer_steps", "amount": 2}  # one epoch of 4 images in 2 groups
    train(cfg, tmp_path / "r", log=lambda m: None)
    noise = starts[0]
    assert noise.shape[0] == 4
    if same:
        assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[3])
        assert not torch.allclose(noise[0], noise[2])
    else:
        assert all(not torch.allclose(noise[i], noise[j]) for i in range(4) for j in range(i))
