"""Bad input gets one clear line and a non-zero exit; the HY-SOAR data format is read as specified."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from soarbench.cli import main
from soarbench.config import apply_overrides, parse_value
from soarbench.errors import UserError
from soarbench.harness.data import BucketSampler, Record, caption_of, read_records


def _train_cfg(tmp_path, model, jsonl, method="sft"):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{model}"\nmax_sequence_length = 0\n[data]\njsonl = "{jsonl}"\n'
                   f'[method]\nname = "{method}"\n[budget]\nunit = "fwd_bwd"\namount = 8\n[train]\nbatch_size = 4\n')
    return cfg


def test_malformed_jsonl_line_names_file_line_and_field(tmp_path, tiny_model_dir, cli):
    data = tmp_path / "train.jsonl"
    data.write_text('\n{"md5": "b", "bw": 32}\n')
    code, _, err = cli("train", "--config", str(_train_cfg(tmp_path, tiny_model_dir, data)),
                     "--out", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err
    assert err == f"error: {data}:2: missing field 'caption_en'"
    data.write_text('{"md5": "b", "caption_en": \n')
    code, _, err = cli("train", "--config", str(_train_cfg(tmp_path, tiny_model_dir, data)),
                     "--out", str(tmp_path / "run"))
    assert code == 2 and err.startswith(f"error: {data}:1: not valid JSON")
    data.write_text('{"md5": "a", "caption_en": "x", "bw": 32, "bh": 32}\n')
    code, _, err = cli("train", "--config", str(_train_cfg(tmp_path, tiny_model_dir, data)),
                     "--out", str(tmp_path / "run"))
    images = tmp_path / "images"  # both names an image may have are said: a .png is as good as a .jpg
    assert (code, err) == (2, f"error: {data}:1: image 'a' is missing: neither {images / 'a.jpg'} nor "
                              f"{images / 'a.png'} exists")


def test_unreadable_image_names_the_line(tmp_path, tiny_model_dir, cli):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "abc.jpg").write_bytes(b"not a jpeg")
    data = tmp_path / "train.jsonl"
    data.write_text('{"md5": "abc", "caption_en": "a photo of a circle", "bw": 32, "bh": 32}\n' * 8)
    code, _, err = cli("train", "--config", str(_train_cfg(tmp_path, tiny_model_dir, data)),
                     "--out", str(tmp_path / "run"))
    assert code == 2 and f"{data}:1: cannot read image" in err
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


@pytest.mark.parametrize("args,expected", [
    (["train", "--config", "{cfg}", "--method", "soap", "--out", "{out}"], "unknown method 'soap'"),
    (["eval", "--model", "{model}", "--benchmark", "shapez", "--out", "{out}"], "did you mean 'shapes'"),
    (["eval", "--model", "{model}", "--benchmark", "shapes", "--metrics", "genevl", "--out", "{out}"],
     "did you mean 'geneval'"),
    (["eval", "--model", "{missing}", "--benchmark", "shapes", "--out", "{out}"], "model folder does not exist"),
    (["eval", "--model", "{notmodel}", "--benchmark", "shapes", "--out", "{out}"], "not a model folder"),
    (["report", "{notmodel}", "--out", "{out}"], "no summary.json or train_log.jsonl found"),
    (["eval", "--model", "{model}", "--benchmark", "shapes", "--option", "n_per_tg=3", "--out", "{out}"],
     "unknown key '--option n_per_tg' for benchmark 'shapes'"),
    (["eval", "--model", "{model}", "--benchmark", "shapes", "--option", "min_images_per_task=many", "--out",
      "{out}"], "--option min_images_per_task = 'many': expected an integer"),
    (["eval", "--model", "{model}", "--benchmark", "shapes", "--option", "n_per_tag", "--out", "{out}"],
     "--option 'n_per_tag': expected KEY=VALUE"),
])
def test_bad_names_and_folders(tmp_path, tiny_model_dir, args, expected, cli):
    (tmp_path / "plain").mkdir()
    cfg = _train_cfg(tmp_path, tiny_model_dir, tmp_path / "none.jsonl")
    subs = {"{cfg}": str(cfg), "{out}": str(tmp_path / "out"), "{model}": str(tiny_model_dir),
            "{missing}": str(tmp_path / "nope"), "{notmodel}": str(tmp_path / "plain")}
    code, _, err = cli(*[subs.get(a, a) for a in args])
    assert code == 2 and expected in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_a_user_error_from_the_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "soarbench", "eval", "--model", str(tmp_path / "x"),
                           "--benchmark", "shapes", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'x'}: model folder does not exist"


def test_caption_rules():
    assert caption_of("A photo of a cat") == "A photo of a cat"
    assert caption_of(json.dumps({"long_caption": "", "medium_caption": "medium", "text": "t"})) == "medium"
    assert caption_of(json.dumps({"short_caption": " "})) == ""
    assert caption_of("") == ""


def test_empty_captions_are_skipped_and_png_or_jpg_found(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "b.jpg")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"md5": "a", "caption_en": "one", "bw": 8, "bh": 8}, {"md5": "zz", "caption_en": "", "bw": 8, "bh": 8},
        {"md5": "b", "caption_en": json.dumps({"text": "two"}), "bw": 8, "bh": 8}]) + "\n")
    recs = read_records(tmp_path / "t.jsonl")
    assert [(r.image.name, r.caption) for r in recs] == [("a.png", "one"), ("b.jpg", "two")]


def test_rank_shards_are_disjoint_and_batches_come_from_one_bucket():
    recs = [Record(Path(f"{i}"), f"c{i}", 32 if i % 3 else 64, 32, "") for i in range(60)]
    sampler = BucketSampler(recs, global_batch=4 * 2, seed=0)
    seen = []
    for _ in range(6):
        batch = sampler.next()
        assert len({(recs[i].bw, recs[i].bh) for i in batch}) == 1
        shards = [batch[r * 4:(r + 1) * 4] for r in range(2)]
        assert not set(shards[0]) & set(shards[1])
        seen += batch
    assert len(seen) == len(set(seen))  # no sample twice within an epoch


def test_set_overrides_parse_toml_values():
    cfg = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=1e-4", "method.name=soar", "data.flip=false",
                                                  "train.betas=[0.9, 0.99]"])
    assert cfg == {"train": {"lr": 1e-4, "betas": [0.9, 0.99]}, "method": {"name": "soar"}, "data": {"flip": False}}
    assert parse_value("hello world") == "hello world"
    with pytest.raises(UserError, match="expected key=value"):
        apply_overrides({}, ["oops"])


def test_metrics_list_says_what_is_missing(tmp_path, monkeypatch, capsys):
    from soarbench.metrics import weights
    from soarbench.metrics.registry import METRICS, availability

    entry = weights.load_manifest().get("clip-vit-large-patch14")
    assert availability("clipscore", tmp_path) == [
        f"{len(entry.files)} file(s) of clip-vit-large-patch14 (soarbench ckpts download clip-vit-large-patch14)"]
    for f in entry.files[1:]:
        (tmp_path / f.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f.path).write_bytes(b"x")
    assert availability("clipscore", tmp_path)[0].startswith("1 file(s) of clip-vit-large-patch14")
    (tmp_path / entry.files[0].path).write_bytes(b"x")
    assert availability("clipscore", tmp_path) == []
    monkeypatch.setitem(METRICS._entries, "needs_a_module", ("nowhere:Nothing", {"modules": ["surely_not_xyz"]}))
    assert availability("needs_a_module") == ["python module surely_not_xyz"]
    monkeypatch.setenv("SOARBENCH_REWARD_CKPTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["soarbench", "metrics", "list"])
    main()
    lines = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["clipscore"].startswith("ready") and lines["geneval"].startswith("ready")
    assert lines["needs_a_module"].startswith("missing: python module surely_not_xyz")


def test_an_interrupted_command_exits_130_not_0(monkeypatch, capsys):
    from soarbench import cli

    monkeypatch.setattr(cli, "app", lambda standalone_mode, **_: 130)  # what click returns after Ctrl-C
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(cli, "app", lambda standalone_mode, **_: None)  # a normal run returns nothing
    cli.main()


def test_eval_option_sets_the_benchmarks_options(tmp_path, tiny_model_dir, cli):
    # one prompt per task and at least 2 images per task: 6 prompts x 2 images
    code, out, err = cli("eval", "--model", tiny_model_dir, "--benchmark", "shapes", "--steps", "1", "--option",
                         "n_per_tag=1", "--option", "min_images_per_task=2", "--out", tmp_path / "e")
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["benchmark"]["n_prompts"] == 6 and summary["n_samples"] == 12
    assert summary["benchmark"]["min_images_per_task"] == 2
    assert summary["benchmark"]["source"]["n_per_tag"] == 1
