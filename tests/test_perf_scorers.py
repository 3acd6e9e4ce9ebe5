"""benchmarks/perf/scorers.py run in-process on tiny synthetic weights: a row per (metric, batch size), the
ClipScore-vs-torchmetrics comparison agreeing per image, valid JSON, one-line errors. No timing assertions."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

import soarbench  # noqa: F401  (torchvision fallback first)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "scorers.py"
METRICS = ["clipscore", "aesthetic", "imagereward", "geneval", "ocr"]


@pytest.fixture(scope="module")
def scorers():
    spec = importlib.util.spec_from_file_location("perf_scorers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_run(scorers, tmp_path_factory):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = tmp_path_factory.mktemp("perf") / "perf.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = scorers.main(["--metrics", ",".join(METRICS), "--scale", "tiny", "--weights", "synthetic",
                             "--images", "3", "--batch-sizes", "1,2", "--threads", "1", "--json", str(out)])
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_a_row_per_metric_and_batch_size(tiny_run):
    code, stdout, stderr, _ = tiny_run
    assert code == 0, stderr
    for metric in METRICS:
        for batch in (1, 2):
            assert re.search(rf"^{metric}\s+.+\s+cpu\s+{batch}\s+[0-9.]+\s+[0-9.]+$", stdout, re.M), (metric, batch)
    assert "random weights, tiny test architecture" in stdout
    assert "exact shapes-world detector" in stdout and "rapidocr" in stdout


def test_clipscore_agrees_with_torchmetrics_per_image(tiny_run):
    code, stdout, _, out = tiny_run
    assert "ClipScore vs torchmetrics" in stdout and "speed ratio (ours / torchmetrics)" in stdout
    printed = float(re.search(r"max \|100 \* ours - torchmetrics\| per image\s+(\S+)", stdout).group(1))
    comparison = json.loads(out.read_text())["clipscore_vs_torchmetrics"]
    assert comparison["pairs"] == 3 and comparison["pairs_clamped_at_zero"] == 0  # every pair really compared
    assert comparison["max_abs_diff_100cos"] < 1e-3 and printed < 1e-3
    assert comparison["ours_images_per_s"] > 0 and comparison["torchmetrics_images_per_s"] > 0
    assert comparison["speed_ratio_ours_over_torchmetrics"] == pytest.approx(
        comparison["ours_images_per_s"] / comparison["torchmetrics_images_per_s"])


def test_json_holds_every_row(tiny_run):
    _, _, _, out = tiny_run
    data = json.loads(out.read_text())
    assert [(r["metric"], r["batch_size"]) for r in data["rows"]] == [(m, b) for m in METRICS for b in (1, 2)]
    for row in data["rows"]:
        assert row["images"] == 3 and row["images_per_s"] > 0
        assert row["ms_per_image"] == pytest.approx(1000 / row["images_per_s"])
    assert data["options"]["scale"] == "tiny" and data["machine"]["threads"] == 1 and data["skipped"] == []
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind


def test_unknown_metric_and_bad_options_are_one_line_errors(scorers, capsys):
    assert scorers.main(["--metrics", "clipscor,ocr", "--scale", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'clipscore'" in err and "Traceback" not in err
    for bad in (["--batch-sizes", "1,x"], ["--scale", "huge"], ["--images", "2", "--batch-sizes", "4"],
                ["--frobnicate"], ["--device", "gpu0"]):
        assert scorers.main(bad) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("scorers.py: error:"), (bad, err)
