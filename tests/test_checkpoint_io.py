"""Checkpoint files: sealed writes, failed writes that damage nothing, resume from the last good one; model
folders checked against SHA256SUMS; checkpoints that find their base after being moved."""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from soarbench.errors import UserError
from soarbench.harness.checkpoint import (MARKER_FILE, STATE_FILE, checkpoint_dir, latest_checkpoint,
                                          load_trainer_state, save_checkpoint, write_checkpoint)


def _writer(step: int, payload: bytes = b"weights"):
    def write(folder: Path) -> None:
        (folder / "transformer").mkdir()
        (folder / "transformer" / "model.bin").write_bytes(payload * 100)
        torch.save({"step": step, "x": torch.arange(4)}, folder / STATE_FILE)
    return write


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_seals_with_a_marker_listing_every_file(tmp_path):
    final = write_checkpoint(checkpoint_dir(tmp_path, 5), _writer(5))
    assert final == tmp_path / "checkpoints" / "step_000005"
    marker = json.loads((final / MARKER_FILE).read_text())
    expected = {rel: (final / rel).stat().st_size for rel in ("SHA256SUMS", "transformer/model.bin", STATE_FILE)}
    assert marker["files"] == expected
    # the sums, in sha256sum's format, cover every file but themselves and the marker written after them
    sums = {rel: hashlib.sha256((final / rel).read_bytes()).hexdigest()
            for rel in (STATE_FILE, "transformer/model.bin")}
    assert (final / "SHA256SUMS").read_text() == "".join(f"{h}  {rel}\n" for rel, h in sorted(sums.items()))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005"]  # no .tmp left
    assert load_trainer_state(final)["step"] == 5


def test_rewriting_a_step_replaces_it_whole(tmp_path):
    write_checkpoint(checkpoint_dir(tmp_path, 5), _writer(5, b"a"))
    final = write_checkpoint(checkpoint_dir(tmp_path, 5), _writer(5, b"b"))
    assert (final / "transformer" / "model.bin").read_bytes() == b"b" * 100
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005"]


