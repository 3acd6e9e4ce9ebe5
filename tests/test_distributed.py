"""Results that do not depend on the number of processes: 2 processes (accelerate launch and torchrun, gloo on CPU)
equal one process with the same global batch, and one process with 2 accumulation slots, for SFT, SOAR and
Flow-GRPO; a 2-process evaluation writes the same samples and scores as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soarbench.harness.train import train
from soarbench.models import SD3Adapter

import reward_plugins  # registers the test rewards in this process too
from micro_runs import MICRO_RUNS, method_toml

METHODS = sorted(MICRO_RUNS)
LAUNCHERS = {
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
}


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir, shapes_data):
    """A folder with links to the micro model and data (the test rewards come from tests/reward_plugins.py)."""
    root = tmp_path_factory.mktemp("dist")
    (root / "model").symlink_to(tiny_model_dir)
    (root / "train.jsonl").symlink_to(shapes_data)
    (root / "images").symlink_to(shapes_data.parent / "images")
    return root


def _config(job: Path, method: str, batch: int, accumulation: int) -> Path:
    path = job / f"{method}-{batch}-{accumulation}.toml"
    path.write_text(f'[model]\npath = "{job / "model"}"\nmax_sequence_length = 0\n'
                    f'[data]\njsonl = "{job / "train.jsonl"}"\n[method]\n{method_toml(method)}\n'
                    f'[train]\nseed = 5\nbatch_size = {batch}\ngradient_accumulation_steps = {accumulation}\n'
                    'lr = 1e-3\nthreads = 1\ndevice = "cpu"\ncheckpoint_every = 1\ncheck_replicas = true\n'
                    '[budget]\nunit = "optimizer_steps"\namount = 2\n')
    return path


def _launch(job: Path, launcher: str, port: int, *args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **reward_plugins.ENV,
           "PYTHONPATH": f"{reward_plugins.FOLDER}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = LAUNCHERS[launcher] + [str(port), "-m", "soarbench", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=job)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _in_process(job: Path, method: str, batch: int, accumulation: int, out: Path) -> Path:
    from soarbench import config as C

    train(C.load_toml(_config(job, method, batch, accumulation)), out, log=lambda m: None)
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return SD3Adapter.from_pretrained(run / "checkpoints" / "step_000002").transformer.state_dict()


def _close(a: dict, b: dict, initial: dict) -> None:
    """Equal within float tolerance, relative to how far training moved the weights: 0.5% of the largest move.
    (Another grouping of the same samples reorders float sums; DiffusionNFT's two LoRA steps move the weights by
    only ~5e-3, so its ~1.4e-5 of reduction noise is 0.3% of the move, while a wrong gradient, a lost or doubled
    sample, is of the order of the move itself.)"""
    moved = max(float((a[k] - initial[k]).abs().max()) for k in a)
    assert moved > 1e-4  # training did something
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 5e-3 * moved, (worst, moved)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_equal_one_process(job, method, tmp_path):
    _launch(job, "accelerate", 29611 + sorted(METHODS).index(method), "train", "--config", _config(job, method, 2, 1),
            "--out", tmp_path / "two")
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == 2 and run["engine"] == "multi_cpu"
    one_big = _in_process(job, method, 4, 1, tmp_path / "one_big")  # the same global batch in one micro-batch
    one_acc = _in_process(job, method, 2, 2, tmp_path / "one_acc")  # ... in two accumulation slots
    assert json.loads((one_acc / "run.json").read_text())["global_batch"] == run["global_batch"]
    initial = SD3Adapter.from_pretrained(job / "model").transformer.state_dict()
    two = _weights(tmp_path / "two")
    _close(_weights(one_big), two, initial)
    _close(_weights(one_acc), two, initial)
    if method == "actor_critic":  # the value head, outside the engine's wrapper, follows the same trajectory
        from safetensors.torch import load_file

        heads = [load_file(r / "checkpoints" / "step_000002" / "value_head" / "value_head.safetensors")
                 for r in (tmp_path / "two", one_big, one_acc)]
        for other in heads[1:]:
            assert max(float((heads[0][k] - other[k]).abs().max()) for k in other) <= 1e-5
    logs = [[json.loads(x)["budget"] for x in (r / "train_log.jsonl").read_text().splitlines()]
            for r in (tmp_path / "two", one_acc)]
    assert [{k: v for k, v in b.items() if k not in ("wall_s", "device_s")} for b in logs[0]] == \
        [{k: v for k, v in b.items() if k not in ("wall_s", "device_s")} for b in logs[1]]


def test_torchrun_equals_accelerate(job, tmp_path):
    for launcher, port in (("torchrun", 29631), ("accelerate", 29632)):
        _launch(job, launcher, port, "train", "--config", _config(job, "soar", 2, 1), "--out", tmp_path / launcher)
    a, b = _weights(tmp_path / "torchrun"), _weights(tmp_path / "accelerate")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_eval_equals_one_process(job, tmp_path):
    """Each batch is computed by one process exactly as a one-process run computes it (same threads per process:
    a different thread count may change float reductions)."""
    args = ["eval", "--model", job / "model", "--benchmark", "shapes", "--steps", "2", "--batch-size", "5"]
    _launch(job, "accelerate", 29641, *args, "--out", tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "soarbench", *map(str, args), "--out", str(tmp_path / "one")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [(tmp_path / d / "samples.jsonl").read_text().splitlines() for d in ("one", "two")]
    assert rows[0] == rows[1] and len(rows[0]) > 5
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two")]
    assert summaries[0]["scores"] == summaries[1]["scores"]
    for image in sorted((tmp_path / "one" / "images").glob("*.png")):
        assert image.read_bytes() == (tmp_path / "two" / "images" / image.name).read_bytes()
