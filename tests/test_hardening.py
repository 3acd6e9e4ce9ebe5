"""Bad input is one clear line and damages nothing: images of every mode, training JSONL, CLI values, full disks."""
from __future__ import annotations

import errno
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from soarbench.errors import UserError
from soarbench.images import load_rgb, to_rgb


def _px(image: Image.Image) -> list[tuple[int, int, int]]:
    assert image.mode == "RGB"
    return [tuple(int(c) for c in p) for p in np.asarray(image).reshape(-1, 3)]


def _over(colour: int, alpha: int, background: int) -> int:
    """Alpha compositing written out: colour * a + background * (1 - a)."""
    return round(colour * alpha / 255 + background * (1 - alpha / 255))


# ------------------------------------------------------------------------------------------------ images
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")  # what Pillow makes of a 16-bit PNG
    assert _px(load_rgb(tmp_path / "g16.png")) == [(v, v, v) for v in (0, 1, 128, 255)]


def test_palette_with_a_transparent_index_shows_the_background(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.putdata([0, 1])
    im.save(tmp_path / "p.png", transparency=0)
    assert _px(load_rgb(tmp_path / "p.png")) == [(255, 255, 255), (0, 0, 255)]
    assert _px(load_rgb(tmp_path / "p.png", background=(10, 20, 30))) == [(10, 20, 30), (0, 0, 255)]


@pytest.mark.parametrize("mode,pixel", [("RGBA", (200, 100, 0, 128)), ("LA", (40, 200))])
def test_alpha_is_composited_on_the_background(tmp_path, mode, pixel):
    Image.new(mode, (1, 1), pixel).save(tmp_path / "a.png")
    colour = pixel[:3] if mode == "RGBA" else (pixel[0],) * 3
    alpha = pixel[-1]
    for bg in ((255, 255, 255), (0, 64, 255)):
        got = _px(load_rgb(tmp_path / "a.png", background=bg))[0]
        want = tuple(_over(c, alpha, b) for c, b in zip(colour, bg))
        assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (got, want)


def test_palette_with_alpha_channel():
    im = Image.new("P", (2, 1))
    im.putpalette([0, 255, 0] + [0] * (256 * 3 - 3))
    im.putdata([0, 0])
    im.putalpha(Image.frombytes("L", (2, 1), bytes([0, 255])))
    assert im.mode == "PA"
    assert _px(to_rgb(im)) == [(255, 255, 255), (0, 255, 0)]


def test_cmyk_and_one_bit(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0)])  # cyan, black, white
    cmyk.save(tmp_path / "c.tif")
    assert _px(load_rgb(tmp_path / "c.tif")) == [(0, 255, 255), (0, 0, 0), (255, 255, 255)]
    bits = Image.new("1", (2, 1))
    bits.putdata([0, 255])
    bits.save(tmp_path / "b.png")
    assert _px(load_rgb(tmp_path / "b.png")) == [(0, 0, 0), (255, 255, 255)]


