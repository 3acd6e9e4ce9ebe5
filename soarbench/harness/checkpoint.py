"""Checkpoints that resume: trained components, optimizer state, counters, data order and every RNG.

RUN_DIR/checkpoints/step_NNNNNN/ holds the components (loadable by SD3Adapter.from_pretrained, so `soarbench
eval --model` takes it directly) and trainer_state.pt. A checkpoint is written to a temporary folder and renamed,
so a crash never leaves a half-written one under its final name.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    found = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, adapter, components, base_model: Path, trainer_state: dict,
                    extra: dict, modules: dict | None = None) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter.save_components(tmp, components, base_model, extra, modules)
    torch.save(trainer_state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def load_trainer_state(folder: Path) -> dict:
    # weights_only: the state holds tensors, numbers, strings, lists and dicts only
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
