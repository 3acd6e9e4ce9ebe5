"""Every config and experiment shipped in benchmarks/ resolves, names a real method and buys whole steps."""
from __future__ import annotations

from pathlib import Path

import pytest

from soarbench import config as C
from soarbench.experiment import _check_controls, plan_runs, probe_options
from soarbench.harness.budget import Budget, UnitCost
from soarbench.harness.train import accumulation_steps, resolve_config
from soarbench.methods import build_method
from soarbench.methods.base import RunShape
from soarbench.report.entries import validate_views

ROOT = Path(__file__).resolve().parents[1] / "benchmarks"
EXPERIMENTS = {"experiment.toml", "compare.toml", "compare_all.toml"}
NOT_TRAIN_CONFIGS = {"base_recipe.toml", "common.toml", "recipe.toml"}  # recipes build the base


def _unit_cost(cfg: dict) -> tuple[UnitCost, Budget]:
    """What one unit of the config's method costs on one process, and its budget."""
    cfg = resolve_config(cfg)
    options = dict(cfg["method"])
    method = build_method(options.pop("name"), options)
    shape = RunShape(1, accumulation_steps(cfg["train"], 1), int(cfg["train"]["batch_size"]))
    return method.plan(shape), Budget.from_config(cfg["budget"])


def _check(cfg: dict) -> int:
    cost, budget = _unit_cost(cfg)
    return budget.steps_affordable(cost)


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
    views = validate_views(exp["experiment"].get("views"), name)
    for_views = {v.reference for v in views}
    compared = [cfg for _, cfg in plan if cfg["run"]["group"] not in {*controls.values(), *for_views}]
    budgets = {(cfg["budget"]["unit"], cfg["budget"]["amount"]) for cfg in compared}
    assert len(budgets) == 1  # one matched budget for every method (the controls have budgets of their own)
    for view in views:  # matched data passes: the view's SFT gets exactly the training images SOAR's budget buys
        by_group = {cfg["run"]["group"]: cfg for _, cfg in plan}
        reference = by_group[view.reference]
        assert reference["budget"]["unit"] == "data_images"
        for group in view.groups:
            cost, budget = _unit_cost(by_group[group])
            assert budget.steps_affordable(cost) * cost.data_images == reference["budget"]["amount"]
    if name != "experiment.toml":  # the comparisons carry both controls and the exposure-bias probe
        assert set(controls) == {"negative", "positive"}
        positive = [cfg for _, cfg in plan if cfg["run"]["group"] == controls["positive"]]
        # the positive control: Flow-GRPO on the reward it is scored with, in the matched unit, scored on the
        # held-out split and on prompts it trained on
        assert [cfg["method"]["name"] for cfg in positive] == ["flow_grpo"]
        assert positive[0]["method"]["rewards"] == {"geneval": 1.0}
        assert C.deep_merge(exp["common"]["budget"], positive[0]["budget"])["unit"] == budgets.pop()[0]
        assert "shapes_train" in positive[0]["eval"]["extra_benchmarks"]
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
    controls = exp["experiment"].get("controls", {})
    own = {controls.get("negative"): 2800, controls.get("positive"): 109228}
    own |= {view.reference: 1520 for view in validate_views(exp["experiment"].get("views"), name)}
    for _, cfg in plan_runs(exp):
        amount = C.validate_train_config(cfg)["budget"]["amount"]
        assert amount == own.get(cfg["run"]["group"], 11200)


SD35M = ROOT / "sd35m"