def test_disk_full_mid_write_keeps_earlier_checkpoints_and_names_the_last_good(tmp_path):
    write_checkpoint(checkpoint_dir(tmp_path, 10), _writer(10))
    write_checkpoint(checkpoint_dir(tmp_path, 20), _writer(20))
    before = _tree_digest(tmp_path / "checkpoints")

    def full_disk(folder: Path) -> None:
        (folder / "transformer").mkdir()
        with open(folder / "transformer" / "model.bin", "wb") as f:
            f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "transformer" / "model.bin"))

    with pytest.raises(UserError) as e:
        write_checkpoint(checkpoint_dir(tmp_path, 30), full_disk)
    message = str(e.value)
    assert message.startswith("checkpoint step 30 could not be written (No space left on device: ")
    assert message.endswith(f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step_000020'}")
    assert "\n" not in message
    assert _tree_digest(tmp_path / "checkpoints") == before  # nothing damaged, no step_000030.tmp left
    assert latest_checkpoint(tmp_path, warn=pytest.fail) == tmp_path / "checkpoints" / "step_000020"


def test_disk_full_while_replacing_the_same_step_keeps_the_old_copy(tmp_path):
    write_checkpoint(checkpoint_dir(tmp_path, 10), _writer(10, b"old"))

    def full_disk(folder: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="checkpoint step 10 could not be written"):
        write_checkpoint(checkpoint_dir(tmp_path, 10), full_disk)
    assert (checkpoint_dir(tmp_path, 10) / "transformer" / "model.bin").read_bytes() == b"old" * 100


def test_a_writer_that_crashes_half_way_leaves_nothing_and_reraises(tmp_path):
    write_checkpoint(checkpoint_dir(tmp_path, 10), _writer(10))

    def crash(folder: Path) -> None:
        (folder / "half").write_bytes(b"1234")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_checkpoint(checkpoint_dir(tmp_path, 20), crash)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000010"]


def test_resume_skips_a_killed_write_a_torn_state_and_a_missing_marker(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30, 40):
        write_checkpoint(checkpoint_dir(tmp_path, step), _writer(step))
    # step 40: the process was killed after writing it, before the marker (simulated by removing it)
    (checkpoint_dir(tmp_path, 40) / MARKER_FILE).unlink()
    # step 30: its trainer state was truncated (a torn write the marker's sizes catch)
    state = checkpoint_dir(tmp_path, 30) / STATE_FILE
    state.write_bytes(state.read_bytes()[:50])
    # step 50: a kill mid-write leaves its temporary folder
    (root / "step_000050.tmp").mkdir()
    (root / "step_000050.tmp" / "partial").write_bytes(b"..")
    warnings: list[str] = []
    assert latest_checkpoint(tmp_path, warn=warnings.append) == checkpoint_dir(tmp_path, 20)
    assert load_trainer_state(latest_checkpoint(tmp_path, warn=lambda _: None))["step"] == 20
    text = "\n".join(warnings)
    assert f"skipping {root / 'step_000050.tmp'}: an unfinished checkpoint write" in text
    assert f"skipping {checkpoint_dir(tmp_path, 40)}: no {MARKER_FILE}" in text
    assert f"skipping {checkpoint_dir(tmp_path, 30)}: {STATE_FILE} has 50 bytes" in text
    assert len(warnings) == 3


def test_a_state_file_with_the_right_size_but_garbage_is_skipped(tmp_path):
    write_checkpoint(checkpoint_dir(tmp_path, 10), _writer(10))
    write_checkpoint(checkpoint_dir(tmp_path, 20), _writer(20))
    state = checkpoint_dir(tmp_path, 20) / STATE_FILE
    state.write_bytes(b"\0" * state.stat().st_size)
    warnings: list[str] = []
    assert latest_checkpoint(tmp_path, warn=warnings.append) == checkpoint_dir(tmp_path, 10)
    assert warnings == [f"skipping {checkpoint_dir(tmp_path, 20)}: {STATE_FILE} is unreadable (File is not a zip file)"]
    with pytest.raises(UserError, match=f"{STATE_FILE}: sha256 .* differs from"):  # the sums catch it first
        load_trainer_state(checkpoint_dir(tmp_path, 20))
    (checkpoint_dir(tmp_path, 20) / "SHA256SUMS").unlink()  # as written before checkpoints carried sums
    with pytest.raises(UserError, match="the trainer state cannot be read"):
        load_trainer_state(checkpoint_dir(tmp_path, 20))


def test_no_checkpoints_at_all(tmp_path):
    assert latest_checkpoint(tmp_path, warn=pytest.fail) is None


def test_save_checkpoint_writes_a_loadable_sealed_checkpoint(adapter, tiny_model_dir, tmp_path):
    from soarbench.models import SD3Adapter

    with torch.no_grad():
        next(adapter.transformer.parameters()).add_(0.5)
    final = save_checkpoint(tmp_path / "run", 7, adapter, ["transformer"], tiny_model_dir, {"step": 7}, {"step": 7})
    assert final == checkpoint_dir(tmp_path / "run", 7)
    assert latest_checkpoint(tmp_path / "run", warn=pytest.fail) == final
    loaded = SD3Adapter.from_pretrained(final)
    assert torch.equal(next(loaded.transformer.parameters()), next(adapter.transformer.parameters()))


# ------------------------------------------------------------------------------------------------ base model paths
def test_checkpoint_finds_its_base_relative_after_moving_the_whole_tree(adapter, tiny_model_dir, tmp_path):
    from soarbench.models import SD3Adapter

    tree = tmp_path / "tree"
    shutil.copytree(tiny_model_dir, tree / "base")
    save_checkpoint(tree / "runs" / "r", 1, adapter, ["transformer"], tree / "base", {}, {"step": 1})
    record = json.loads((checkpoint_dir(tree / "runs" / "r", 1) / "soarbench_checkpoint.json").read_text())
    assert record["base_model"] == "../../../../base"
    assert record["base_model_absolute"] == str((tree / "base").resolve())
    tree.rename(tmp_path / "moved")  # the absolute path is gone; the relative one still works
    moved = checkpoint_dir(tmp_path / "moved" / "runs" / "r", 1)
    assert SD3Adapter.from_pretrained(moved).checkpoint["step"] == 1


def test_checkpoint_falls_back_to_the_absolute_base_path_and_names_both_when_missing(adapter, tiny_model_dir,
                                                                                       tmp_path):
    from soarbench.models import SD3Adapter

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    save_checkpoint(tmp_path / "run", 1, adapter, ["transformer"], tmp_path / "base", {}, {"step": 1})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").rename(tmp_path / "elsewhere" / "run")  # moved alone: the absolute path is used
    ckpt = checkpoint_dir(tmp_path / "elsewhere" / "run", 1)
    assert SD3Adapter.from_pretrained(ckpt).checkpoint["step"] == 1
    (tmp_path / "base").rename(tmp_path / "gone")
    with pytest.raises(UserError) as e:
        SD3Adapter.from_pretrained(ckpt)
    assert str(e.value) == (f"{ckpt / 'soarbench_checkpoint.json'}: its base model is missing: neither "
                            f"{tmp_path / 'elsewhere' / 'base'} nor {tmp_path / 'base'} exists (move the base model "
                            f"with the run folder, or put it back at the absolute path)")


# ------------------------------------------------------------------------------------------------ SHA256SUMS
def _write_sums(folder: Path) -> None:
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder).as_posix()}"
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_sha256sums_of_the_shipped_base_verify():
    from soarbench.models.sd3 import verify_sha256sums

    base = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes" / "base"
    listed = [line for line in (base / "SHA256SUMS").read_text().splitlines() if line.strip()]
    assert verify_sha256sums(base) == len(listed) == 16


