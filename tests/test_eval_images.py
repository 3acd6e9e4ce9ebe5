"""`soarbench eval --images`: score existing images without a model, in GenEval's layout or a flat folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from soarbench import provenance
from soarbench.benchmarks import build_benchmark
from soarbench.errors import UserError
from soarbench.evaluate import name_order, score_images
from soarbench.worlds.shapes import encode_png, render_metadata


@pytest.fixture(scope="module")
def bench():
    return build_benchmark("shapes")


def _render(row: dict, seed: int) -> bytes:
    return encode_png(render_metadata(row, np.random.default_rng(seed), size=32).image)


def _geneval_layout(folder: Path, rows: list[dict], per_prompt: int = 1) -> Path:
    """GenEval's official layout of ground-truth renders: NNNNN/metadata.jsonl + NNNNN/samples/NNNN.png."""
    for i, row in enumerate(rows):
        (folder / f"{i:05d}" / "samples").mkdir(parents=True)
        (folder / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(row))
        for k in range(per_prompt):
            (folder / f"{i:05d}" / "samples" / f"{k:04d}.png").write_bytes(_render(row, 100 * i + k))
    (folder / "README.txt").write_text("not a prompt folder")  # ignored, as by the official evaluator
    return folder


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_geneval_layout_of_ground_truth_scores_one(bench, tmp_path, cli):
    images = _geneval_layout(tmp_path / "images", bench.metadata)
    out = tmp_path / "eval"
    code, stdout, stderr = cli("eval", "--images", images, "--benchmark", "shapes",
                                "--out", out)
    assert code == 0 and stderr == ""
    assert stdout.splitlines()[0] == "geneval\t1.0000"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"]["geneval"] == 1.0 and summary["n_samples"] == len(bench.prompts)
    assert summary["benchmark"]["covers_benchmark"] is True
    assert summary["benchmark"]["prompt_set_sha256"] == provenance.prompt_set_hash(bench.prompts, bench.metadata)
    assert summary["images"]["layout"] == "geneval" and summary["sampling"] is None
    assert summary["model"]["method"] == "images" and summary["model"]["step"] is None
    assert set(summary["provenance"]) >= {"git_sha", "versions"}
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "samples.jsonl", "summary.json"]
    samples = _rows(out / "samples.jsonl")
    assert samples[3]["id"] == "00003_0" and samples[3]["seed"] is None
    assert samples[3]["file"] == str(images.resolve() / "00003" / "samples" / "0000.png")
    results = _rows(out / "results.jsonl")
    assert len(results) == len(bench.prompts) and all(r["correct"] for r in results)
    assert results[0]["filename"] == samples[0]["file"]
    assert set(results[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}

    # run again: everything is already scored, nothing is counted twice
    again = score_images(images, bench, out)
    assert again["scores"] == summary["scores"] and len(_rows(out / "samples.jsonl")) == len(bench.prompts)


def test_partial_layout_is_scored_and_flagged(bench, tmp_path, cli):
    images = _geneval_layout(tmp_path / "images", bench.metadata[:5], per_prompt=2)
    code, stdout, stderr = cli("eval", "--images", images, "--benchmark", "shapes",
                                "--out", tmp_path / "eval")
    assert code == 0 and stdout.splitlines()[0] == "geneval\t1.0000"
    assert stderr.startswith("note: these images are not exactly benchmark 'shapes'")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["benchmark"]["covers_benchmark"] is False
    assert (summary["benchmark"]["n_prompts"], summary["benchmark"]["images_per_prompt"]) == (5, 2)
    assert len(summary["per_prompt"]["geneval"]) == 5


def test_layout_rows_are_matched_to_the_benchmark_by_content(bench, tmp_path):
    # Flow-GRPO's order: rows repeated and shuffled, one image per folder
    images = _geneval_layout(tmp_path / "images", [bench.metadata[i] for i in (5, 2, 5, 0)])
    summary = score_images(images, bench, tmp_path / "eval")
    assert summary["scores"]["geneval"] == 1.0
    samples = _rows(tmp_path / "eval" / "samples.jsonl")
    assert [(s["id"], Path(s["file"]).parts[-3]) for s in samples] == [
        ("00005_0", "00000"), ("00002_0", "00001"), ("00005_1", "00002"), ("00000_0", "00003")]

    meta = images / "00001" / "metadata.jsonl"
    meta.write_text(json.dumps({**bench.metadata[2], "prompt": "a photo of a unicorn"}))
    with pytest.raises(UserError) as e:
        score_images(images, bench, tmp_path / "eval2")
    assert str(e.value) == f"{meta.resolve()}: 'a photo of a unicorn' is not a prompt of benchmark 'shapes'"
    meta.write_text(json.dumps({**bench.metadata[2], "tag": "colors"}))
    with pytest.raises(UserError) as e:
        score_images(images, bench, tmp_path / "eval2")
    assert str(e.value) == (f"{meta.resolve()}: the row of {bench.prompts[2]!r} differs from row 2 of benchmark "
                            "'shapes'")
    with pytest.raises(UserError, match="no GenEval-layout prompt folders"):
        score_images(tmp_path, bench, tmp_path / "eval2")  # no numbered folders here
    assert not (tmp_path / "eval2").exists()


def test_flat_folder_with_a_prompts_file(bench, tmp_path, cli):
    picks = [0, 7, 7, 12, 30, 45, 60, 61, 62, 63, 64]  # prompt 7 twice: its images 0 and 1
    flat = tmp_path / "flat"
    flat.mkdir()
    for n, i in enumerate(picks):  # unpadded numbers: img_2 sorts before img_10
        (flat / f"img_{n}.png").write_bytes(_render(bench.metadata[i], n))
    (tmp_path / "prompts.txt").write_text("".join(bench.prompts[i] + "\n" for i in picks))
    out = tmp_path / "eval"
    code, stdout, _ = cli("eval", "--images", flat, "--prompts", tmp_path / "prompts.txt",
                           "--benchmark", "shapes", "--out", out)
    assert code == 0 and stdout.splitlines()[0] == "geneval\t1.0000"
    samples = _rows(out / "samples.jsonl")
    assert [s["id"] for s in samples[:4]] == ["00000_0", "00007_0", "00007_1", "00012_0"]
    assert [Path(s["file"]).name for s in samples] == [f"img_{n}.png" for n in range(len(picks))]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"]["layout"] == "flat" and len(summary["images"]["prompts_file_sha256"]) == 64

    # the pairing is real: another prompt's image in place of img_0 is scored wrong
    (flat / "img_0.png").write_bytes(_render(bench.metadata[picks[4]], 0))
    swapped = score_images(flat, bench, tmp_path / "eval2", prompts_file=tmp_path / "prompts.txt")
    assert swapped["scores"]["geneval/image_mean"] == pytest.approx((len(picks) - 1) / len(picks))

    # a folder that already holds other images' scores is refused
    with pytest.raises(UserError, match="holds scores of other images"):
        score_images(_geneval_layout(tmp_path / "layout", bench.metadata[:1]), bench, out)


def test_flat_folder_errors(bench, tmp_path, cli):
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in range(3):
        (flat / f"{n}.png").write_bytes(_render(bench.metadata[n], n))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{bench.prompts[0]}\n{bench.prompts[1]}\n")
    code, _, err = cli("eval", "--images", flat, "--prompts", prompts, "--benchmark",
                        "shapes", "--out", tmp_path / "eval")
    assert code == 2
    assert err == (f"error: {flat.resolve()} has 3 images but {prompts} has 2 prompts "
                   "(one prompt per image, in image-name order)")
    prompts.write_text(f"{bench.prompts[0]}\n{bench.prompts[1]}\na photo of a unicorn\n")
    with pytest.raises(UserError) as e:
        score_images(flat, bench, tmp_path / "eval", prompts_file=prompts)
    assert str(e.value) == f"{prompts}:3: 'a photo of a unicorn' is not a prompt of benchmark 'shapes'"


@pytest.mark.parametrize("args,expected", [
    (["--model", "{m}", "--images", "{i}"], "error: --model and --images are mutually exclusive: give --model "
                                            "(generate, then score) or --images (score existing images)"),
    ([], "error: give --model (generate, then score) or --images (score existing images)"),
    (["--images", "{i}", "--steps", "10"], "error: --steps cannot be used with --images"),
    (["--model", "{m}", "--prompts", "{i}"], "error: --prompts cannot be used with --model"),
])
def test_model_and_images_are_exclusive(tmp_path, args, expected, cli):
    subs = {"{m}": str(tmp_path / "model"), "{i}": str(tmp_path / "images")}
    code, _, err = cli("eval", *[subs.get(a, a) for a in args], "--benchmark", "shapes",
                        "--out", tmp_path / "eval")
    assert code == 2 and err == expected
    assert not (tmp_path / "eval").exists()


def test_name_order_compares_digit_runs_as_numbers():
    names = ["img_10.png", "img_2.png", "img_1.png", "b.png", "a_01.png", "a_1.png"]
    assert sorted(names, key=name_order) == ["a_01.png", "a_1.png", "b.png", "img_1.png", "img_2.png", "img_10.png"]


# ------------------------------------------------------------------------------------------------ reuse by content
def _black_png(size: int = 32) -> bytes:
    return encode_png(np.zeros((size, size, 3), dtype=np.uint8))


def test_images_changed_since_they_were_scored_are_rescored(bench, tmp_path, cli):
    """Renders scored 1.0, then three overwritten with black PNGs under the same names: a rerun into the same
    folder rescores those three (said in one line), never reports the old score."""
    import hashlib

    images = _geneval_layout(tmp_path / "images", bench.metadata)
    out = tmp_path / "eval"
    code, stdout, _ = cli("eval", "--images", images, "--benchmark", "shapes", "--out", out)
    assert code == 0 and stdout.splitlines()[0] == "geneval\t1.0000"
    blacked = {"00002_0": images / "00002" / "samples" / "0000.png", "00010_0": images / "00010" / "samples" /
               "0000.png", "00033_0": images / "00033" / "samples" / "0000.png"}
    for path in blacked.values():
        path.write_bytes(_black_png())
    code, stdout, stderr = cli("eval", "--images", images, "--benchmark", "shapes", "--out", out)
    n = len(bench.prompts)
    assert code == 0 and stderr == f"note: 3 of the {n} images scored into {out} have changed since: rescoring them"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"]["geneval/image_mean"] == pytest.approx((n - 3) / n)
    assert stdout.splitlines()[0] != "geneval\t1.0000"
    rows = {r["id"]: r for r in _rows(out / "samples.jsonl")}
    assert len(rows) == n == len(_rows(out / "samples.jsonl"))  # the stale lines are gone, not shadowed
    assert {sid for sid, r in rows.items() if not r["records"]["geneval"]["correct"]} == set(blacked)
    for sid, path in blacked.items():
        assert rows[sid]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # nothing changed: every score reused, no note
    assert cli("eval", "--images", images, "--benchmark", "shapes", "--out", out)[2] == ""
    # lines written before images carried their sha256 are rescored too, never trusted
    (out / "samples.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "sha256"}) + "\n"
                                               for r in rows.values()))
    code, _, stderr = cli("eval", "--images", images, "--benchmark", "shapes", "--out", out)
    assert code == 0 and stderr == (f"note: {n} images in {out} were scored without their sha256 (by an older "
                                    "soarbench): rescoring them")
    assert all("sha256" in r for r in _rows(out / "samples.jsonl"))


