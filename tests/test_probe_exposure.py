"""The exposure-bias probe against closed forms (stub models with known velocity fields), the real sampler on the
tiny model, determinism, and the CLI's probe.json; the minimum detectable difference against hand values."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.harness.data import read_records
from soarbench.models.sd3 import TextEmbeddings
from soarbench.probes.exposure import exposure_probe, pair_noise
from soarbench.probes.power import min_detectable_difference
from soarbench.sampling.ode import sampling_sigmas

# SD3's scheduler (shift 3), as the shapes base ships it
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": False}
SIZE = 16  # stub images: 16 px, solid colours; stub latents: every 8th pixel, so 3 x 2 x 2
STRIDE = 8
SIGMAS = (1.0, 0.8, 0.6, 0.4, 0.2)


# ------------------------------------------------------------------------------------------ the stub world

def _colours(k: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(123)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(k)]


def _write_solid_data(folder: Path, colours) -> Path:
    """A HY-SOAR JSONL of solid-colour images whose caption spells the colour, so a stub can know each z0."""
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, rgb in enumerate(colours):
        md5 = f"img{i:04d}"
        Image.new("RGB", (SIZE, SIZE), rgb).save(folder / "images" / f"{md5}.png")
        lines.append(json.dumps({"md5": md5, "caption_en": f"pair {i}: {rgb[0]} {rgb[1]} {rgb[2]}",
                                 "bw": SIZE, "bh": SIZE}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def _latent_of_colour(rgb) -> torch.Tensor:
    """What the stub VAE makes of a solid image: pixels in [-1, 1], shifted and scaled like SD3's latents."""
    pixel = torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0
    return ((pixel - 0.25) * 2.0).reshape(3, 1, 1).expand(3, SIZE // STRIDE, SIZE // STRIDE)


class StubAdapter:
    """The few SD3Adapter calls the probe makes, with a velocity field known in closed form.

    A caption "pair i: r g b" encodes to tokens [i, r, g, b, 1]; the empty prompt to [-1, 0, 0, 0, 0].
    mode "points": the conditional velocity points at the pair's z0, v = (z - z0) / sigma + bias, and the
      unconditional one at 0, v = z / sigma + bias.
    mode "oracle": the conditional velocity is the pair's true one, v = z1 - z0 + bias (z1 = its noise).
    """

    def __init__(self, mode: str, bias: float = 0.0, seed: int = 0):
        self.mode, self.bias, self.seed = mode, bias, seed
        self.scheduler_config = dict(SCHEDULER)
        self.transformer = torch.nn.Identity()
        self.source, self.checkpoint, self.max_sequence_length = Path("stub"), None, 0
        self.calls = 0

    def posterior(self, pixels):
        mean = pixels[:, :, ::STRIDE, ::STRIDE]
        return mean, torch.zeros_like(mean)

    def to_model_latents(self, x):
        return (x - 0.25) * 2.0

    def encode_prompts(self, prompts):
        rows = []
        for p in prompts:
            head, rgb = p.split(":")
            rows.append([float(head.split()[1]), *map(float, rgb.split()), 1.0])
        tokens = torch.tensor(rows).reshape(len(rows), 1, 5)
        return TextEmbeddings(tokens, tokens[:, 0])

    def null_embeddings(self):
        tokens = torch.tensor([[[-1.0, 0.0, 0.0, 0.0, 0.0]]])
        return TextEmbeddings(tokens, tokens[:, 0])

    def velocity(self, z, sigma, text, net=None):
        self.calls += 1
        sigma = sigma.reshape(-1).expand(z.shape[0]).reshape(-1, 1, 1, 1)
        out = torch.empty_like(z)
        for j in range(z.shape[0]):
            index, r, g, b, cond = text.tokens[j, 0].tolist()
            if not cond:
                assert self.mode == "points", "the oracle stub is only run without guidance"
                out[j] = z[j] / sigma[j]
                continue
            z0 = _latent_of_colour((int(r), int(g), int(b)))
            if self.mode == "points":
                out[j] = (z[j] - z0) / sigma[j]
            else:
                out[j] = pair_noise(self.seed, int(index), z0.shape) - z0
        return out + self.bias


@pytest.fixture()
def solid_data(tmp_path):
    colours = _colours(6)
    return read_records(_write_solid_data(tmp_path / "solid", colours)), colours


def _rows(summary, guidance):
    return {r["sigma"]: r for r in summary["rows"] if r["guidance"] == guidance}


# ------------------------------------------------------------------------------------------ closed forms

def test_a_model_pointing_at_z0_lands_on_it_from_every_start(solid_data):
    """v = (z - z0)/sigma is exact on the straight path and Euler is exact on straight paths: zero error."""
    records, _ = solid_data
    summary = exposure_probe(StubAdapter("points"), records, n=6, sigmas=SIGMAS, guidance=1.0, batch_size=4)
    rows = _rows(summary, 1.0)
    assert sorted(rows) == sorted(SIGMAS) and summary["guidance"] == [1.0]
    for row in rows.values():
        assert row["mse_mean"] < 1e-10 and max(row["per_pair_mse"]) < 1e-10


def test_guidance_moves_the_endpoint_to_the_extrapolated_image(solid_data):
    """Unconditional velocity pointing at 0, conditional at z0: the CFG velocity is (z - a)/sigma with
    a = g z0, which Euler reaches exactly, so the per-element error is ((g - 1) z0)^2 from every start."""
    records, colours = solid_data
    g = 4.5
    summary = exposure_probe(StubAdapter("points"), records, n=6, sigmas=SIGMAS, guidance=g, batch_size=4)
    expected = np.array([(((g - 1) * _latent_of_colour(c)) ** 2).mean().item() for c in colours])
    assert summary["guidance"] == [g, 1.0]
    for sigma, row in _rows(summary, g).items():
        np.testing.assert_allclose(row["per_pair_mse"], expected, rtol=1e-5)
        assert row["mse_mean"] == pytest.approx(expected.mean(), rel=1e-5)
        assert row["mse_std"] == pytest.approx(expected.std(ddof=1), rel=1e-4)
        assert row["mse_sem"] == pytest.approx(expected.std(ddof=1) / math.sqrt(6), rel=1e-4)
    for row in _rows(summary, 1.0).values():  # the g = 1 rows are the unguided model: exact again
        assert row["mse_mean"] < 1e-10


@pytest.mark.parametrize("bias", [0.3, -0.05])
def test_a_constant_bias_on_the_true_velocity_accumulates_bias_times_sigma(solid_data, bias):
    """v = z1 - z0 + b: Euler's steps from s to 0 sum to -s, so z_end = z0 - s b and the error is (s b)^2."""
    records, _ = solid_data
    stub = StubAdapter("oracle", bias=bias, seed=5)
    summary = exposure_probe(stub, records, n=6, sigmas=SIGMAS, guidance=1.0, seed=5, batch_size=6)
    for sigma, row in _rows(summary, 1.0).items():
        np.testing.assert_allclose(row["per_pair_mse"], (sigma * bias) ** 2, rtol=1e-4)


def test_a_self_correcting_biased_model_keeps_only_the_last_steps_bias(solid_data):
    """v = (z - z0)/sigma + b: each step scales the error by sigma_next/sigma and adds (sigma_next - sigma) b;
    the final step to 0 wipes what came before, leaving -sigma_last b (sigma_last = the eval grid's last
    nonzero sigma), whatever the start: the error is (b sigma_last)^2. Also: the number of Euler steps is
    the number of eval-grid sigmas at or below the start."""
    records, _ = solid_data
    b = 0.5
    summary = exposure_probe(StubAdapter("points", bias=b), records, n=3, sigmas=SIGMAS, guidance=1.0,
                             num_steps=10)
    grid = sampling_sigmas(SCHEDULER, 10).numpy()
    sigma_last = float(grid[-2])
    for sigma, row in _rows(summary, 1.0).items():
        np.testing.assert_allclose(row["per_pair_mse"], (b * sigma_last) ** 2, rtol=1e-4)
        assert row["euler_steps"] == int((grid < sigma - 1e-6).sum())  # the start, then every grid sigma below
    assert _rows(summary, 1.0)[1.0]["euler_steps"] == 10


def test_pairs_are_the_first_n_lines_and_bad_requests_are_refused(solid_data):
    records, _ = solid_data
    summary = exposure_probe(StubAdapter("points"), records, n=2, sigmas=[0.5], guidance=1.0)
    assert summary["data"]["pairs"] == [records[0].where, records[1].where]
    assert summary["n_pairs"] == 2 and len(summary["rows"][0]["per_pair_mse"]) == 2
    with pytest.raises(UserError, match="only 6 usable lines"):
        exposure_probe(StubAdapter("points"), records, n=7)
    with pytest.raises(UserError, match=r"1\.5 is not in \(0, 1\]"):
        exposure_probe(StubAdapter("points"), records, n=2, sigmas=[1.5])
    with pytest.raises(UserError, match="is not in"):
        exposure_probe(StubAdapter("points"), records, n=2, sigmas=[0.0])


# ------------------------------------------------------------------------------------------ the real model

def test_starting_at_one_is_the_evaluation_sampler(adapter, shapes_data):
    """From s = 1 the probe's trajectory is euler_sample's from the pair's noise (same grid, same CFG)."""
    from soarbench.probes.exposure import integrate_from, start_grid
    from soarbench.sampling.ode import euler_sample

    text = adapter.encode_prompts(["a photo of a red circle", "a photo of two squares"])
    noise = torch.stack([pair_noise(0, i, adapter.latent_shape(32, 32)) for i in range(2)])
    grid = start_grid(sampling_sigmas(adapter.scheduler_config, 6), 1.0)
    ours = integrate_from(adapter, noise, grid, text, adapter.null_embeddings(), 4.5)
    torch.testing.assert_close(ours, euler_sample(adapter, text, noise, num_steps=6, guidance=4.5))


def test_same_seed_same_numbers_whatever_the_batching(adapter, shapes_data):
    records = read_records(shapes_data)
    kwargs = dict(n=4, sigmas=[1.0, 0.4], guidance=3.0, num_steps=5)
    a = exposure_probe(adapter, records, seed=1, batch_size=4, **kwargs)
    b = exposure_probe(adapter, records, seed=1, batch_size=4, **kwargs)
    c = exposure_probe(adapter, records, seed=1, batch_size=3, **kwargs)
    d = exposure_probe(adapter, records, seed=2, batch_size=4, **kwargs)
    assert [r["per_pair_mse"] for r in a["rows"]] == [r["per_pair_mse"] for r in b["rows"]]
    assert [r["geneval_scores"] for r in a["rows"]] == [r["geneval_scores"] for r in b["rows"]]
    for ra, rc in zip(a["rows"], c["rows"]):
        np.testing.assert_allclose(ra["per_pair_mse"], rc["per_pair_mse"], rtol=1e-4)
    assert a["rows"][0]["per_pair_mse"] != d["rows"][0]["per_pair_mse"]


def test_cli_writes_probe_json(tiny_model_dir, shapes_data, tmp_path, cli):
    out = tmp_path / "probe"
    code, stdout, err = cli("probe", "--model", tiny_model_dir, "--data", shapes_data, "--n", 5,
                            "--sigmas", "1,0.5", "--steps", 4, "--guidance", 2.0, "--seed", 3, "--out", out)
    assert code == 0, err
    summary = json.loads((out / "probe.json").read_text())
    assert summary["schema"] == "soarbench.probe.exposure/1"
    assert summary["model"]["path"] == str(tiny_model_dir) and summary["model"]["checkpoint"] is None
    assert (summary["seed"], summary["n_pairs"], summary["num_steps"]) == (3, 5, 4)
    assert summary["sigmas"] == [1.0, 0.5] and summary["guidance"] == [2.0, 1.0]
    assert summary["data"]["sha256"] == hashlib.sha256(Path(shapes_data).read_bytes()).hexdigest()
    assert summary["data"]["pairs"] == [f"{shapes_data}:{i}" for i in range(1, 6)]
    assert [(r["guidance"], r["sigma"]) for r in summary["rows"]] == [(2.0, 1.0), (2.0, 0.5), (1.0, 1.0),
                                                                       (1.0, 0.5)]
    for row in summary["rows"]:
        assert len(row["per_pair_mse"]) == 5 and row["mse_mean"] == pytest.approx(np.mean(row["per_pair_mse"]))
        assert 0.0 <= row["geneval"] <= 1.0 and "geneval/counting" in row["geneval_scores"]
    assert 0.0 <= summary["reference"]["geneval_of_decoded_z0"]["geneval"] <= 1.0
    assert "versions" in summary["provenance"]
    assert len(stdout.splitlines()) == 1 + 4 + 1  # header, one line per row, the file


def test_cli_refuses_bad_sigmas_in_one_line(tiny_model_dir, shapes_data, tmp_path, cli):
    code, _, err = cli("probe", "--model", tiny_model_dir, "--data", shapes_data, "--sigmas", "1,abc",
                       "--out", tmp_path / "p")
    assert code == 2 and err.splitlines() == ["error: --sigmas: 'abc' is not a number; expected comma-separated "
                                              "starting sigmas in (0, 1], e.g. 1,0.8,0.6,0.4,0.2"]


# ------------------------------------------------------------------------------------------ power

def test_min_detectable_difference_against_hand_values():
    # z_0.975 = 1.959964, z_0.8 = 0.841621 (normal tables): 2.801585 standard errors
    assert min_detectable_difference(1.0, 100) == pytest.approx(0.2801585, abs=1e-6)
    assert min_detectable_difference(0.5, 64) == pytest.approx(2.801585 * 0.5 / 8, abs=1e-6)
    # unpaired groups of n: the difference of two means has sd * sqrt(2 / n)
    assert min_detectable_difference(1.0, 50, paired=False) == pytest.approx(2.801585 * math.sqrt(2 / 50), abs=1e-6)
    # alpha 0.01, power 0.9: z_0.995 = 2.575829, z_0.9 = 1.281552
    assert min_detectable_difference(2.0, 25, alpha=0.01, power=0.9) == pytest.approx(3.857381 * 2 / 5, abs=1e-6)
    assert min_detectable_difference(0.0, 10) == 0.0
    for bad in (dict(diffs_std=-1.0, n=10), dict(diffs_std=1.0, n=0), dict(diffs_std=1.0, n=10, alpha=1.0),
                dict(diffs_std=1.0, n=10, power=0.0)):
        with pytest.raises(ValueError):
            min_detectable_difference(**bad)


# ------------------------------------------------------------------------------------------ uncond_check

def _uncond_check():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "shapes" / "uncond_check.py"
    spec = importlib.util.spec_from_file_location("uncond_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uncond_check_branches_meet_at_guidance_one_and_zero(adapter, shapes_data):
    """The CFG combination is the conditional branch at g = 1 and the unconditional one at g = 0; the zero
    branch is E||z1 - z0||^2; the same seed draws the same samples."""
    check = _uncond_check()
    records = read_records(shapes_data)
    one = check.velocity_errors(adapter, records, n=6, seed=4, guidance=1.0, batch_size=4)
    zero = check.velocity_errors(adapter, records, n=6, seed=4, guidance=0.0, batch_size=4)
    torch.testing.assert_close(one["cfg"], one["cond"])
    torch.testing.assert_close(zero["cfg"], zero["uncond"])
    torch.testing.assert_close(one["cond"], zero["cond"])
    assert one["sigma"].min() > 0 and one["sigma"].max() <= 1 and bool((one["zero"] > 0.5).all())
    text = check.report(one, 1.0)
    ratio = one["uncond"].mean().item() / one["cond"].mean().item()
    assert f"uncond/cond = {ratio:.3f}" in text and "cfg/cond = 1.000" in text
    verdict = "within" if ratio <= 1.5 else "NOT within"
    assert f"unconditional error {verdict} 1.5x the conditional one (ratio {ratio:.3f})" in text


def test_compare_probes_pairs_the_pairs(solid_data):
    """Two biased oracle models on the same pairs: every pair's error differs by ((s b2)^2 - (s b1)^2), so the
    mean difference is that and its standard deviation (and so its MDD) is ~0."""
    from soarbench.probes.exposure import compare_probes

    records, _ = solid_data
    kw = dict(n=6, sigmas=[1.0, 0.5], guidance=1.0, seed=5)
    a = exposure_probe(StubAdapter("oracle", bias=0.1, seed=5), records, **kw)
    b = exposure_probe(StubAdapter("oracle", bias=0.3, seed=5), records, **kw)
    rows = {r["sigma"]: r for r in compare_probes(a, b)}
    for s in (1.0, 0.5):
        assert rows[s]["diff_mean"] == pytest.approx((s * 0.3) ** 2 - (s * 0.1) ** 2, rel=1e-4)
        assert rows[s]["diff_std"] < 1e-6 and rows[s]["min_detectable_difference"] < 1e-5
        assert rows[s]["diff_ci95"][0] <= rows[s]["diff_mean"] <= rows[s]["diff_ci95"][1]
    c = exposure_probe(StubAdapter("oracle", bias=0.3, seed=6), records, **{**kw, "seed": 6})
    with pytest.raises(UserError, match="differ in seed"):
        compare_probes(a, c)
