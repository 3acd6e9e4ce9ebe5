"""Every config and experiment shipped in benchmarks/ resolves, names a real method and buys whole steps."""
from __future__ import annotations

from pathlib import Path

import pytest

from soarbench import config as C
from soarbench.experiment import _check_controls, plan_runs, probe_options
from soarbench.harness.budget import Budget
from soarbench.harness.train import resolve_config
from soarbench.methods import build_method

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"
EXPERIMENTS = {"experiment.toml", "compare.toml", "compare_all.toml"}
NOT_TRAIN_CONFIGS = {"base_recipe.toml", "common.toml", "recipe.toml"}  # recipes build the base


def _check(cfg: dict) -> int:
    cfg = resolve_config(cfg)
    options = dict(cfg["method"])
    name = options.pop("name")
    method = build_method(name, options)
    budget = Budget.from_config(cfg["budget"])
    from soarbench.harness.train import accumulation_steps
    from soarbench.methods.base import RunShape

    shape = RunShape(1, accumulation_steps(cfg["train"], 1), int(cfg["train"]["batch_size"]))
    return budget.steps_affordable(method.plan(shape))


@pytest.mark.parametrize("path", sorted(p for p in ROOT.rglob("*.toml")
                                        if p.name not in EXPERIMENTS | NOT_TRAIN_CONFIGS), ids=lambda p: p.name)
def test_train_configs_resolve(path):
    assert _check(C.load_toml(path)) >= 1


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiments_plan_matched_budgets(name):
    exp = C.load_toml(ROOT / "shapes" / name)
    plan = plan_runs(exp)
    controls = exp["experiment"].get("controls", {})
    _check_controls(exp["experiment"], plan, ROOT / "shapes" / name)
    compared = [cfg for _, cfg in plan if cfg["run"]["group"] != controls.get("negative")]
    budgets = {(cfg["budget"]["unit"], cfg["budget"]["amount"]) for cfg in compared}
    assert len(budgets) == 1  # one matched budget for every method (a learning-rate-0 control may spend less)
    if name != "experiment.toml":  # the comparisons carry both controls and the exposure-bias probe
        assert set(controls) == {"negative", "positive"}
        options = probe_options(exp["experiment"].get("probe"), plan, ROOT / "shapes" / name)
        assert options["n"] == 64 and options["num_steps"] == 40 and options["guidance"] == 4.5
    expected = {"sft", "soar"} | ({"flow_grpo"} if name != "experiment.toml" else set()) | \
        ({"diffusion_nft", "dance_grpo", "direct_align", "seppo", "actor_critic"} if name == "compare_all.toml"
         else set())
    assert {cfg["method"]["name"] for _, cfg in plan} == expected
    for _, cfg in plan:
        assert _check(cfg) >= 1


def test_shapes_configs_share_common_settings():
    """sft/soar/flow_grpo.toml extend common.toml: their resolved shared sections are common's (Flow-GRPO's
    LoRA learning rate and SFT's and SOAR's decay to 0 are the overrides)."""
    import tomllib

    common = C.load_toml(ROOT / "shapes" / "common.toml")
    for name in ("sft.toml", "soar.toml", "flow_grpo.toml"):
        raw = tomllib.loads((ROOT / "shapes" / name).read_text())
        assert raw["extends"] == "common.toml"
        cfg = C.load_toml(ROOT / "shapes" / name)
        assert "extends" not in cfg
        for section in ("model", "data", "train", "budget", "eval"):
            overrides = {("flow_grpo.toml", "train"): {"lr": 3e-4}, ("sft.toml", "train"): {"decay_fraction": 1.0},
                         ("soar.toml", "train"): {"decay_fraction": 1.0}}
            expected = dict(common[section], **overrides.get((name, section), {}))
            assert cfg[section] == expected, (name, section)


@pytest.mark.parametrize("path", sorted(p for p in ROOT.rglob("*.toml")
                                        if p.name not in EXPERIMENTS | NOT_TRAIN_CONFIGS), ids=lambda p: p.name)
def test_train_configs_pass_typed_validation(path):
    cfg = C.validate_train_config(C.load_config(path))
    from soarbench.methods import METHODS

    assert cfg["method"]["name"] in METHODS.names()


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_runs_pass_typed_validation(name):
    exp = C.load_config(ROOT / "shapes" / name)
    control = exp["experiment"].get("controls", {}).get("negative")
    for _, cfg in plan_runs(exp):
        amount = C.validate_train_config(cfg)["budget"]["amount"]
        assert amount == (2800 if cfg["run"]["group"] == control else 11200)
