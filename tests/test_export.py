"""The README's diffusers lines, run as written on the shipped base, on a checkpoint trained from it, and on
that checkpoint exported by `soarbench export` (the snippets are read from README.md, so the two cannot drift)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "benchmarks" / "shapes" / "base"
README_CHECKPOINT = "runs/sft/checkpoints/step_000700"
README_EXPORT = "exported/sft"


def _readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _snippet(needle: str) -> str:
    found = [b for b in _readme_blocks("python") if needle in b]
    assert len(found) == 1, f"README.md: expected one python block with {needle!r}"
    return found[0]


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, shapes_data):
    """Two SFT steps from the shipped base (full fine-tuning: the checkpoint holds the transformer)."""
    from soarbench.harness.train import train

    run = tmp_path_factory.mktemp("run") / "r"
    cfg = {"model": {"path": str(BASE)}, "data": {"jsonl": str(shapes_data)},
           "method": {"name": "sft"}, "train": {"seed": 2, "batch_size": 2, "lr": 1e-3, "threads": 2},
           "budget": {"unit": "optimizer_steps", "amount": 2}}
    train(cfg, run, log=lambda m: None)
    return run / "checkpoints" / "step_000002"


def test_readme_diffusers_lines_run_on_the_base_and_a_checkpoint(sft_checkpoint, monkeypatch):
    code = _snippet("StableDiffusion3Pipeline.from_pretrained(base")
    assert f'"{README_CHECKPOINT}"' in code
    monkeypatch.chdir(ROOT)  # the README's relative base path
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code.replace(README_CHECKPOINT, str(sft_checkpoint)), "README.md", "exec"), scope)
    pipe, image = scope["pipe"], scope["image"]
    assert image.size == (32, 32) and np.asarray(image).std() > 0
    # every component in one dtype (float32), and the checkpoint's transformer is the one sampling
    assert {m.dtype for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)} == {torch.float32}
    from soarbench.models import SD3Adapter

    ours = SD3Adapter.from_pretrained(sft_checkpoint).transformer.state_dict()
    base = SD3Adapter.from_pretrained(BASE).transformer.state_dict()
    theirs = pipe.transformer.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert any(not torch.equal(ours[k], base[k]) for k in ours)  # trained: not the base's weights


def test_readme_export_command_and_lines_give_a_whole_pipeline(sft_checkpoint, tmp_path, monkeypatch, cli):
    [command] = [line for b in _readme_blocks("bash") for line in b.splitlines()
                 if line.startswith("soarbench export ")]
    out = tmp_path / "exported" / "sft"
    args = command.replace(README_CHECKPOINT, str(sft_checkpoint)).replace(README_EXPORT, str(out)).split()[1:]
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert stdout == str(out) and not [p for p in out.parent.iterdir() if p.name != "sft"]  # no temp folder left
    index = json.loads((out / "model_index.json").read_text())
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert index[name][0] is not None and (out / name).is_dir()
    assert json.loads((out / "soarbench_model.json").read_text()) == {"max_sequence_length": 0}

    code = _snippet("DiffusionPipeline.from_pretrained(")
    scope: dict = {}
    exec(compile(code.replace(README_EXPORT, str(out)), "README.md", "exec"), scope)
    pipe, image = scope["pipe"], scope["image"]
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and image.size == (32, 32)
    from soarbench.models import SD3Adapter

    ckpt = SD3Adapter.from_pretrained(sft_checkpoint)
    exported = SD3Adapter.from_pretrained(out)  # SHA256SUMS verified
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(ckpt.pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert exported.max_sequence_length == 0
    # the same sampling from the export and from the checkpoint (diffusers, same noise)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    one = pipe("a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=0, generator=g(),
               output_type="np").images
    ckpt.pipe.set_progress_bar_config(disable=True)
    two = ckpt.pipe("a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=0, generator=g(),
                    output_type="np").images
    assert np.allclose(one, two, atol=1e-5)  # the same weights; float rounding of threaded kernels aside


def test_export_refuses_a_non_empty_out_and_writes_nothing(sft_checkpoint, tmp_path, cli):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("export", sft_checkpoint, "--out", out)
    assert code == 2 and err == f"error: {out}: already exists and is not an empty folder; choose a new --out " \
                                "(nothing is overwritten)"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_of_a_lora_checkpoint_is_merged(tiny_model_dir, shapes_data, tmp_path):
    """Flow-GRPO trains a LoRA: the export's transformer equals the base with the LoRA loaded by diffusers."""
    from diffusers import StableDiffusion3Pipeline

    from soarbench.export import export_pipeline
    from soarbench.harness.train import train
    from test_method_contract import _cfg, _forward

    cfg, _ = _cfg(tiny_model_dir, shapes_data, "flow_grpo", units=1)
    cfg["train"]["lr"] = 3e-2
    train(cfg, tmp_path / "r", log=lambda m: None)
    ckpt = tmp_path / "r" / "checkpoints" / "step_000002"
    out = export_pipeline(ckpt, tmp_path / "x")
    assert not (out / "lora").exists() and not (out / "soarbench_checkpoint.json").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(ckpt / "lora")
    exported = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert torch.allclose(_forward(pipe.transformer), _forward(exported.transformer), atol=1e-5)
