"""Configs: `extends` chains, and one typed reading of every section with one clear line for each bad value."""
from __future__ import annotations

import pytest

from soarbench import config as C
from soarbench.errors import UserError

BASE = {"model": {"path": "m"}, "data": {"jsonl": "d.jsonl"}, "budget": {"amount": 10}, "method": {"name": "sft"}}


def _with(dotted: str, value):
    return C.apply_overrides(BASE, [f"{dotted}={value}"]) if isinstance(value, str) else \
        C.deep_merge(BASE, _nest(dotted, value))


def _nest(dotted: str, value) -> dict:
    out: dict = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _error(cfg) -> str:
    with pytest.raises(UserError) as e:
        C.validate_train_config(cfg)
    message = str(e.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ extends
def test_extends_chain_deep_merges_with_the_extending_file_winning(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.toml").write_text('[train]\nlr = 1.0\nseed = 3\n[train.nested]\nx = 1\ny = 2\n[model]\npath = "a"\n')
    (tmp_path / "sub" / "b.toml").write_text('extends = "../a.toml"\n[train]\nlr = 2.0\n[train.nested]\ny = 20\n')
    (tmp_path / "sub" / "c.toml").write_text('extends = "b.toml"\n[train.nested]\nz = 300\n[method]\nname = "sft"\n')
    cfg = C.load_config(tmp_path / "sub" / "c.toml")
    # model.path is relative to a.toml, the file that sets it (tests/test_config_paths.py)
    assert cfg == {"train": {"lr": 2.0, "seed": 3, "nested": {"x": 1, "y": 20, "z": 300}},
                   "model": {"path": str(tmp_path / "a")}, "method": {"name": "sft"}}


def test_extends_cycle_and_missing_target_are_one_line(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(UserError, match=r"extends forms a cycle \(a.toml -> b.toml -> a.toml\)"):
        C.load_config(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = "nope.toml"\n')
    with pytest.raises(UserError) as e:
        C.load_config(tmp_path / "c.toml")
    assert str(e.value) == f"{tmp_path / 'c.toml'}: extends = 'nope.toml': no such file {tmp_path / 'nope.toml'}"
    (tmp_path / "d.toml").write_text("extends = 3\n")
    with pytest.raises(UserError, match="extends = 3: expected the path of another TOML file"):
        C.load_config(tmp_path / "d.toml")


def test_experiment_files_may_extend(tmp_path):
    from soarbench.experiment import plan_runs

    (tmp_path / "shared.toml").write_text('[common.model]\npath = "m"\n[common.train]\nseed = 0\nlr = 1.0\n'
                                          '[runs.sft]\nmethod = { name = "sft" }\n')
    (tmp_path / "exp.toml").write_text('extends = "shared.toml"\n[common.train]\nlr = 0.5\n'
                                       '[runs.soar]\nmethod = { name = "soar" }\nseeds = [4]\n')
    plan = dict(plan_runs(C.load_config(tmp_path / "exp.toml")))
    assert list(plan) == ["sft-s0", "soar-s4"]
    assert plan["soar-s4"]["train"] == {"seed": 4, "lr": 0.5}
    assert plan["sft-s0"]["model"] == {"path": str(tmp_path / "m")}


def test_an_experiments_common_table_extends_a_training_config(tmp_path):
    """[common] extends = a run config (itself extending another): its tables are the runs' common settings, its
    paths read against its own folder, the experiment's [common.*] values winning; bad targets are one line."""
    from soarbench.experiment import plan_runs

    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "base.toml").write_text('[model]\npath = "weights"\n[train]\nseed = 0\nlr = 1.0\n'
                                                  '[eval]\nbenchmark = "shapes"\nnum_steps = 40\n')
    (tmp_path / "world" / "common.toml").write_text('extends = "base.toml"\n[train]\nlr = 2.0\nthreads = 2\n'
                                                    '[data]\njsonl = "d.jsonl"\n')
    (tmp_path / "exp.toml").write_text('[common]\nextends = "world/common.toml"\n[common.train]\nlr = 0.5\n'
                                       '[runs.sft]\nmethod = { name = "sft" }\nseeds = [1]\n')
    plan = dict(plan_runs(C.load_config(tmp_path / "exp.toml")))
    cfg = plan["sft-s1"]
    assert cfg["train"] == {"seed": 1, "lr": 0.5, "threads": 2}
    assert cfg["model"] == {"path": str(tmp_path / "world" / "weights")}
    assert cfg["data"] == {"jsonl": str(tmp_path / "world" / "d.jsonl")}
    assert cfg["eval"] == {"benchmark": "shapes", "num_steps": 40}
    assert "extends" not in C.load_config(tmp_path / "exp.toml")["common"]
    (tmp_path / "bad.toml").write_text('[common]\nextends = "nope.toml"\n')
    with pytest.raises(UserError) as e:
        C.load_config(tmp_path / "bad.toml")
    bad, nope = tmp_path / "bad.toml", tmp_path / "nope.toml"
    assert str(e.value) == f"{bad}: [common] extends = 'nope.toml': no such file {nope}"
    (tmp_path / "loop.toml").write_text('[common]\nextends = "loop.toml"\n')
    with pytest.raises(UserError, match=r"extends forms a cycle \(loop.toml -> loop.toml\)"):
        C.load_config(tmp_path / "loop.toml")


def test_non_utf8_config_is_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b'[train]\nname = "\xff"\n')
    with pytest.raises(UserError, match=r"c.toml: not UTF-8 text \(byte \d+\)"):
        C.load_config(path)


# ------------------------------------------------------------------------------------------------ typed reading
def test_defaults_are_filled_in_as_documented():
    cfg = C.validate_train_config(BASE)
    assert cfg["model"] == {"path": "m", "load_t5": True, "text_encoder_precision": "auto"}
    assert cfg["data"] == {"jsonl": "d.jsonl", "random_flip": False, "caption_dropout": 0.0, "text_cache": "auto",
                           "prompt_sampling": "unique"}
    assert cfg["train"] == {
        "seed": 0, "batch_size": 8, "gradient_accumulation_steps": 1, "global_batch_size": 0, "lr": 2e-5,
        "weight_decay": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "grad_clip": 1.0, "warmup_steps": 0,
        "decay_steps": 0, "decay_fraction": 0.0, "mixed_precision": "no", "frozen_dtype": "auto",
        "gradient_checkpointing": False,
        "allow_tf32": True, "components": ["transformer"],
        "device": "auto", "threads": 0, "checkpoint_every": 0, "nonfinite": "stop", "check_replicas": False,
        "compile": False}
    assert cfg["budget"] == {"unit": "fwd_bwd", "amount": 10, "no_grad_fraction": 1 / 3}
    assert cfg["eval"] == {"benchmark_options": {}, "extra_benchmarks": {}, "extra_num_steps": [], "points": 4, "seed": 0, "batch_size": 64,
                           "include_base": False, "precision": "auto", "metrics": []}
    assert cfg["log"] == {"tensorboard": True, "wandb": False, "wandb_project": "soarbench", "every": 10}
    assert cfg["run"] == {}
    assert cfg["method"] == {"name": "sft", "weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0,
                             "mode_scale": 1.29}
    assert "train" not in BASE  # the input is not changed


def test_given_values_are_kept():
    cfg = C.validate_train_config(C.deep_merge(BASE, {
        "model": {"max_sequence_length": 77}, "train": {"device": "cpu", "components": ["text_encoder", "transformer"]},
        "eval": {"benchmark": "shapes", "metrics": ["geneval"], "guidance": 4.5, "num_steps": 10},
        "data": {"generate": {"world": "shapes"}}, "budget": {"unit": "device_s", "amount": 3.5}}))
    assert cfg["model"]["max_sequence_length"] == 77
    assert cfg["train"]["components"] == ["text_encoder", "transformer"]
    assert cfg["eval"]["benchmark"] == "shapes" and cfg["eval"]["num_steps"] == 10
    assert cfg["data"]["generate"] == {"world": "shapes", "n_images": 4000, "seed": 1, "image_size": 32}
    assert cfg["budget"]["unit"] == "device_s"


@pytest.mark.parametrize("dotted,value,expected", [
    ("train.lr", "abc", "config: train.lr = 'abc': expected a number"),
    ("train.lr", -1, "config: train.lr = -1: expected a number >= 0"),
    ("train.batch_size", 0, "config: train.batch_size = 0: expected an integer >= 1"),
    ("train.batch_size", 2.5, "config: train.batch_size = 2.5: expected an integer"),
    ("train.batch_size", True, "config: train.batch_size = true: expected an integer"),
    ("train.gradient_checkpointing", "yes", "config: train.gradient_checkpointing = 'yes': expected true or false"),
    ("train.betas", [0.9], "config: train.betas = [0.9]: expected an array of 2 numbers"),
    ("train.betas", [0.9, 1.0], "config: train.betas = [0.9, 1.0]: expected a number >= 0 and < 1"),
    ("train.eps", 0, "config: train.eps = 0: expected a number > 0"),
    ("train.mixed_precision", "bf61", "config: train.mixed_precision = 'bf61': expected one of no, bf16, fp16 "
                                      "(did you mean 'bf16'?)"),
    ("train.nonfinite", "ignore", "config: train.nonfinite = 'ignore': expected one of stop, skip"),
    ("train.components", ["transformr"], "config: train.components = ['transformr']: expected one of transformer, "
                                         "text_encoder, text_encoder_2 (did you mean 'transformer'?)"),
    ("train.components", [], "config: train.components = []: expected at least one of transformer, text_encoder, "
                             "text_encoder_2"),
    ("train.device", "gpu", "config: train.device = 'gpu': expected auto, cpu, cuda or cuda:N"),
    ("train.global_batch_size", 12, "config: train.global_batch_size = 12: expected a multiple of "
                                    "train.batch_size = 8"),
    ("eval.points", -1, "config: eval.points = -1: expected an integer >= 0"),
    ("eval.num_steps", 0, "config: eval.num_steps = 0: expected an integer >= 1"),
    ("eval.guidance", float("nan"), "config: eval.guidance = nan: expected a finite number"),
    ("eval.benchmark", "shapez", "did you mean 'shapes'?"),
    ("eval.metrics", ["genevl"], "config: eval.metrics = ['genevl']: expected one of"),
    ("eval", {"benchmark": "shapes", "benchmark_options": {"images_per_promt": 2}},
     "config: unknown key 'eval.benchmark_options.images_per_promt' for benchmark 'shapes' "
     "(did you mean 'eval.benchmark_options.images_per_prompt'?)"),
    ("eval", {"benchmark": "shapes", "benchmark_options": {"n_per_tag": "many"}},
     "config: eval.benchmark_options.n_per_tag = 'many': expected an integer"),
    ("data.caption_dropout", 1.0, "config: data.caption_dropout = 1.0: expected a number >= 0 and < 1"),
    ("data.text_cache", "some", "config: data.text_cache = 'some': expected one of auto, all, none"),
    ("data.generate", {"world": "shapez"}, "config: data.generate.world = 'shapez': expected shapes "
                                           "(did you mean 'shapes'?)"),
    ("data.generate", {"world": "shapes", "n_imgs": 3}, "config: unknown key 'data.generate.n_imgs' "
                                                        "(did you mean 'data.generate.n_images'?)"),
    ("budget.amount", 0, "config: budget.amount = 0: expected a number > 0"),
    ("budget.unit", "fwd_bwd_eqiv", "(did you mean 'fwd_bwd_equiv'?)"),
    ("budget.no_grad_fraction", 2, "config: budget.no_grad_fraction = 2: expected a number >= 0 and <= 1"),
    ("model.text_encoder_precision", "fp8", "expected one of auto, fp32, bf16, fp16"),
    ("log.every", 0, "config: log.every = 0: expected an integer >= 1"),
    ("train.lrr", 1, "config: unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("run.nmae", "x", "config: unknown key 'run.nmae' (did you mean 'run.name'?)"),
])
def test_bad_values_are_one_line_naming_field_value_and_expectation(dotted, value, expected):
    message = _error(_with(dotted, value))
    assert expected in message, message
    assert message.startswith("config: ")


def test_unknown_section_and_missing_required_fields():
    assert _error({**BASE, "trian": {}}) == "config: unknown section 'trian' (did you mean 'train'?)"
    assert _error({k: v for k, v in BASE.items() if k != "model"}) == "config: missing required field 'model.path'"
    assert _error({**BASE, "budget": {"unit": "fwd_bwd"}}) == "config: missing required field 'budget.amount'"
    assert _error({**BASE, "method": {"lr": 1}}) == "config: missing required field 'method.name'"
    assert _error({**BASE, "train": 3}) == "config: train = 3: expected a table"


def test_cuda_device_on_a_machine_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _error(_with("train.device", "cuda")) == \
        "config: train.device = 'cuda': this machine has no CUDA device (use auto or cpu)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert C.validate_train_config(_with("train.device", "cuda:1"))["train"]["device"] == "cuda:1"
    assert _error(_with("train.device", "cuda:2")) == \
        "config: train.device = 'cuda:2': this machine has 2 CUDA device(s), numbered from 0"


# ------------------------------------------------------------------------------------------------ method options
def test_method_options_follow_the_constructor():
    # SOAR passes **sft_options on to SFT: SFT's options are SOAR's too
    opts = C.validate_method_options("soar", {"trajectory_length": 3, "logit_std": 2})
    assert opts["trajectory_length"] == 3 and opts["logit_std"] == 2.0 and isinstance(opts["logit_std"], float)
    assert opts["lambda_aux"] == 1.0 and opts["weighting_scheme"] == "logit_normal"
    grpo = C.validate_method_options("flow_grpo", {"rewards": {"geneval": 1}, "reward_options": {"geneval": {}}})
    assert grpo["rewards"] == {"geneval": 1} and grpo["group_size"] == 4


@pytest.mark.parametrize("name,options,expected", [
    ("soar", {"lambda_ax": 1.0}, "config: unknown key 'method.lambda_ax' for method 'soar' "
                                 "(did you mean 'method.lambda_aux'?)"),
    ("soar", {"trajectory_length": 6.5}, "config: method.trajectory_length = 6.5: expected an integer"),
    ("sft", {"weighting_scheme": 3}, "config: method.weighting_scheme = 3: expected a string"),
    ("flow_grpo", {"lora": "yes"}, "config: method.lora = 'yes': expected true or false"),
    ("flow_grpo", {"rewards": {"geneval": "high"}}, "config: method.rewards = {geneval = 'high'}: expected a table "
                                                    "of numbers"),
    ("soap", {}, "config: method.name = 'soap': unknown method 'soap'"),
])
def test_bad_method_options(name, options, expected):
    with pytest.raises(UserError) as e:
        C.validate_method_options(name, options)
    assert expected in str(e.value)
    with pytest.raises(UserError) as e:  # the same line through the whole config
        C.validate_train_config({**BASE, "method": {"name": name, **options}})
    assert expected in str(e.value)


# ------------------------------------------------------------------------------------------------ through the CLI
def _config_file(tmp_path, model, jsonl):
    path = tmp_path / "c.toml"
    path.write_text(f'[model]\npath = "{model}"\n[data]\njsonl = "{jsonl}"\n[method]\nname = "sft"\n'
                    f'[budget]\nunit = "fwd_bwd"\namount = 8\n')
    return path


@pytest.mark.parametrize("override,expected", [
    ("train.lr=abc", "error: config: train.lr = 'abc': expected a number"),
    ("train.lrr=1e-4", "error: config: unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("eval.benchmark=shapez", "error: config: eval.benchmark = 'shapez': expected one of"),
    ("method.lambda_aux=1", "error: config: unknown key 'method.lambda_aux' for method 'sft'"),
])
def test_cli_set_gives_one_line_before_anything_is_written(tmp_path, cli, override, expected):
    cfg = _config_file(tmp_path, tmp_path / "no-model", tmp_path / "no.jsonl")
    code, _, err = cli("train", "--config", cfg, "--set", override, "--out", tmp_path / "run")
    assert code == 2 and err.startswith(expected) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_cli_run_checks_every_run_before_the_first(tmp_path, cli):
    exp = tmp_path / "exp.toml"
    exp.write_text('[common.model]\npath = "m"\n[common.data]\njsonl = "d.jsonl"\n[common.budget]\namount = 8\n'
                   '[runs.sft]\nmethod = { name = "sft" }\n[runs.soar]\nmethod = { name = "soar", lamda_aux = 1 }\n')
    code, _, err = cli("run", exp, "--out", tmp_path / "out")
    assert code == 2 and len(err.splitlines()) == 1
    assert err == (f"error: {exp} run 'soar-s0': config: unknown key 'method.lamda_aux' for method 'soar' "
                   f"(did you mean 'method.lambda_aux'?)")
    assert not (tmp_path / "out").exists()


def test_cli_train_on_cuda_without_cuda_is_one_line(tmp_path, cli, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _config_file(tmp_path, tmp_path / "no-model", tmp_path / "no.jsonl")
    code, _, err = cli("train", "--config", cfg, "--set", "train.device=cuda", "--out", tmp_path / "run")
    assert (code, err) == (2, "error: config: train.device = 'cuda': this machine has no CUDA device (use auto or cpu)")
    assert not (tmp_path / "run").exists()
