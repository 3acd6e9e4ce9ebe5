"""SePPO (reconstructed, arXiv 2410.05255): the DPO loss with the anchor flipper against hand-written formulas, the
reference pool (draw distribution, growth and eviction, state round trip), the reference weights a role computes
with, a short run's logs and records, and bad options or data as one-line errors."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch

from soarbench.errors import UserError
from soarbench.harness.train import train
from soarbench.methods import build_method
from soarbench.methods.seppo import ReferencePool, SePPO, flipper_sign, seppo_terms


# ---- the loss and the flipper ---------------------------------------------------------------------------------
def _by_hand(e_tw, e_tr, e_rw, e_rr, beta, flipper):
    """Value and gradient (d/de_theta_w, d/de_theta_r) of -log sigmoid(-beta inside), written out per pair."""
    s = -1.0 if (flipper and e_rw < e_tw) else 1.0
    inside = (e_tw - e_rw) - s * (e_tr - e_rr)
    value = -math.log(1.0 / (1.0 + math.exp(beta * inside)))
    sig = 1.0 / (1.0 + math.exp(-beta * inside))  # dL/d inside = beta sigmoid(beta inside)
    return s, value, beta * sig, -s * beta * sig


@pytest.mark.parametrize("flipper", [True, False])
def test_loss_and_flipper_match_the_formula_in_value_and_gradient(flipper):
    # pair 0: the reference fits the winner better (0.30 < 0.50) -> flipped when the flipper is on;
    # pair 1: the policy fits it better (0.20 < 0.40) -> the reference's sample stays a loser
    e_tw = torch.tensor([0.50, 0.20], dtype=torch.float64, requires_grad=True)
    e_tr = torch.tensor([0.70, 0.90], dtype=torch.float64, requires_grad=True)
    e_rw = torch.tensor([0.30, 0.40], dtype=torch.float64)
    e_rr = torch.tensor([0.60, 0.65], dtype=torch.float64)
    beta = 3.0
    terms = seppo_terms(e_tw, e_tr, e_rw, e_rr, beta, flipper)
    terms.loss.sum().backward()
    expected = [_by_hand(*(float(x[i].detach()) for x in (e_tw, e_tr, e_rw, e_rr)), beta, flipper) for i in range(2)]
    assert terms.s.tolist() == [expected[0][0], expected[1][0]]
    assert terms.s.tolist() == ([-1.0, 1.0] if flipper else [1.0, 1.0])
    for i, (_, value, g_w, g_r) in enumerate(expected):
        assert float(terms.loss[i].detach()) == pytest.approx(value, rel=1e-6)
        assert float(e_tw.grad[i]) == pytest.approx(g_w, rel=1e-6)
        assert float(e_tr.grad[i]) == pytest.approx(g_r, rel=1e-6)
    # flipped: the reference sample's error is pushed DOWN like the winner's (same-signed gradients)
    if flipper:
        assert e_tw.grad[0] > 0 and e_tr.grad[0] > 0
    assert e_tw.grad[1] > 0 and e_tr.grad[1] < 0


def test_equal_policy_and_reference_give_log_two_and_no_flip():
    e = torch.tensor([0.3, 0.8, 1.1])
    terms = seppo_terms(e, e * 2, e, e * 2, beta=280.0)
    assert torch.allclose(terms.loss, torch.full_like(e, math.log(2.0)))
    assert terms.s.tolist() == [1.0, 1.0, 1.0]  # a tie is not "the reference fits better"
    assert flipper_sign(e, e - 0.1).tolist() == [-1.0, -1.0, -1.0]


# ---- the reference pool ---------------------------------------------------------------------------------------
def _pool(n: int, size: int = 7) -> ReferencePool:
    pool = ReferencePool(size)
    for k in range(n):
        pool.add(30 * k, {"w": torch.full((2,), float(k))})
    return pool


def test_uniform_reference_is_uniform_over_the_pool_and_keyed():
    pool = _pool(7)
    draws = [pool.choose("uniform", 11, unit) for unit in range(7000)]
    counts = torch.bincount(torch.tensor(draws), minlength=7)
    sd = math.sqrt(7000 * (1 / 7) * (6 / 7))  # binomial standard deviation of one count, ~29
    assert all(abs(int(c) - 1000) < 5 * sd for c in counts), counts.tolist()
    # the same (seed, unit) draws the same reference (every process, and a resumed run); another seed others
    assert draws[:50] == [pool.choose("uniform", 11, unit) for unit in range(50)]
    assert draws[:50] != [pool.choose("uniform", 12, unit) for unit in range(50)]
    assert {pool.choose("initial", 11, u) for u in range(100)} == {0}
    assert {pool.choose("latest", 11, u) for u in range(100)} == {6}
    assert {_pool(1).choose("uniform", 3, u) for u in range(20)} == {0}


def test_pool_grows_then_drops_the_oldest_after_theta_0():
    pool = ReferencePool(3)
    seen = []
    for step in range(6):
        pool.add(step, {"w": torch.tensor([float(step)])})
        seen.append(list(pool.steps))
        assert [float(w["w"]) for w in pool.weights] == [float(s) for s in pool.steps]
    assert seen == [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5]]
    single = ReferencePool(1)
    for step in range(3):
        single.add(step, {"w": torch.tensor([float(step)])})
    assert single.steps == [0] and float(single.weights[0]["w"]) == 0.0


def test_pool_state_round_trips_through_a_weights_only_checkpoint():
    method = SePPO(pool_size=3)
    for step in (0, 30, 60, 90):
        method.pool.add(step, {"a.lora_A.default.weight": torch.randn(2, 3), "b": torch.randn(4)})
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    restored = SePPO(pool_size=3)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.pool.steps == method.pool.steps == [0, 60, 90]
    for a, b in zip(restored.pool.weights, method.pool.weights):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [restored.pool.choose("uniform", 4, u) for u in range(30)] == \
        [method.pool.choose("uniform", 4, u) for u in range(30)]


# ---- the weights the reference role computes with ------------------------------------------------------------
def _velocity(roles, adapter, role):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, *adapter.latent_shape(32, 32), generator=g)
    text = adapter.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        return roles.velocity(z, torch.tensor([0.7, 0.3]), text, role=role)


def test_lora_snapshots_load_into_the_reference_role(adapter):
    from soarbench.models.roles import Roles

    roles = Roles(adapter)
    params = roles.lora(4, 8)
    roles.add_role("old")
    theta_0 = roles.snapshot()
    assert theta_0 and all(".default." in k for k in theta_0)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    theta_1 = roles.snapshot()
    roles.load_role("old", theta_0)  # LoRA B = 0 at init: theta_0 is the base network
    assert torch.allclose(_velocity(roles, adapter, "old"), _velocity(roles, adapter, "ref"), atol=1e-6)
    assert not torch.allclose(_velocity(roles, adapter, "old"), _velocity(roles, adapter, "policy"), atol=1e-4)
    roles.load_role("old", theta_1)
    assert torch.equal(_velocity(roles, adapter, "old"), _velocity(roles, adapter, "policy"))
    assert all(p.requires_grad for p in params)  # the trained adapter stays the trained one


def test_full_finetune_snapshots_load_into_the_frozen_copy(adapter):
    from soarbench.models.roles import Roles

    roles = Roles(adapter)
    params = roles.full(("transformer",))
    roles.add_role("old")
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(_velocity(roles, adapter, "old"), _velocity(roles, adapter, "policy"), atol=1e-4)
    snap = roles.snapshot()
    assert all(v.device.type == "cpu" for v in snap.values())
    roles.load_role("old", snap)
    assert torch.equal(_velocity(roles, adapter, "old"), _velocity(roles, adapter, "policy"))


# ---- a short run -------------------------------------------------------------------------------------------
def _cfg(model_dir, data, steps=3, **method):
    options = {"num_steps": 2, "guidance": 2.0, "lora_r": 4, "lora_alpha": 8, **method}
    return {"model": {"path": str(model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(data)},
            "method": {"name": "seppo", **options},
            "train": {"seed": 2, "batch_size": 2, "lr": 1e-3, "threads": 2, "checkpoint_every": 1},
            "budget": {"unit": "optimizer_steps", "amount": steps}}


def test_a_short_run_logs_the_pool_and_records_reconstructed(tiny_model_dir, shapes_data, tmp_path):
    out = train(_cfg(tiny_model_dir, shapes_data, reference="initial", pool_every=1, pool_size=2), tmp_path / "r",
                log=lambda m: None)
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    # step 1: policy == theta_0 == reference, so every pair's inside term is 0: the loss is log 2, nothing flips
    assert rows[0]["loss_dpo"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert rows[0]["flipped"] == 0.0 and rows[0]["implicit_acc"] == 0.0
    assert rows[0]["e_policy_winner"] == pytest.approx(rows[0]["e_ref_winner"], rel=1e-6)
    assert [r["pool_size"] for r in rows] == [1.0, 2.0, 2.0]  # theta_0, then theta_0 + the newest
    assert all(r["reference_step"] == 0.0 for r in rows)  # "initial"
    assert rows[1]["loss_dpo"] != pytest.approx(math.log(2.0), abs=1e-6)  # the policy moved off the reference
    run = json.loads((out / "run.json").read_text())
    assert "reconstructed" in run["method_version"] and run["method"] == "seppo"
    record = json.loads((out / "checkpoints" / "step_000003" / "soarbench_checkpoint.json").read_text())
    assert "reconstructed" in record["method_version"]
    state = torch.load(out / "checkpoints" / "step_000003" / "trainer_state.pt", weights_only=True)
    pool = state["method"]["pool"]
    assert pool["steps"] == [0, 3]
    assert all(float(v.abs().max()) == 0.0 for k, v in pool["weights"][0].items() if "lora_B" in k)  # peft init
    live = {k: v for k, v in state["roles"]["lora"].items() if ".default." in k}
    assert live.keys() == pool["weights"][1].keys()
    assert all(torch.equal(live[k], pool["weights"][1][k]) for k in live)  # the newest snapshot = the weights


# ---- bad input, one line each -------------------------------------------------------------------------------
@pytest.mark.parametrize("options, words", [
    ({"pool_size": 0}, "pool_size = 0"), ({"pool_every": 0}, "pool_every = 0"),
    ({"pool_every": 2.5}, "pool_every = 2.5"), ({"reference": "unifrom"}, "did you mean 'uniform'"),
    ({"beta": 0.0}, "beta = 0.0")])
def test_bad_options_are_one_line(options, words):
    with pytest.raises(UserError) as e:
        build_method("seppo", options)
    assert words in str(e.value) and "\n" not in str(e.value)


def _bad_data(tmp_path, shapes_data, line: str):
    folder = tmp_path / "bad"
    (folder / "images").mkdir(parents=True)
    good = shapes_data.read_text().splitlines()[0]
    (folder / "train.jsonl").write_text(good + "\n" + line + "\n")
    md5 = json.loads(good)["md5"]
    for ext in (".png", ".jpg"):
        src = shapes_data.parent / "images" / f"{md5}{ext}"
        if src.exists():
            (folder / "images" / src.name).symlink_to(src)
    return folder / "train.jsonl"


@pytest.mark.parametrize("line, words", [
    ('{"caption_en": "a red circle", "bw": 32, "bh": 32}', ":2: missing field 'md5'"),
    ('{"md5": "no_such_image", "caption_en": "a red circle", "bw": 32, "bh": 32}', ":2: image "),
])
def test_data_without_an_image_is_one_line_naming_file_and_line(tiny_model_dir, shapes_data, tmp_path, line, words):
    data = _bad_data(tmp_path, shapes_data, line)
    with pytest.raises(UserError) as e:
        train(_cfg(tiny_model_dir, data), tmp_path / "r", log=lambda m: None)
    message = str(e.value)
    assert str(data) in message and words in message and "\n" not in message


@pytest.mark.parametrize("dropout", [0.0, 0.999999])
def test_caption_dropout_reaches_the_pairs(tiny_model_dir, shapes_data, tmp_path, monkeypatch, dropout):
    """data.caption_dropout (SFT's option) drops the caption of the whole pair: the reference samples for, and the
    losses see, the empty prompt."""
    seen = []
    original = SePPO.reference_samples

    def recording(self, ctx, batch):
        seen.extend(batch.prompts)
        return original(self, ctx, batch)

    monkeypatch.setattr(SePPO, "reference_samples", recording)
    cfg = _cfg(tiny_model_dir, shapes_data, steps=2)
    cfg["data"]["caption_dropout"] = dropout
    train(cfg, tmp_path / "r", log=lambda m: None)
    assert len(seen) == 4
    assert all(p == "" for p in seen) if dropout else all(p for p in seen)
