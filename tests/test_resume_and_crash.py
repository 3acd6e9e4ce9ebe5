"""Nothing lost, nothing silently wrong: runs killed (SIGKILL) during a step, a checkpoint write or an evaluation
resume to bit-identical weights, logs and evaluation results; a non-finite loss stops the run; --resume refuses a
changed config; an eval folder refuses other settings and redoes a torn line."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from soarbench.errors import UserError
from soarbench.harness.train import train
from soarbench.models import SD3Adapter

import reward_plugins  # noqa: F401  (the test rewards)
from micro_runs import MICRO_RUNS, method_toml

# the group methods resume on the GenEval reward (its rules engine through the crash), one optimizer step an epoch
_GENEVAL_EPOCHS = {"rewards": {"geneval": 1.0}, "optimizer_steps_per_epoch": 1}
RESUME_OVERRIDES = {name: _GENEVAL_EPOCHS for name in ("flow_grpo", "diffusion_nft", "dance_grpo", "actor_critic")}
METHODS = sorted(MICRO_RUNS)


def _write_config(folder: Path, model: Path, data: Path, method: str) -> Path:
    path = folder / f"{method}.toml"
    path.write_text(f'[model]\npath = "{model}"\nmax_sequence_length = 0\n[data]\njsonl = "{data}"\n'
                    f'[method]\n{method_toml(method, **RESUME_OVERRIDES.get(method, {}))}\n'
                    '[train]\nseed = 3\nbatch_size = 2\nlr = 1e-3\nthreads = 1\n'
                    'checkpoint_every = 1\n[budget]\nunit = "optimizer_steps"\namount = 4\n'
                    '[eval]\nbenchmark = "shapes"\npoints = 2\nnum_steps = 2\nbatch_size = 4\n'
                    'benchmark_options = { n_per_tag = 1 }\n')
    return path


def _env(fault: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **reward_plugins.ENV,
           "PYTHONPATH": f"{reward_plugins.FOLDER}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("SOARBENCH_FAULT", None)
    if fault:
        env["SOARBENCH_FAULT"] = fault
    return env


def _soarbench(args, fault: str | None = None) -> int:
    proc = subprocess.run([sys.executable, "-m", "soarbench", *map(str, args)], capture_output=True, text=True,
                          env=_env(fault), timeout=600)
    assert proc.returncode in (0, -9), proc.stderr[-3000:]
    return proc.returncode


def _timed(args, started: Path | None = None) -> tuple[float, float]:
    """Seconds an uninterrupted command takes (it must succeed), and when it wrote `started` (its work began)."""
    start = time.time()
    assert _soarbench(args) == 0
    return time.time() - start, (started.stat().st_mtime - start if started else 0.0)


def _killed_after(args, delay: float) -> int:
    """Run a command and SIGKILL it `delay` seconds after it starts, wherever it is (no fault point): -9, or its
    exit code when it finished first."""
    proc = subprocess.Popen([sys.executable, "-m", "soarbench", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _, err = proc.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL
        proc.communicate()
        return -9
    assert proc.returncode == 0, err[-3000:]
    return 0


@pytest.fixture(scope="module")
def startup(tiny_model_dir, shapes_data, tmp_path_factory) -> float:
    """Seconds a `soarbench` command takes to start (imports, the CLI): a dry run, which loads no model."""
    folder = tmp_path_factory.mktemp("startup")
    cfg = _write_config(folder, tiny_model_dir, shapes_data, "sft")
    return _timed(["train", "--config", cfg, "--out", folder / "r", "--dry-run"])[0]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, shapes_data, tmp_path_factory, startup):
    """method -> (config, uninterrupted run folder, (its duration as a command, the moment training began) in
    seconds), each run once per module, in this process (`soarbench train`'s own path, without the interpreter's
    start): the crashed commands, each a process of its own, must reproduce it bit for bit."""
    from soarbench.cli import run_training

    done: dict[str, tuple[Path, Path, tuple[float, float]]] = {}

    def get(method: str) -> tuple[Path, Path, tuple[float, float]]:
        if method not in done:
            folder = tmp_path_factory.mktemp(f"straight_{method}")
            cfg = _write_config(folder, tiny_model_dir, shapes_data, method)
            run = folder / "run"
            threads, start = torch.get_num_threads(), time.time()
            try:
                run_training(cfg, run, log=lambda m: None, progress=lambda *a, **k: None)
            finally:
                torch.set_num_threads(threads)  # the config's threads = 1 is this run's, not the worker's
            done[method] = cfg, run, (startup + time.time() - start, startup)
        return done[method]

    return get


def _outcome(run: Path):
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    for r in rows:
        r["budget"] = {k: v for k, v in r["budget"].items() if k not in ("wall_s", "device_s")}
    weights = SD3Adapter.from_pretrained(run / "checkpoints" / "step_000004").transformer.state_dict()
    head = run / "checkpoints" / "step_000004" / "value_head" / "value_head.safetensors"
    if head.is_file():  # actor_critic: the value head resumes bit for bit too
        from safetensors.torch import load_file

        weights.update({f"value_head.{k}": v for k, v in load_file(head).items()})
    evals = {p.parent.parent.name: json.loads(p.read_text())["scores"]
             for p in sorted((run / "evals").glob("*/shapes/summary.json"))}
    samples = {p.parent.parent.name: p.read_text() for p in sorted((run / "evals").glob("*/shapes/samples.jsonl"))}
    return rows, weights, evals, samples


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_anywhere_then_resume_is_bit_identical(method, straight, tmp_path):
    cfg, straight_run, _ = straight(method)
    crashed = tmp_path / "crashed"
    # killed during step 3, during the write of checkpoint 2, and during the step-2 evaluation (Flow-GRPO: with
    # the EMA weights), resumed after each
    faults = ["step:3", "checkpoint:2", "eval_batch:2", None]
    for i, fault in enumerate(faults):
        args = ["train", "--config", cfg, "--out", crashed] + (["--resume"] if i else [])
        code = _soarbench(args, fault)
        assert code == (-9 if fault else 0), fault
    _assert_same_outcome(straight_run, crashed)


def _assert_same_outcome(straight_run: Path, crashed: Path) -> None:
    a, b = _outcome(straight_run), _outcome(crashed)
    assert a[0] == b[0]  # every log line, every counter
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])  # bit for bit
    assert a[2] == b[2] and list(a[2]) == ["step_000002", "step_000004"]  # no evaluation lost or changed
    assert a[3] == b[3]


@pytest.mark.parametrize("method", ["sft", "soar", "flow_grpo"])
def test_sigkill_at_random_moments_twice_then_resume_is_bit_identical(method, straight, tmp_path):
    """Killed at any moment, not only at the fault points: twice in a row at random times inside an uninterrupted
    run's duration (seeded), the first anywhere (it may land before anything is written), the second once the
    work has begun (loading, training, a checkpoint or an evaluation), then --resume to the end."""
    cfg, straight_run, (duration, began) = straight(method)
    rng = random.Random(f"chaos:{method}")
    crashed = tmp_path / "crashed"
    for i, low in enumerate((0.0, began)):
        _killed_after(["train", "--config", cfg, "--out", crashed] + (["--resume"] if i else []),
                      rng.uniform(low, duration))
    assert _soarbench(["train", "--config", cfg, "--out", crashed, "--resume"]) == 0
    _assert_same_outcome(straight_run, crashed)


def _cfg(model, data, **over):
    cfg = {"model": {"path": str(model), "max_sequence_length": 0}, "data": {"jsonl": str(data)},
           "method": {"name": "sft"}, "train": {"seed": 1, "batch_size": 2, "lr": 1e-3, "threads": 2},
           "budget": {"unit": "optimizer_steps", "amount": 3}}
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def test_a_non_finite_loss_stops_the_run_naming_the_step(tiny_model_dir, shapes_data, tmp_path):
    with pytest.raises(UserError, match=r"^step 2: the loss or gradient norm is not finite"):
        train(_cfg(tiny_model_dir, shapes_data, train={"lr": 1e9}), tmp_path / "r", log=lambda m: None)
    assert not (tmp_path / "r" / "done.json").exists()
    # the skip option keeps the weights finite and says which steps it skipped
    train(_cfg(tiny_model_dir, shapes_data, train={"lr": 1e9, "nonfinite": "skip"}), tmp_path / "s",
          log=lambda m: None)
    rows = [json.loads(x) for x in (tmp_path / "s" / "train_log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, True, True]


def test_resume_refuses_a_changed_option(tiny_model_dir, shapes_data, tmp_path):
    cfg = _cfg(tiny_model_dir, shapes_data, train={"checkpoint_every": 1})
    train(cfg, tmp_path / "r", log=lambda m: None)
    with pytest.raises(UserError, match=r"--resume: train.lr was 0.001 in .*config.toml and is 0.01 now"):
        train(_cfg(tiny_model_dir, shapes_data, train={"checkpoint_every": 1, "lr": 1e-2}), tmp_path / "r",
              resume=True, log=lambda m: None)
    # a larger budget continues the same run
    train(_cfg(tiny_model_dir, shapes_data, train={"checkpoint_every": 1}, budget={"amount": 4}), tmp_path / "r",
          resume=True, log=lambda m: None)
    assert json.loads((tmp_path / "r" / "done.json").read_text())["step"] == 4
    # a run recorded before an option existed resumes when the option is at its default (the recorded behaviour)
    recorded = tmp_path / "r" / "config.toml"
    text = recorded.read_text()
    recorded.write_text("\n".join(line for line in text.splitlines()
                                  if not line.startswith(("extra_num_steps", "frozen_dtype"))) + "\n")
    assert "extra_num_steps" in text and "frozen_dtype" in text
    train(_cfg(tiny_model_dir, shapes_data, train={"checkpoint_every": 1}, budget={"amount": 5}), tmp_path / "r",
          resume=True, log=lambda m: None)
    with pytest.raises(UserError, match=r"--resume: eval.extra_num_steps was \[\] in .* and is \[2\] now"):
        train(_cfg(tiny_model_dir, shapes_data, train={"checkpoint_every": 1}, budget={"amount": 6},
                   eval={"extra_num_steps": [2]}), tmp_path / "r", resume=True, log=lambda m: None)


def test_an_eval_folder_refuses_other_settings_and_redoes_a_torn_line(adapter, tmp_path):
    from soarbench.benchmarks import build_benchmark
    from soarbench.evaluate import evaluate

    bench = build_benchmark("shapes", n_per_tag=1, images_per_prompt=1)
    full = evaluate(adapter, bench, tmp_path / "e", num_steps=2)
    path = tmp_path / "e" / "samples.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])  # the last write torn, no newline
    again = evaluate(adapter, bench, tmp_path / "e", num_steps=2)
    assert again["n_samples"] == full["n_samples"] == len(lines) and again["scores"] == full["scores"]
    assert all(json.loads(x) for x in path.read_text().splitlines())
    with pytest.raises(UserError, match=r"holds an eval with num_steps = 2, asked 3"):
        evaluate(adapter, bench, tmp_path / "e", num_steps=3)


def _report_numbers(out: Path) -> dict[str, list[dict]]:
    """The report's tables without the measured seconds (wall_s, device_s: the only numbers a rerun changes)."""
    import csv

    tables = {}
    for name in ("main_table.csv", "final_table.csv", "paper_table.csv"):
        with open(out / "report" / name, newline="") as f:
            tables[name] = [{k: v for k, v in row.items() if k not in ("wall_s", "device_s")}
                            for row in csv.DictReader(f)]
    return tables


