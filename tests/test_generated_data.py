"""data.generate writes only into a folder it owns (new, empty, or holding its manifest): a user's data folder is
refused in one line before anything is written or loaded, in `soarbench train` and in `soarbench run`;
`data.generate=false` turns generation off and the user's data is read as it is."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from soarbench.harness.data import ensure_generated
from soarbench.worlds import shapes

SHIPPED = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes" / "sft.toml"


def _user_folder(root: Path) -> Path:
    """A user's own data: three lines over one 32 px image."""
    folder = root / "mine"
    (folder / "images").mkdir(parents=True)
    image = np.full((32, 32, 3), 153, dtype=np.uint8)
    image[4:12, 4:12] = shapes.PALETTE["red"]
    (folder / "images" / "abc.png").write_bytes(shapes.encode_png(image))
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"md5": "abc", "caption_en": f"a photo of a red square {i}", "bw": 32, "bh": 32}) + "\n"
        for i in range(3)))
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generation_refuses_a_users_folder_in_one_line_and_writes_nothing(cli, tiny_model_dir, tmp_path):
    folder = _user_folder(tmp_path)
    before = _snapshot(folder)
    # the shipped config's generate table, with a model folder that is missing (the case first reported: the
    # command failed on the model after the data had been written over) and with one that exists
    code, _, err = cli("train", "--config", SHIPPED, "--set", f"data.jsonl={folder / 'train.jsonl'}",
                       "--set", f"model.path={tmp_path / 'no_model'}", "--out", tmp_path / "run")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert _snapshot(folder) == before and not (tmp_path / "run").exists()
    code, _, err = cli("train", "--config", SHIPPED, "--set", f"data.jsonl={folder / 'train.jsonl'}",
                       "--set", f"model.path={tiny_model_dir}", "--out", tmp_path / "run")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: data.jsonl = {folder / 'train.jsonl'}: ") and "shapes_world.json" in err
    assert "--set data.generate=false" in err
    assert _snapshot(folder) == before  # byte-identical, nothing added (no images, no manifest)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["{}", ""])
def test_an_empty_generate_value_is_refused_pointing_at_the_off_switch(cli, tmp_path, value):
    folder = _user_folder(tmp_path)
    code, _, err = cli("train", "--config", SHIPPED, "--set", f"data.jsonl={folder / 'train.jsonl'}",
                       "--set", f"data.generate={value}", "--out", tmp_path / "run")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: config: data.generate = ") and "or false to train on data.jsonl as it is" in err


def test_the_off_switch_trains_on_the_users_data_as_it_is(cli, tiny_model_dir, tmp_path):
    folder = _user_folder(tmp_path)
    before = _snapshot(folder)
    code, _, err = cli("train", "--config", SHIPPED, "--set", f"data.jsonl={folder / 'train.jsonl'}",
                       "--set", "data.generate=false", "--set", f"model.path={tiny_model_dir}",
                       "--set", "budget.unit=optimizer_steps", "--set", "budget.amount=1",
                       "--set", "train.batch_size=2", "--set", "train.global_batch_size=2", "--set", "eval.points=0",
                       "--out", tmp_path / "run")
    assert code == 0, err
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert row["budget"]["unique_prompts"] == 2  # one step of 2 of the user's 3 captions
    assert _snapshot(folder) == before
    assert "generate" not in (tmp_path / "run" / "config.toml").read_text()


def test_run_refuses_generating_over_a_users_folder_before_anything_is_written(cli, tmp_path):
    folder = _user_folder(tmp_path)
    before = _snapshot(folder)
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[common.model]\npath = "{tmp_path / "no_model"}"\n'
                   f'[common.data]\njsonl = "{folder / "train.jsonl"}"\n'
                   'generate = { world = "shapes", n_images = 4000, seed = 1, image_size = 32 }\n'
                   '[common.budget]\nunit = "optimizer_steps"\namount = 2\n'
                   '[runs.sft]\nmethod = { name = "sft" }\n')
    code, _, err = cli("run", exp, "--out", tmp_path / "out")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"run 'sft-s0': data.jsonl = {folder / 'train.jsonl'}: " in err and "data.generate=false" in err
    assert _snapshot(folder) == before and not (tmp_path / "out").exists()