def test_sd35m_configs_name_no_machine_paths(monkeypatch):
    """The SD3.5-M configs read model.path from $SD35M_MODEL (else the Hub id) and their data under
    $SOARBENCH_DATA (else the clone's data/): no absolute path of one machine."""
    monkeypatch.delenv("SD35M_MODEL", raising=False)
    monkeypatch.delenv("SOARBENCH_DATA", raising=False)
    monkeypatch.chdir(ROOT.parent)
    for path in sorted(SD35M.glob("*.toml")):
        text = path.read_text()
        assert '"/models' not in text and '"/data' not in text, path.name
        cfg = C.load_config(path)
        sections = [cfg] if "common" not in cfg else [cfg["common"], *cfg["runs"].values()]
        for sec in sections:
            if "model" in sec and "path" in sec["model"]:
                assert sec["model"]["path"] == "stabilityai/stable-diffusion-3.5-medium", path.name
            if "data" in sec and "jsonl" in sec["data"]:
                assert Path(sec["data"]["jsonl"]).parts[0] == "data", (path.name, sec["data"]["jsonl"])
    monkeypatch.setenv("SD35M_MODEL", "/srv/sd35m")
    monkeypatch.setenv("SOARBENCH_DATA", "/srv/data")
    cfg = C.load_config(SD35M / "soar.toml")
    assert (cfg["model"]["path"], cfg["data"]["image_dir"]) == ("/srv/sd35m", "/srv/data/hy-soar/images")


def test_sd35m_compare_matches_one_budget():
    """benchmarks/sd35m/compare.toml: SFT, SOAR, Flow-GRPO and DiffusionNFT under one fwd_bwd_equiv budget equal to
    SOAR's reference run (5,000 steps of 32), the steps each method affords as its comments state, with controls."""
    exp = C.load_config(SD35M / "compare.toml")
    plan = plan_runs(exp)
    _check_controls(exp["experiment"], plan, SD35M / "compare.toml")
    assert {cfg["method"]["name"] for _, cfg in plan} == {"sft", "soar", "flow_grpo", "diffusion_nft"}
    compared = [cfg for _, cfg in plan if cfg["run"]["group"] != "sft_lr0"]
    assert {(cfg["budget"]["unit"], cfg["budget"]["amount"]) for cfg in compared} == {("fwd_bwd_equiv", 1173334)}
    affordable = {}
    for _, cfg in plan:
        C.validate_train_config(cfg)
        # the reward weights are not needed to count the budget (a reward call is its own counter): build with
        # the weight-free GenEval rules reward so that the test runs without reward_ckpts/
        if "rewards" in cfg["method"]:
            cfg = C.deep_merge(cfg, {"method": {"rewards": {}}})
            cfg["method"]["rewards"] = {"geneval": 1.0}
        affordable[cfg["run"]["group"]] = _check(cfg)
    # SOAR: 32 x 7 fwd_bwd + 32 no-grad (1/3) = 234.67 per step; SFT 32; Flow-GRPO's epoch 1152 x 9 x 2 fwd_bwd
    # + 1152 x 10 x 2 rollout and 1152 x 9 x 2 reference forwards (no grad); DiffusionNFT likewise (units: epochs)
    assert affordable == {"soar": 5000, "sft": 1173334 // 32, "sft_lr0": 11733 // 32, "flow_grpo": 33,
                          "diffusion_nft": 55}


def test_sd35m_compare_dry_run_prints_the_readme_plan(cli, tmp_path, monkeypatch):
    """The README's `soarbench run benchmarks/sd35m/compare.toml --out ... --dry-run`, run as written from the clone:
    no weights, no data, nothing written; each run's plan as README "SD3.5-Medium" states it."""
    monkeypatch.chdir(ROOT.parent)
    monkeypatch.delenv("SD35M_MODEL", raising=False)
    monkeypatch.delenv("SOARBENCH_DATA", raising=False)
    code, out, err = cli("run", "benchmarks/sd35m/compare.toml", "--out", tmp_path / "sd35m", "--dry-run")
    assert code == 0, err
    for line in ("32 fwd_bwd_equiv -> 36666 optimizer steps", "234.667 fwd_bwd_equiv -> 5000 optimizer steps",
                 "one epoch = 35328 fwd_bwd_equiv -> 66 optimizer steps in 33 unit(s)",
                 "21120 fwd_bwd_equiv -> 55 optimizer steps"):
        assert line in out, line
    assert 'path = "stabilityai/stable-diffusion-3.5-medium"' in out and 'jsonl = "data/hy-soar/train.jsonl"' in out
    assert not (tmp_path / "sd35m").exists()
