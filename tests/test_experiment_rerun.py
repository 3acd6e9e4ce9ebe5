"""`soarbench run` again over the same --out: a finished run is skipped only when its recorded config (config.toml)
is the one asked now; a changed key is refused in one line naming it, before any work, and nothing is rewritten."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from soarbench import config as C
from soarbench.errors import UserError
from soarbench.experiment import refuse_changed_run


def _experiment(tmp_path: Path, model: Path, data: Path) -> Path:
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[experiment]\nname = "t"\nevaluate_base = false\nreport = "{tmp_path / "report"}"\n'
                   f'[common.model]\npath = "{model}"\nmax_sequence_length = 0\n'
                   f'[common.data]\njsonl = "{data}"\n'
                   '[common.train]\nbatch_size = 2\nlr = 0.001\nthreads = 2\n'
                   '[common.budget]\nunit = "optimizer_steps"\namount = 1\n'
                   '[common.eval]\nbenchmark = "shapes"\npoints = 1\nnum_steps = 1\nbatch_size = 8\n'
                   'benchmark_options = { n_per_tag = 1 }\n'
                   '[runs.sft]\nmethod = { name = "sft" }\n')
    return exp


def test_a_finished_run_with_another_config_is_refused_naming_the_keys(cli, tiny_model_dir, shapes_data, tmp_path):
    exp, out = _experiment(tmp_path, tiny_model_dir, shapes_data), tmp_path / "out"
    assert cli("run", exp, "--out", out)[0] == 0
    run = out / "sft-s0"
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = cli("run", exp, "--out", out, "--set", "common.train.lr=0.002",
                       "--set", "common.budget.amount=2")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == (f"error: {run}: finished with budget.amount=1 (now 2), train.lr=0.001 (now 0.002); use a new "
                   "--out or remove the folder")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files  # nothing rerun, nothing rewritten
    # the same config, or one differing only in what changes no result, skips the run as before
    code, out_text, err = cli("run", exp, "--out", out, "--set", "common.train.threads=1")
    assert code == 0 and "[sft-s0] already finished, skipped" in out_text + err


def test_refuse_changed_run_compares_the_resolved_config(tmp_path):
    cfg = {"model": {"path": "m"}, "data": {"jsonl": "d.jsonl"}, "method": {"name": "sft"},
           "budget": {"amount": 4}}
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.toml").write_text(C.dumps_toml(C.validate_train_config(cfg)))
    refuse_changed_run(run, C.validate_train_config(cfg))  # unfinished, same config: resumes
    changed = C.validate_train_config({**cfg, "method": {"name": "sft", "weighting_scheme": "uniform"}})
    with pytest.raises(UserError, match=r"^--resume: method.weighting_scheme was "):  # unfinished: --resume's rule
        refuse_changed_run(run, changed)
    (run / "done.json").write_text(json.dumps({"step": 4}))
    refuse_changed_run(run, C.validate_train_config({**cfg, "train": {"device": "cpu", "checkpoint_every": 2}}))
    with pytest.raises(UserError, match=r": finished with method.weighting_scheme='logit_normal' \(now 'uniform'\);"):
        refuse_changed_run(run, changed)
    # a larger budget resumes an unfinished run but is another result for a finished one
    with pytest.raises(UserError, match=r"finished with budget.amount=4 \(now 8\)"):
        refuse_changed_run(run, C.validate_train_config({**cfg, "budget": {"amount": 8}}))


def test_the_base_eval_is_reused_only_for_the_same_weights(tiny_model_dir, tmp_path):
    """`soarbench run` evaluates the base once; a rerun reuses it while the base's weights are the same, and redoes
    it (saying so) when the model at that path was replaced, rather than reporting the old numbers."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from soarbench.experiment import evaluate_base

    base = tmp_path / "base_model"
    shutil.copytree(tiny_model_dir, base)
    cfg = {"model": {"path": str(base), "max_sequence_length": 0}, "data": {"jsonl": "unused.jsonl"},
           "method": {"name": "sft"}, "train": {"threads": 2}, "budget": {"unit": "optimizer_steps", "amount": 1},
           "eval": {"benchmark": "shapes", "num_steps": 2, "batch_size": 8, "benchmark_options": {"n_per_tag": 1}}}
    folder = tmp_path / "out" / "base"
    images = folder / "evals" / "step_000000" / "shapes" / "images"
    lines: list[str] = []
    evaluate_base(cfg, folder, lines.append)
    first = {p.name: p.read_bytes() for p in sorted(images.glob("*.png"))}
    stamps = {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")}
    evaluate_base(cfg, folder, lines.append)  # same weights: every image reused, none written again
    assert {p.name: p.stat().st_mtime_ns for p in images.glob("*.png")} == stamps
    weights = next((base / "transformer").glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}, weights)
    lines.clear()
    evaluate_base(cfg, folder, lines.append)
    assert any("[base]" in line and "redo" in line.lower() for line in lines), lines
    assert {p.name: p.read_bytes() for p in sorted(images.glob("*.png"))} != first