def test_sigkill_during_soarbench_run_then_the_same_command_gives_the_same_report(tiny_model_dir, shapes_data,
                                                                                   tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[experiment]\nname = "chaos"\n[common.model]\npath = "{tiny_model_dir}"\nmax_sequence_length = 0\n'
                   f'[common.data]\njsonl = "{shapes_data}"\n'
                   '[common.train]\nbatch_size = 2\nlr = 1e-3\nthreads = 1\ncheckpoint_every = 1\n'
                   '[common.budget]\nunit = "optimizer_steps"\namount = 3\n'
                   '[common.eval]\nbenchmark = "shapes"\npoints = 1\nnum_steps = 2\nbatch_size = 4\n'
                   'benchmark_options = { n_per_tag = 1 }\n[runs.sft]\nmethod = { name = "sft" }\n')
    duration, began = _timed(["run", exp, "--out", tmp_path / "straight"], started=tmp_path / "straight" /
                             "experiment.toml")
    # anywhere in the work: the base's evaluation, training, the run's evaluation or the report
    _killed_after(["run", exp, "--out", tmp_path / "crashed"], random.Random("chaos:run").uniform(began, duration))
    assert _soarbench(["run", exp, "--out", tmp_path / "crashed"]) == 0
    a, b = _report_numbers(tmp_path / "straight"), _report_numbers(tmp_path / "crashed")
    assert a == b and [row["label"] for row in a["final_table.csv"]] == ["base", "sft@3"]
    samples = [(out / "sft-s0" / "evals" / "step_000003" / "shapes" / "samples.jsonl").read_text()
               for out in (tmp_path / "straight", tmp_path / "crashed")]
    assert samples[0] == samples[1]  # every image's scores