# ------------------------------------------------------------------------------------------------ image sizes
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): Pillow reads the size without decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _flat(bench, tmp_path, odd: bytes) -> tuple[Path, Path]:
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in range(2):
        (flat / f"{n}.png").write_bytes(_render(bench.metadata[n], n))
    (flat / "2.png").write_bytes(odd)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(bench.prompts[i] + "\n" for i in range(3)))
    return flat, prompts


def test_a_huge_image_is_refused_from_its_header_before_anything_is_written(bench, tmp_path, cli):
    flat, prompts = _flat(bench, tmp_path, _png_header(10000, 10000))
    code, out, err = cli("eval", "--images", flat, "--prompts", prompts, "--benchmark", "shapes",
                         "--out", tmp_path / "eval")
    assert code == 2 and out == ""
    assert err == (f"error: {flat.resolve() / '2.png'}: 10000 x 10000 pixels (read from its header) is above the "
                   "limit of 67,108,864 pixels; downscale it (soarbench eval --images takes --max-pixels N to raise "
                   "the limit)")
    assert not (tmp_path / "eval").exists()
    # the limit is the option's; the 32 x 32 renders are above a limit of 1000 pixels
    code, _, err = cli("eval", "--images", flat, "--prompts", prompts, "--benchmark", "shapes",
                       "--out", tmp_path / "eval", "--max-pixels", "1000")
    assert code == 2 and err.startswith(f"error: {flat.resolve() / '0.png'}: 32 x 32 pixels (read from its header) "
                                        "is above the limit of 1,000 pixels")
    # past twice Pillow's own limit, Pillow refuses to open it at all: still one line naming the file
    (flat / "2.png").write_bytes(_png_header(20000, 20000))
    with pytest.raises(UserError) as e:
        score_images(flat, bench, tmp_path / "eval", prompts_file=prompts)
    assert str(e.value) == (f"{flat.resolve() / '2.png'}: 400,000,000 pixels (read from its header) is above the "
                            "limit of 67,108,864 pixels; downscale it")
    code, _, err = cli("eval", "--model", tmp_path, "--max-pixels", "5", "--benchmark", "shapes",
                       "--out", tmp_path / "eval")
    assert (code, err) == (2, "error: --max-pixels cannot be used with --model")


def test_a_one_pixel_image_is_refused_not_scored_zero(bench, tmp_path, cli):
    from PIL import Image

    Image.new("RGB", (1, 1), (255, 255, 255)).save(tmp_path / "one.png")
    flat, prompts = _flat(bench, tmp_path, (tmp_path / "one.png").read_bytes())
    code, out, err = cli("eval", "--images", flat, "--prompts", prompts, "--benchmark", "shapes",
                         "--out", tmp_path / "eval")
    assert code == 2 and out == "" and not (tmp_path / "eval").exists()
    assert err == (f"error: {flat.resolve() / '2.png'}: 1 x 1 pixels is below the 16 px a side an image needs to be "
                   "scored (a broken export? every metric would score it as an empty picture); replace or remove it")
    (flat / "2.png").write_bytes(_render(bench.metadata[2], 2))  # 32 x 32: scored
    code, out, _ = cli("eval", "--images", flat, "--prompts", prompts, "--benchmark", "shapes",
                       "--out", tmp_path / "eval")
    assert code == 0 and out.splitlines()[0] == "geneval\t1.0000"