def test_a_changed_file_is_named_in_one_line(tiny_model_dir, tmp_path):
    from soarbench.models import SD3Adapter

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    _write_sums(model)
    assert SD3Adapter.from_pretrained(model, max_sequence_length=0).max_sequence_length == 0
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        SD3Adapter.from_pretrained(model)
    message = str(e.value)
    assert message.startswith(f"{weights}: sha256 ") and "differs from" in message and "\n" not in message
    weights.unlink()
    with pytest.raises(UserError, match="transformer/diffusion_pytorch_model.safetensors: listed in .* but missing"):
        SD3Adapter.from_pretrained(model)
    (model / "SHA256SUMS").write_text("nonsense\n")
    with pytest.raises(UserError, match=r"SHA256SUMS:1: expected '<64 hex digits>  <file>'"):
        SD3Adapter.from_pretrained(model)


def test_a_checkpoint_that_ships_sha256sums_is_checked_too(adapter, tiny_model_dir, tmp_path):
    from soarbench.models import SD3Adapter

    ckpt = save_checkpoint(tmp_path / "run", 2, adapter, ["transformer"], tiny_model_dir, {"step": 2}, {})
    _write_sums(ckpt)
    SD3Adapter.from_pretrained(ckpt)
    (ckpt / "transformer" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="transformer/config.json: sha256 .* differs from"):
        SD3Adapter.from_pretrained(ckpt)


def test_a_bad_recorded_sequence_length_is_one_line(tiny_model_dir, tmp_path):
    from soarbench.models.sd3 import recorded_sequence_length

    base = tmp_path / "base"
    base.mkdir()
    assert recorded_sequence_length(base, None) == 77
    (base / "soarbench_model.json").write_text('{"max_sequence_length": 12}')
    assert recorded_sequence_length(base, None) == 12
    assert recorded_sequence_length(base, {"max_sequence_length": 0}) == 0
    (base / "soarbench_model.json").write_text('{"max_sequence_length": "long"}')
    with pytest.raises(UserError, match=r'soarbench_model.json: max_sequence_length = "long": expected an integer'):
        recorded_sequence_length(base, None)
    (base / "soarbench_model.json").write_text("{oops")
    with pytest.raises(UserError, match="soarbench_model.json: not valid JSON"):
        recorded_sequence_length(base, None)


