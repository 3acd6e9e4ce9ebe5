"""Shared fixtures: a tiny SD3 built in the test session (the real diffusers classes, random weights).

Every test that needs that model (training, evaluation, the CLI end to end: anything using `tiny_model_dir`,
directly or through another fixture) is marked `model`; `make test-fast` runs the others (`-m "not model"`)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import soarbench  # noqa: F401  (torchvision fallback first)

SHARED = Path(__file__).resolve().parents[2] / "shared"

MICRO = dict(image_size=32, vae_channels=(8, 8), latent_channels=4, text_hidden=16, text_layers=1, text_heads=2,
             text_max_length=16, layers=1, heads=2, head_dim=8, patch_size=2, seed=0)


def pytest_collection_modifyitems(items):
    for item in items:
        if "tiny_model_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from soarbench.models.tiny import TinySD3Config, build_tiny_sd3

    torch.set_num_threads(2)
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny") / "model", TinySD3Config(**MICRO))


@pytest.fixture()
def adapter(tiny_model_dir):
    from soarbench.models import SD3Adapter

    return SD3Adapter.from_pretrained(tiny_model_dir, max_sequence_length=0)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    from soarbench.worlds.shapes import write_training_split

    return write_training_split(tmp_path_factory.mktemp("shapes"), n_images=64, seed=3, size=32)


@pytest.fixture()
def cli(monkeypatch, capsys):
    """cli(*args) -> (exit code, stdout, stderr) of one `soarbench` command line, run in-process."""
    import sys

    from soarbench.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["soarbench", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out.strip(), out.err.strip()

    return run
