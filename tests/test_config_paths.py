"""Paths in a config file are relative to that file: model.path, data.jsonl, data.image_dir (also inside an
experiment's [common] and [runs.NAME]), the experiment's probe data and report folder; ${VAR} / ${VAR:-default}
come from the environment; --set values stay relative to the working directory."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from soarbench import config as C
from soarbench.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_relative_paths_follow_the_file_not_the_working_directory(tmp_path, monkeypatch):
    cfg_file = _write(tmp_path / "cfgs" / "run.toml",
                      '[model]\npath = "../models/base"\n[data]\njsonl = "data/train.jsonl"\nimage_dir = "img"\n')
    (tmp_path / "models" / "base").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the repo root nor the config's folder
    cfg = C.load_config(cfg_file)
    assert Path(cfg["model"]["path"]).resolve() == (tmp_path / "models" / "base").resolve()
    assert Path(cfg["data"]["jsonl"]).resolve() == (tmp_path / "cfgs" / "data" / "train.jsonl").resolve()
    assert Path(cfg["data"]["image_dir"]).resolve() == (tmp_path / "cfgs" / "img").resolve()
    monkeypatch.chdir(tmp_path)  # under the working directory: recorded relative to it
    assert C.load_config(cfg_file)["data"]["jsonl"] == os.path.join("cfgs", "data", "train.jsonl")


def test_extends_resolves_each_file_against_its_own_folder(tmp_path, monkeypatch):
    _write(tmp_path / "shared" / "common.toml", '[data]\njsonl = "common.jsonl"\n[model]\npath = "base"\n')
    child = _write(tmp_path / "shared" / "sub" / "child.toml",
                   'extends = "../common.toml"\n[model]\npath = "own"\n')
    monkeypatch.chdir(tmp_path)
    cfg = C.load_config(child)
    assert cfg["data"]["jsonl"] == os.path.join("shared", "common.jsonl")
    assert cfg["model"]["path"] == os.path.join("shared", "sub", "own")


def test_set_values_stay_relative_to_the_working_directory(tmp_path, monkeypatch):
    cfg_file = _write(tmp_path / "cfgs" / "run.toml", '[data]\njsonl = "a.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    cfg = C.apply_overrides(C.load_config(cfg_file), ["data.jsonl=mine/b.jsonl"])
    assert cfg["data"]["jsonl"] == "mine/b.jsonl"


def test_environment_variables_and_defaults(tmp_path, monkeypatch):
    cfg_file = _write(tmp_path / "run.toml", '[model]\npath = "${MY_MODEL:-org/model}"\n'
                                             '[data]\njsonl = "${MY_DATA:-data}/train.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MY_MODEL", raising=False)
    monkeypatch.delenv("MY_DATA", raising=False)
    cfg = C.load_config(cfg_file)
    assert cfg["model"]["path"] == "org/model"  # no such local folder: read as a Hub id, kept as written
    assert cfg["data"]["jsonl"] == os.path.join("data", "train.jsonl")
    monkeypatch.setenv("MY_MODEL", str(tmp_path / "local"))
    monkeypatch.setenv("MY_DATA", "/srv/d")
    cfg = C.load_config(cfg_file)
    assert cfg["model"]["path"] == str(tmp_path / "local")
    assert cfg["data"]["jsonl"] == "/srv/d/train.jsonl"


def test_an_unset_variable_without_default_is_one_line(tmp_path, monkeypatch):
    cfg_file = _write(tmp_path / "run.toml", '[data]\njsonl = "${NOT_SET_ANYWHERE}/train.jsonl"\n')
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(UserError) as e:
        C.load_config(cfg_file)
    msg = str(e.value)
    assert "\n" not in msg and str(cfg_file) in msg and "data.jsonl" in msg and "NOT_SET_ANYWHERE" in msg
    assert "--set data.jsonl=" in msg


def test_a_local_folder_wins_over_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    cfg_file = _write(tmp_path / "run.toml", '[model]\npath = "org/model"\n')
    monkeypatch.chdir(tmp_path.parent)
    assert Path(C.load_config(cfg_file)["model"]["path"]).resolve() == (tmp_path / "org" / "model").resolve()


def test_experiment_paths(tmp_path, monkeypatch):
    exp = _write(tmp_path / "exps" / "e.toml",
                 '[experiment]\nreport = "../reports/e"\n[experiment.probe]\njsonl = "held/train.jsonl"\n'
                 '[common.data]\njsonl = "train.jsonl"\n[runs.a.data]\njsonl = "a.jsonl"\n[runs.b]\nseeds = [0]\n')
    monkeypatch.chdir(tmp_path)
    cfg = C.load_config(exp)
    assert cfg["experiment"]["report"] == os.path.join("reports", "e")
    assert cfg["experiment"]["probe"]["jsonl"] == os.path.join("exps", "held", "train.jsonl")
    assert cfg["common"]["data"]["jsonl"] == os.path.join("exps", "train.jsonl")
    assert cfg["runs"]["a"]["data"]["jsonl"] == os.path.join("exps", "a.jsonl")


def test_recorded_configs_are_read_as_written(tmp_path, monkeypatch):
    """A run folder's config.toml holds paths already resolved when it was written."""
    rec = _write(tmp_path / "run" / "config.toml", '[data]\njsonl = "benchmarks/x.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    assert C.load_config(rec, file_paths=False)["data"]["jsonl"] == "benchmarks/x.jsonl"


def test_shipped_shapes_configs_work_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # `make demo` runs from the repository root: the recorded paths are the usual ones
    cfg = C.load_config(REPO / "benchmarks" / "shapes" / "sft.toml")
    assert cfg["model"]["path"] == "benchmarks/shapes/base"
    assert cfg["data"]["jsonl"] == ".cache/shapes/train/train.jsonl"
    exp = C.load_config(REPO / "benchmarks" / "shapes" / "compare.toml")
    assert exp["experiment"]["report"] == "reports/compare"
    assert exp["experiment"]["probe"]["jsonl"] == ".cache/shapes/heldout/train.jsonl"
    monkeypatch.chdir(tmp_path)
    cfg = C.load_config(REPO / "benchmarks" / "shapes" / "sft.toml")
    assert Path(cfg["model"]["path"]) == REPO / "benchmarks" / "shapes" / "base"
    assert (Path(cfg["model"]["path"]) / "model_index.json").is_file()


def test_readme_hy_soar_snippet_writes_data_soarbench_reads(tmp_path, monkeypatch):
    """The README's snippet (section "SD3.5-Medium") turns a folder of NAME.jpg + NAME.txt into HY-SOAR's layout."""
    from PIL import Image

    from soarbench.harness.data import read_records

    text = (REPO / "README.md").read_text()
    start = text.index("**The HY-SOAR data.**")
    code = text[text.index("```python\n", start) + len("```python\n"):]
    code = code[:code.index("```")]
    src = tmp_path / "my_images"
    src.mkdir()
    for name, colour, caption in (("a", "red", "a red square"), ("b", "blue", "a blue square")):
        Image.new("RGB", (600, 500), colour).save(src / f"{name}.jpg")
        (src / f"{name}.txt").write_text(caption + "\n")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    records = read_records(tmp_path / "data" / "hy-soar" / "train.jsonl")
    assert sorted(r.caption for r in records) == ["a blue square", "a red square"]
    import hashlib

    for r in records:
        source = src / ("a.jpg" if "red" in r.caption else "b.jpg")
        assert r.image.name == hashlib.md5(source.read_bytes()).hexdigest() + ".jpg"
        assert r.image.read_bytes() == source.read_bytes() and (r.bw, r.bh) == (512, 512)