def test_training_resumes_from_the_last_good_checkpoint_past_a_torn_one(tiny_model_dir, shapes_data, tmp_path,
                                                                         capsys):
    """End to end through the trainer: the newest checkpoint is torn and a killed write left a .tmp folder; the
    resumed run restarts from the one before and ends bit-for-bit where an uninterrupted run ends."""
    from soarbench.harness.train import train
    from soarbench.models import SD3Adapter

    cfg = {"model": {"path": str(tiny_model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(shapes_data)},
           "method": {"name": "sft"}, "train": {"seed": 5, "batch_size": 4, "lr": 1e-3, "threads": 2},
           "budget": {"unit": "optimizer_steps", "amount": 4}}
    train(cfg, tmp_path / "straight", log=lambda m: None)
    every = {**cfg, "train": {**cfg["train"], "checkpoint_every": 1}}
    train({**every, "budget": {"unit": "optimizer_steps", "amount": 3}}, tmp_path / "cut", log=lambda m: None)
    state = checkpoint_dir(tmp_path / "cut", 3) / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # torn by a crash
    leftover = tmp_path / "cut" / "checkpoints" / "step_000004.tmp"
    leftover.mkdir()
    capsys.readouterr()
    logs: list[str] = []
    train(every, tmp_path / "cut", resume=True, log=logs.append)
    assert f"resumed from {checkpoint_dir(tmp_path / 'cut', 2)} at step 2" in logs
    warned = "\n".join(logs)  # the warnings go to the run's log
    assert f"skipping {checkpoint_dir(tmp_path / 'cut', 3)}: {STATE_FILE} has" in warned and str(leftover) in warned
    a = SD3Adapter.from_pretrained(checkpoint_dir(tmp_path / "straight", 4), max_sequence_length=0)
    b = SD3Adapter.from_pretrained(checkpoint_dir(tmp_path / "cut", 4), max_sequence_length=0)
    for (name, p), q in zip(a.transformer.named_parameters(), b.transformer.parameters()):
        assert torch.equal(p, q), name
    assert not leftover.exists()  # writing step 4 again cleared the killed write's leftover
    assert latest_checkpoint(tmp_path / "cut", warn=pytest.fail) == checkpoint_dir(tmp_path / "cut", 4)


# ------------------------------------------------------------------------------------------------ damaged checkpoints
def _flip(path: Path, n: int = 4000) -> None:
    """Flip n bytes in the middle of a file, keeping its size (what COMPLETE.json's sizes cannot see)."""
    data = bytearray(path.read_bytes())
    start = (len(data) - n) // 2
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


def test_eval_refuses_a_checkpoint_with_flipped_bytes_in_one_line(adapter, tiny_model_dir, tmp_path, cli):
    ckpt = save_checkpoint(tmp_path / "run", 3, adapter, ["transformer"], tiny_model_dir, {"step": 3}, {})
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    assert f"  transformer/{weights.name}\n" in (ckpt / "SHA256SUMS").read_text()
    _flip(weights)
    assert latest_checkpoint(tmp_path / "run", warn=pytest.fail) == ckpt  # the sizes still match
    code, out, err = cli("eval", "--model", ckpt, "--benchmark", "shapes", "--option", "n_per_tag=1",
                         "--out", tmp_path / "eval")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: {weights}: sha256 ") and "the file is damaged or was changed" in err
    assert not (tmp_path / "eval").exists()  # refused before anything was written


def test_resume_names_a_damaged_checkpoint_and_the_one_to_continue_from(tmp_path):
    for step in (10, 20):
        write_checkpoint(checkpoint_dir(tmp_path, step), _writer(step))
    damaged = checkpoint_dir(tmp_path, 20)
    _flip(damaged / "transformer" / "model.bin", 40)
    assert latest_checkpoint(tmp_path, warn=pytest.fail) == damaged
    with pytest.raises(UserError) as e:
        load_trainer_state(damaged)
    message = str(e.value)
    assert message.startswith(f"checkpoint {damaged} is damaged: {damaged / 'transformer' / 'model.bin'}: sha256 ")
    assert message.endswith(f"; move it out of {tmp_path / 'checkpoints'} (or delete it) and rerun with --resume to "
                            f"continue from {checkpoint_dir(tmp_path, 10)}")
    assert "\n" not in message
    shutil.rmtree(damaged)  # what the message says to do: resume then takes step 10
    assert load_trainer_state(latest_checkpoint(tmp_path, warn=pytest.fail))["step"] == 10
    _flip(checkpoint_dir(tmp_path, 10) / STATE_FILE, 40)
    with pytest.raises(UserError, match=r"continue from the start \(no earlier complete checkpoint\)$"):
        load_trainer_state(checkpoint_dir(tmp_path, 10))


def test_train_resume_refuses_a_damaged_checkpoint(tiny_model_dir, shapes_data, tmp_path):
    from soarbench.harness.train import train

    cfg = {"model": {"path": str(tiny_model_dir), "max_sequence_length": 0}, "data": {"jsonl": str(shapes_data)},
           "method": {"name": "sft"}, "train": {"seed": 5, "batch_size": 4, "lr": 1e-3, "threads": 2,
                                                "checkpoint_every": 1},
           "budget": {"unit": "optimizer_steps", "amount": 2}}
    train(cfg, tmp_path / "run", log=lambda m: None)
    weights = checkpoint_dir(tmp_path / "run", 2) / "transformer" / "diffusion_pytorch_model.safetensors"
    _flip(weights)
    with pytest.raises(UserError, match=rf"^checkpoint .*step_000002 is damaged: {weights}: sha256 .* continue "
                                        rf"from {checkpoint_dir(tmp_path / 'run', 1)}$"):
        train({**cfg, "budget": {"unit": "optimizer_steps", "amount": 3}}, tmp_path / "run", resume=True,
              log=lambda m: None)