def test_float_images_and_broken_files_are_refused_in_one_line(tmp_path):
    Image.fromarray(np.array([[0.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(UserError) as e:
        load_rgb(tmp_path / "f.tif")
    assert str(e.value) == f"{tmp_path / 'f.tif'}: image mode F cannot be read as RGB (no faithful 8-bit RGB reading)"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    (tmp_path / "t.png").write_bytes((tmp_path / "t.png").read_bytes()[:60])
    with pytest.raises(UserError, match=r"t.png: cannot read image \("):
        load_rgb(tmp_path / "t.png")
    with pytest.raises(UserError, match=r"data.jsonl:4: image .*missing.png: no such file"):
        load_rgb(tmp_path / "missing.png", where="data.jsonl:4")


def test_training_pixels_go_through_the_same_reading(tmp_path):
    from soarbench.harness.data import Record, load_pixels

    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    px = load_pixels(Record(tmp_path / "clear.png", "c", 4, 4, "d.jsonl:1"), random.Random(0), False)
    assert px.shape == (3, 4, 4) and bool((px == 1.0).all())  # transparent -> white -> +1, not black
    Image.fromarray(np.array([[0.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(UserError, match=r"^d.jsonl:2: image .*f.tif: mode F cannot be read as RGB"):
        load_pixels(Record(tmp_path / "f.tif", "c", 1, 1, "d.jsonl:2"), random.Random(0), False)


# ------------------------------------------------------------------------------------------------ training JSONL
def _train_config(tmp_path: Path, model: Path, jsonl: Path) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")  # line 1's image: only line 2 is bad
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{model}"\nmax_sequence_length = 0\n[data]\njsonl = "{jsonl}"\n'
                   f'[method]\nname = "sft"\n[budget]\nunit = "fwd_bwd"\namount = 8\n[train]\nbatch_size = 4\n'
                   f'device = "cpu"\n')
    return cfg


AS_STRING = "(the caption, or a JSON caption object written as a string)"


@pytest.mark.parametrize("caption,expected", [
    ("3", "field 'caption_en' = 3 is a number: expected a string " + AS_STRING),
    ('["a", "b"]', "field 'caption_en' = [\"a\", \"b\"] is a list: expected a string " + AS_STRING),
    ("null", "field 'caption_en' = null is null: expected a string " + AS_STRING),
    ('{"long_caption": "x"}', "field 'caption_en' = {\"long_caption\": \"x\"} is an object: expected a string "
                              + AS_STRING),
    (json.dumps(json.dumps({"title": "x"})), "field 'caption_en' holds a JSON object without any of long_caption, "
                                             "medium_caption, short_caption, text"),
])
def test_captions_of_a_wrong_type_name_file_and_line(tmp_path, tiny_model_dir, cli, caption, expected):
    data = tmp_path / "train.jsonl"
    data.write_text('{"md5": "a", "caption_en": "fine", "bw": 32, "bh": 32}\n'
                    f'{{"md5": "b", "caption_en": {caption}, "bw": 32, "bh": 32}}\n')
    code, _, err = cli("train", "--config", _train_config(tmp_path, tiny_model_dir, data), "--out", tmp_path / "run")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err == f"error: {data}:2: {expected}"
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_a_plain_caption_that_starts_with_a_brace_is_still_a_caption(tmp_path):
    from soarbench.harness.data import read_records

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"md5": "a", "caption_en": "{braces} in a caption", "bw": 8, "bh": 8}) + "\n")
    assert [r.caption for r in read_records(data)] == ["{braces} in a caption"]
    data.write_text(json.dumps({"md5": 12, "caption_en": "x", "bw": 8, "bh": 8}) + "\n")
    with pytest.raises(UserError, match=r"train.jsonl:1: field 'md5' = 12: expected the image's file name stem"):
        read_records(data)


def test_a_jsonl_that_is_not_utf8_names_the_line(tmp_path, tiny_model_dir, cli):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"md5": "a", "caption_en": "fine", "bw": 32, "bh": 32}\n'
                     b'{"md5": "b", "caption_en": "caf\xe9", "bw": 32, "bh": 32}\n')
    code, _, err = cli("train", "--config", _train_config(tmp_path, tiny_model_dir, data), "--out", tmp_path / "run")
    assert code == 2
    assert err == f"error: {data}:2: not UTF-8 text (byte 0xe9 at column 32); save the file as UTF-8"


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    from soarbench.io import read_jsonl

    path = tmp_path / "x.jsonl"
    path.write_bytes('\ufeff{"a": 1}\n{"a": "é"}\n'.encode("utf-8"))
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (2, {"a": "é"})]


# ------------------------------------------------------------------------------------------------ the .pth hook
def _bare_venv(tmp_path: Path, with_hook: bool) -> Path:
    """A venv that sees the project venv's packages but none of its .pth files, plus (or not) our hook."""
    import site
    import sysconfig

    venv = tmp_path / ("hooked" if with_hook else "bare")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site_packages = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    ours = [p for p in site.getsitepackages() if "site-packages" in p] or [sysconfig.get_paths()["purelib"]]
    repo = Path(__file__).resolve().parents[1]
    # path lines only: the project venv's own .pth files are not run in the new venv
    (site_packages / "project.pth").write_text(f"{repo}\n" + "".join(f"{p}\n" for p in ours))
    if with_hook:
        from soarbench._site_hook import install_files

        install_files(site_packages)
    return venv / "bin" / "python"


PROBE = """
import sys
at_start = sorted(m for m in ("torch", "soarbench", "torchvision") if m in sys.modules)
try:
    from diffusers import StableDiffusion3Pipeline
    result = "imported"
except Exception as e:
    result = type(e).__name__
print(at_start, result, "soarbench._compat" in sys.modules)
"""


def test_diffusers_imports_without_soarbench_first_once_the_hook_is_installed(tmp_path):
    hooked = _bare_venv(tmp_path, with_hook=True)
    out = subprocess.run([str(hooked), "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    # start-up imports nothing heavy; the hook brought in soarbench._compat just before torchvision
    assert out.stdout.split("\n")[0] == "[] imported True", out.stderr[-2000:]


def test_without_the_hook_the_same_import_fails_here_or_needs_no_help(tmp_path):
    """The control: what the hook changes. Where torchvision's own ops load, both work and _compat stays out."""
    bare = _bare_venv(tmp_path, with_hook=False)
    out = subprocess.run([str(bare), "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    line = out.stdout.split("\n")[0]
    assert line in ("[] RuntimeError False", "[] imported False"), out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ CLI values
@pytest.fixture()
def no_model_loads(monkeypatch):
    from soarbench.models.sd3 import SD3Adapter

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the command line was checked")

    monkeypatch.setattr(SD3Adapter, "from_pretrained", classmethod(refuse))


def _no_cuda_device() -> str:
    import torch

    return "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("flag,value,expected", [
    ("--batch-size", "0", "error: --batch-size 0: expected an integer >= 1"),
    ("--steps", "0", "error: --steps 0: expected an integer >= 1"),
    ("--seed", "-1", "error: --seed -1: expected an integer >= 0"),
    ("--guidance", "nan", "error: --guidance nan: expected a finite number"),
    ("--guidance", "inf", "error: --guidance inf: expected a finite number"),
    ("--max-sequence-length", "-3", "error: --max-sequence-length -3: expected an integer >= 0"),
    ("--device", "gpu", "error: --device gpu: expected auto, cpu, cuda or cuda:N"),
    ("--device", _no_cuda_device(), "error: --device cuda"),
])
def test_eval_values_are_checked_before_any_model_loads(tmp_path, tiny_model_dir, cli, no_model_loads, flag,
                                                        value, expected):
    code, _, err = cli("eval", "--model", tiny_model_dir, "--benchmark", "shapes", "--out", tmp_path / "e",
                       flag, value)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(expected), err
    assert not (tmp_path / "e").exists()


def test_a_missing_cuda_device_names_the_machine(tmp_path, tiny_model_dir, cli, no_model_loads, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli("eval", "--model", tiny_model_dir, "--benchmark", "shapes", "--out", tmp_path / "e",
                       "--device", "cuda")
    assert (code, err) == (2, "error: --device cuda: this machine has no CUDA device (use auto or cpu)")


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores permission bits, not sysfs)."""
    import os
    import tempfile

    for candidate in (Path("/sys"), Path("/proc/self")):
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return candidate
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    return locked


@pytest.mark.parametrize("command", ["eval", "train", "run"])
def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, tiny_model_dir, cli, no_model_loads, command):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{tiny_model_dir}"\n[data]\njsonl = "{tmp_path / "d.jsonl"}"\n'
                   f'[method]\nname = "sft"\n[budget]\namount = 8\n')
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[common.model]\npath = "{tiny_model_dir}"\n[runs.sft]\nmethod = {{ name = "sft" }}\n')
    head = {"eval": ["eval", "--model", tiny_model_dir, "--benchmark", "shapes"],
            "train": ["train", "--config", cfg], "run": ["run", exp]}[command]
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    code, _, err = cli(*head, "--out", existing)
    assert code == 2 and err == f"error: --out {existing}: is an existing file; expected a folder (new, or one to " \
                                "resume in)"
    assert existing.read_text() == "keep me"
    locked = _unwritable_folder(tmp_path)
    code, _, err = cli(*head, "--out", locked / "sub" / "run")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: --out {locked / 'sub' / 'run'}: cannot write in {locked} (")


# ------------------------------------------------------------------------------------------------ full disks
def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/report.md")


def test_a_full_disk_escaping_a_command_is_one_line(tmp_path, cli, monkeypatch):
    import soarbench.report

    monkeypatch.setattr(soarbench.report, "write_report", _full_disk)
    code, _, err = cli("report", tmp_path, "--out", tmp_path / "r")
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: the disk is full while writing /runs/x/report.md (No space left on device): "
                          "free some space")


def test_a_full_disk_behind_another_exception_is_recognised(tmp_path, cli, monkeypatch):
    import soarbench.report

    def wrapped(*args, **kwargs):
        try:
            _full_disk()
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e

    monkeypatch.setattr(soarbench.report, "write_report", wrapped)
    code, _, err = cli("report", tmp_path, "--out", tmp_path / "r")
    assert code == 1 and err.startswith("error: the disk is full while writing /runs/x/report.md")


def test_other_errors_still_raise(tmp_path, cli, monkeypatch):
    import soarbench.report

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(soarbench.report, "write_report", broken)
    with pytest.raises(OSError, match="Input/output error"):
        cli("report", tmp_path, "--out", tmp_path / "r")


def test_a_full_disk_during_an_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    import os

    from soarbench.io import atomic_write_text

    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


# ------------------------------------------------------------------------------------------------ help and progress
def test_run_help_shows_the_experiment_tables(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = cli("run", "--help")
    assert code == 0 and "Experiment TOML: [common], [runs.NAME], [experiment]" in out


def test_progress_prints_plain_lines_every_n_steps_off_a_terminal(capsys):
    from soarbench.cli import Progress

    now = [0.0]
    progress = Progress("training", every=2, unit="step", tty=False, clock=lambda: now[0])
    for step in range(1, 6):
        now[0] = 10.0 * step  # 0.1 step/s from the first call on
        progress(step, 5, loss=0.0123 * step, grad_norm=None, images=step * 4)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["step 2/5 loss 0.0246 images 8 | 0.1 step/s, ETA 0:00:30",
                     "step 4/5 loss 0.0492 images 16 | 0.1 step/s, ETA 0:00:10",
                     "step 5/5 loss 0.0615 images 20 | 0.1 step/s"]
    unbounded = Progress("training", every=3, unit="step", tty=False, clock=lambda: 0.0)
    for step in range(1, 7):
        unbounded(step, None)
    assert capsys.readouterr().err.strip().splitlines() == ["step 3", "step 6"]


def test_progress_off_a_terminal_prints_a_line_per_interval_with_rate_and_eta(capsys):
    """`eval` passes every=0 and interval_s: a log file still hears from it (rate and ETA) while it works."""
    from soarbench.cli import Progress

    now = [0.0]
    progress = Progress("eval shapes", every=0, unit="eval shapes images", tty=False, interval_s=30,
                        clock=lambda: now[0])
    for done in range(0, 40, 4):  # 4 images per 10 s
        now[0] = done * 2.5
        progress(done, 40)
    now[0] = 100.0
    progress(40, 40)
    assert capsys.readouterr().err.strip().splitlines() == [
        "eval shapes images 12/40 | 0.4 images/s, ETA 0:01:10",
        "eval shapes images 24/40 | 0.4 images/s, ETA 0:00:40",
        "eval shapes images 36/40 | 0.4 images/s, ETA 0:00:10",
        "eval shapes images 40/40 | 0.4 images/s"]


def test_progress_on_a_terminal_draws_no_plain_lines(capsys):
    from soarbench.cli import Progress

    progress = Progress("training", every=1, unit="step", tty=True)
    for step in range(1, 4):
        progress(step, 3, loss=0.5)
    assert "step 1/3" not in capsys.readouterr().err


def test_progress_with_every_zero_stays_quiet_off_a_terminal(capsys):
    from soarbench.cli import Progress

    quiet = Progress("eval shapes", every=0, tty=False)
    for done in range(1, 4):
        quiet(done, 3)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------ inputs first
def _sft_config(tmp_path: Path, model: Path, jsonl: Path, extra: str = "") -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\npath = "{model}"\nmax_sequence_length = 0\n[data]\njsonl = "{jsonl}"\n'
                   f'[method]\nname = "sft"\n[budget]\nunit = "fwd_bwd"\namount = 8\n[train]\nbatch_size = 4\n{extra}')
    return cfg


def test_a_training_image_that_is_no_image_is_refused_before_any_model_loads(tmp_path, tiny_model_dir, cli,
                                                                              no_model_loads):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "abc.png").write_bytes(b"")  # an empty file: a copy that never finished
    data = tmp_path / "train.jsonl"
    data.write_text('{"md5": "abc", "caption_en": "a red circle", "bw": 32, "bh": 32}\n' * 8)
    code, _, err = cli("train", "--config", _sft_config(tmp_path, tiny_model_dir, data), "--out", tmp_path / "run")
    assert (code, err) == (2, f"error: {data}:1: cannot read image {tmp_path / 'images' / 'abc.png'} "
                              f"(UnidentifiedImageError)")


def test_missing_metric_weights_are_refused_before_any_model_loads(tmp_path, tiny_model_dir, shapes_data, cli,
                                                                   no_model_loads, monkeypatch):
    monkeypatch.setenv("SOARBENCH_REWARD_CKPTS", str(tmp_path / "ckpts"))
    expected = (f"error: metric 'clipscore': {tmp_path / 'ckpts' / 'clip-vit-large-patch14' / 'config.json'} is "
                f"missing (weights 'clip-vit-large-patch14': 8 files missing); fix: soarbench ckpts download "
                f"clip-vit-large-patch14")
    code, _, err = cli("eval", "--model", tiny_model_dir, "--benchmark", "shapes", "--metrics", "clipscore", "--out",
                       tmp_path / "e")
    assert (code, err) == (2, expected)
    cfg = _sft_config(tmp_path, tiny_model_dir, shapes_data,
                      '[eval]\nbenchmark = "shapes"\nmetrics = ["geneval", "clipscore"]\n')
    code, _, err = cli("train", "--config", cfg, "--out", tmp_path / "run")
    assert (code, err) == (2, expected)
    assert not (tmp_path / "run").exists() and not (tmp_path / "e").exists()


def test_resuming_into_another_method_names_the_method(tmp_path):
    from soarbench import config as C
    from soarbench.harness.train import _refuse_changed_config

    (tmp_path / "config.toml").write_text(C.dumps_toml({"method": {"name": "soar", "cfg_scale_sampling": 4.5}}))
    with pytest.raises(UserError) as e:
        _refuse_changed_config(tmp_path, {"method": {"name": "sft"}})
    assert str(e.value) == (f"--resume: {tmp_path / 'config.toml'} records a soar run and this config trains sft; "
                            f"resume with --method soar (the recorded config), or start a new run folder")
    with pytest.raises(UserError, match="--resume: method.cfg_scale_sampling was 4.5 in .* and is 2.0 now"):
        _refuse_changed_config(tmp_path, {"method": {"name": "soar", "cfg_scale_sampling": 2.0}})


@pytest.mark.parametrize("line,complaint", [
    ('{"caption_en": "a red', "Unterminated string starting at column 16"),  # json's message ends in "at"
    ('{"caption_en": }', "Expecting value at column 16"),
])
def test_an_invalid_json_line_says_where_once(tmp_path, line, complaint):
    from soarbench.io import read_jsonl

    path = tmp_path / "train.jsonl"
    path.write_text('{"caption_en": "ok"}\n' + line)
    with pytest.raises(UserError) as e:
        list(read_jsonl(path))
    assert str(e.value) == f"{path}:2: not valid JSON ({complaint})"