def test_generate_needs_data_jsonl_named_train_jsonl_and_writes_nothing_otherwise(tmp_path):
    from soarbench.errors import UserError

    cfg = {"jsonl": str(tmp_path / "new" / "mine.jsonl"), "generate": {"world": "shapes", "n_images": 4}}
    with pytest.raises(UserError, match=r"must end in /train.jsonl .*data.generate=false"):
        ensure_generated(cfg)
    assert not (tmp_path / "new").exists()


def test_an_owned_folder_is_written_again_even_after_a_write_killed_half_way(tmp_path):
    jsonl = tmp_path / "gen" / "train.jsonl"
    cfg = {"jsonl": str(jsonl), "generate": {"world": "shapes", "n_images": 6, "seed": 5, "image_size": 32}}
    ensure_generated(cfg)  # a new folder is the world's
    full = _snapshot(jsonl.parent)
    # killed half-way through a rewrite: the claim written first, train.jsonl and an image gone
    (jsonl.parent / shapes.MANIFEST).write_text(json.dumps({"world": "shapes", "complete": False}) + "\n")
    jsonl.unlink()
    next(iter((jsonl.parent / "images").iterdir())).unlink()
    assert shapes.owns_folder(jsonl.parent) and not shapes.is_current_training_split(jsonl.parent, 6, 5, 32)
    ensure_generated(cfg)
    assert _snapshot(jsonl.parent) == full
    # an empty folder is the world's too; a folder with any other file is not
    (tmp_path / "empty").mkdir()
    assert shapes.owns_folder(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    assert not shapes.owns_folder(tmp_path / "empty")


def test_soarbench_data_shapes_refuses_a_users_folder_too(cli, tmp_path):
    folder = _user_folder(tmp_path)
    before = _snapshot(folder)
    code, _, err = cli("data", "shapes", "--out", folder, "--n-images", "2")
    assert code == 2 and len(err.splitlines()) == 1 and "did not write (no shapes_world.json)" in err
    assert _snapshot(folder) == before
    assert cli("data", "shapes", "--out", tmp_path / "new", "--n-images", "2")[0] == 0
    assert cli("data", "shapes", "--out", tmp_path / "new", "--n-images", "3")[0] == 0  # its own folder: rewritten
    assert len((tmp_path / "new" / "train.jsonl").read_text().splitlines()) == 3


def test_a_registered_world_generates_through_the_same_path(tmp_path, monkeypatch):
    """A world is a registry entry (soarbench/worlds): the config check accepts its name, data.generate writes
    through its functions into a folder it owns, once per draw, and refuses a folder it does not own."""
    from soarbench import config as C
    from soarbench.worlds import WORLDS, World

    writes = []

    def write(folder, n_images, seed, size):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "toy.json").write_text(json.dumps([n_images, seed, size]))
        (folder / "train.jsonl").write_text("")
        writes.append((n_images, seed, size))
        return folder / "train.jsonl"

    def owns(folder):
        return not folder.exists() or (folder / "toy.json").is_file() or not any(folder.iterdir())

    def is_current(folder, n_images, seed, size):
        marker = folder / "toy.json"
        return marker.is_file() and json.loads(marker.read_text()) == [n_images, seed, size]

    toy = World(name="toy", manifest="toy.json", owns_folder=owns, is_current=is_current, write=write)
    monkeypatch.setitem(WORLDS._entries, "toy", (f"{__name__}:TOY", {}))
    monkeypatch.setitem(globals(), "TOY", toy)
    base = {"model": {"path": "m"}, "budget": {"amount": 1}, "method": {"name": "sft"}}
    dcfg = C.validate_train_config({**base, "data": {"jsonl": str(tmp_path / "toy" / "train.jsonl"),
                                                     "generate": {"world": "toy", "n_images": 5}}})["data"]
    ensure_generated(dcfg)
    ensure_generated(dcfg)  # the same draw: not written again
    assert writes == [(5, 1, 32)]
    unknown = r"data.generate.world = 'toyy': expected shapes or toy \(did you mean 'toy'\?\)"
    with pytest.raises(Exception, match=unknown):
        C.validate_train_config({**base, "data": {"jsonl": "x/train.jsonl", "generate": {"world": "toyy"}}})
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match=r"holds data the toy world did not write \(no toy.json\)"):
        ensure_generated({**dcfg, "jsonl": str(theirs / "train.jsonl")})
