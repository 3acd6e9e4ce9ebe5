"""Evaluation: fixed seeds give fixed scores, and an interrupted eval resumes without loss or double counting."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from soarbench.benchmarks import build_benchmark
from soarbench.errors import UserError
from soarbench.evaluate import evaluate


@pytest.fixture()
def bench():
    b = build_benchmark("shapes", n_per_tag=2, images_per_prompt=2)
    b.num_steps = 3
    return b


def _samples(folder):
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def test_same_seed_same_images_and_scores(adapter, bench, tmp_path):
    a = evaluate(adapter, bench, tmp_path / "a", seed=11, batch_size=7)
    b = evaluate(adapter, bench, tmp_path / "b", seed=11, batch_size=7)
    assert a["scores"] == b["scores"]
    for sa, sb in zip(_samples(tmp_path / "a"), _samples(tmp_path / "b")):
        assert sa["seed"] == sb["seed"]
        assert (tmp_path / "a" / sa["file"]).read_bytes() == (tmp_path / "b" / sb["file"]).read_bytes()
    # another batch size changes only float rounding: the noise is per sample, not per batch
    evaluate(adapter, bench, tmp_path / "d", seed=11, batch_size=5)
    for sa, sd in zip(_samples(tmp_path / "a"), _samples(tmp_path / "d")):
        pa = np.asarray(Image.open(tmp_path / "a" / sa["file"]), dtype=int)
        pd = np.asarray(Image.open(tmp_path / "d" / sd["file"]), dtype=int)
        assert np.abs(pa - pd).max() <= 2
    c = evaluate(adapter, bench, tmp_path / "c", seed=12, batch_size=7)
    assert [s["seed"] for s in _samples(tmp_path / "c")] != [s["seed"] for s in _samples(tmp_path / "a")]


def test_summary_records_provenance_and_official_rows(adapter, bench, tmp_path):
    s = evaluate(adapter, bench, tmp_path / "e", seed=0)
    n = len(bench.prompts) * 2
    assert s["n_samples"] == n and s["benchmark"]["n_prompts"] == len(bench.prompts)
    assert len(s["benchmark"]["prompt_set_sha256"]) == 64
    assert set(s["provenance"]) >= {"git_sha", "git_dirty", "versions", "devices", "resolved_config"}
    assert s["metrics"]["geneval"]["scale"] == "accuracy in [0, 1]"
    assert {"geneval", "geneval/image_mean", "geneval/prompt_any_correct"} <= set(s["scores"])
    rows = [json.loads(line) for line in (tmp_path / "e" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == n
    assert set(rows[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert len(s["per_prompt"]["geneval"]) == len(bench.prompts)


def test_interrupted_eval_resumes_without_loss_or_double_count(adapter, bench, tmp_path):
    full = evaluate(adapter, bench, tmp_path / "full", seed=4)
    part = tmp_path / "part"
    evaluate(adapter, bench, part, seed=4)
    lines = (part / "samples.jsonl").read_text().splitlines()
    kept = lines[:5]
    # a crash: the tail is lost, one line was written twice and the last write was torn
    (part / "samples.jsonl").write_text("\n".join(kept + [kept[2], lines[5][:40]]) + "\n")
    calls = []
    hook = adapter.transformer.register_forward_hook(lambda m, a, kw, o: calls.append(kw["hidden_states"].shape[0]),
                                                     with_kwargs=True)
    try:
        resumed = evaluate(adapter, bench, part, seed=4)
    finally:
        hook.remove()
    assert resumed["scores"] == full["scores"]
    assert resumed["n_samples"] == len(lines)
    # only the missing samples were generated again (each CFG step runs 2 x batch)
    assert sum(calls) == 2 * bench.num_steps * (len(lines) - 5)


def test_unknown_metric_suggests_the_nearest(adapter, bench, tmp_path):
    with pytest.raises(UserError, match="did you mean 'geneval'"):
        evaluate(adapter, bench, tmp_path / "x", metric_names=["genevel"])


def test_bf16_sampling_is_recorded_and_close_to_fp32(adapter, bench, tmp_path):
    """Evaluation in the training precision: bf16 autocast samples the same images up to bf16 rounding."""
    fp32 = evaluate(adapter, bench, tmp_path / "fp32", seed=3, precision="fp32")
    bf16 = evaluate(adapter, bench, tmp_path / "bf16", seed=3, precision="bf16")
    assert (fp32["sampling"]["precision"], bf16["sampling"]["precision"]) == ("fp32", "bf16")
    diffs = []
    for sa, sb in zip(_samples(tmp_path / "fp32"), _samples(tmp_path / "bf16")):
        pa = np.asarray(Image.open(tmp_path / "fp32" / sa["file"]), dtype=int)
        pb = np.asarray(Image.open(tmp_path / "bf16" / sb["file"]), dtype=int)
        diffs.append(np.abs(pa - pb).mean())
    assert 0 < max(diffs) < 8  # bf16 moved some pixels, by a few levels of 255 on average at most
    with pytest.raises(UserError, match="precision must be fp32, bf16 or fp16"):
        evaluate(adapter, bench, tmp_path / "x", precision="int8")


def test_min_images_per_task_counts_are_the_hand_computed_ones():
    # the whole shapes split: 5 single_object, 8 two_object, 5 counting, 20 colors, 40 position, 300 color_attr
    # prompts; at least 64 images per task: ceil(64 / n) per prompt, never below images_per_prompt
    full = build_benchmark("shapes", min_images_per_task=64)
    per_tag = {}
    for row, n in zip(full.metadata, full.image_counts()):
        per_tag.setdefault(row["tag"], set()).add(n)
    assert per_tag == {"single_object": {13}, "two_object": {8}, "counting": {13}, "colors": {4}, "position": {2},
                       "color_attr": {1}}
    assert sum(full.image_counts()) == 65 + 64 + 65 + 80 + 80 + 300
    two = build_benchmark("shapes", min_images_per_task=64, images_per_prompt=2)
    assert sum(two.image_counts()) == 65 + 64 + 65 + 80 + 80 + 600
    assert build_benchmark("shapes", n_per_tag=2, images_per_prompt=3).image_counts() == [3] * 12
    with pytest.raises(UserError, match="min_images_per_task must be >= 0, got -1"):
        build_benchmark("shapes", min_images_per_task=-1)


def test_min_images_per_task_draws_those_images_and_records_the_setting(adapter, tmp_path):
    b = build_benchmark("shapes", n_per_tag=2, min_images_per_task=3)  # 2 prompts per task: 2 images each
    b.num_steps = 2
    s = evaluate(adapter, b, tmp_path / "m", seed=0)
    ids = sorted(r["id"] for r in _samples(tmp_path / "m"))
    assert ids == sorted(f"{p:05d}_{k}" for p in range(12) for k in range(2))
    assert s["n_samples"] == 24 and s["benchmark"]["n_images"] == 24
    assert s["benchmark"]["min_images_per_task"] == 3 and s["benchmark"]["images_per_prompt"] == 1
    settings = json.loads((tmp_path / "m" / "settings.json").read_text())
    assert settings["min_images_per_task"] == 3


def test_an_eval_folder_redoes_everything_when_the_checkpoint_at_its_path_was_replaced(adapter, tiny_model_dir,
                                                                                       tmp_path, cli):
    """Reuse is keyed to the weights' content, not to --model's path: a checkpoint replaced at the same path gets
    all its samples redone (one note line), and the scores are the new checkpoint's, as from a fresh folder."""
    import torch

    from soarbench.harness.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "run", 1, adapter, ["transformer"], tiny_model_dir, {"step": 1}, {})
    args = ["--benchmark", "shapes", "--option", "n_per_tag=1", "--option", "images_per_prompt=1", "--steps", "2"]
    code, first, err = cli("eval", "--model", ckpt, *args, "--out", tmp_path / "e")
    assert code == 0 and err == ""
    n = len(_samples(tmp_path / "e"))
    image = (tmp_path / "e" / "images" / "00000_0.png").read_bytes()
    with torch.no_grad():  # other weights, saved at the same path
        for p in adapter.transformer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_checkpoint(tmp_path / "run", 1, adapter, ["transformer"], tiny_model_dir, {"step": 1}, {})
    code, again, err = cli("eval", "--model", ckpt, *args, "--out", tmp_path / "e")
    assert code == 0 and err.startswith(f"note: the model at {ckpt} has changed since {tmp_path / 'e'} was "
                                        "evaluated (weights sha256 ")
    assert err.endswith(f"all {n} samples are redone") and "\n" not in err
    code, fresh, _ = cli("eval", "--model", ckpt, *args, "--out", tmp_path / "fresh")
    # the scores, then the folder they are in
    assert again.splitlines()[-1] == f"out\t{tmp_path / 'e'}" and fresh.splitlines()[-1] == f"out\t{tmp_path / 'fresh'}"
    assert again.splitlines()[:-1] == fresh.splitlines()[:-1] and len(_samples(tmp_path / "e")) == n
    assert (tmp_path / "e" / "images" / "00000_0.png").read_bytes() == (
        tmp_path / "fresh" / "images" / "00000_0.png").read_bytes() != image
    # the same weights again: everything reused, nothing said
    assert cli("eval", "--model", ckpt, *args, "--out", tmp_path / "e") == (0, again, "")
    # a folder from before weights were recorded cannot vouch for its samples: redone, said once
    settings = json.loads((tmp_path / "e" / "settings.json").read_text())
    del settings["weights_sha256"]
    (tmp_path / "e" / "settings.json").write_text(json.dumps(settings))
    code, _, err = cli("eval", "--model", ckpt, *args, "--out", tmp_path / "e")
    assert code == 0 and err == (f"note: {tmp_path / 'e'} does not record which weights made its {n} samples "
                                 f"(written by an older soarbench): all {n} are redone")
