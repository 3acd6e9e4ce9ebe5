"""`make base` end to end on a micro recipe: the committed recipe with every count shrunk (the same code path)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from soarbench.models.sd3 import SD3Adapter, verify_sha256sums

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "shapes" / "base_recipe.toml"
MICRO = ["data.n_images=12", "vae.steps=2", "vae.batch_size=4", "decoder.steps=3", "decoder.batch_size=4",
         "pretrain.budget.amount=2", "pretrain.train.batch_size=4", "pretrain.train.warmup_steps=0",
         "pretrain.train.decay_steps=1", "pretrain.train.checkpoint_every=1", "web.budget.amount=2",
         "web.train.batch_size=4", "web.train.warmup_steps=0", "web.train.decay_steps=1", "web.train.checkpoint_every=1"]


def _make_base():
    spec = importlib.util.spec_from_file_location("make_base", ROOT / "benchmarks" / "shapes" / "make_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_micro_recipe_builds_a_loadable_base_whose_decoder_alone_was_fine_tuned(tmp_path):
    make_base = _make_base()
    args = ["--recipe", str(RECIPE), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "base"),
            "--device", "cpu"] + [a for item in MICRO for a in ("--set", item)]
    assert make_base.main(args) == 0
    base = tmp_path / "base"
    assert verify_sha256sums(base) > 5
    assert json.loads((base / "soarbench_model.json").read_text()) == {"max_sequence_length": 0}
    assert "caption_dropout = 0.1" in (base / "recipe.toml").read_text()
    adapter = SD3Adapter.from_pretrained(base)
    assert adapter.transformer.dtype == torch.float32  # loaded for training in fp32 from the fp16 files
    # stored in fp16, and declared to load in float32 as diffusers loads the transformer: a plain
    # StableDiffusion3Pipeline.from_pretrained gets one dtype throughout (tests/test_export.py runs it)
    from safetensors import safe_open

    for name in ("text_encoder", "text_encoder_2"):
        assert json.loads((base / name / "config.json").read_text())["dtype"] == "float32"
        with safe_open(str(base / name / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    # the pretraining ran with caption dropout, from the decoder-tuned init
    import tomllib

    config = tomllib.loads((tmp_path / "work" / "pretrain" / "config.toml").read_text())
    assert config["data"]["caption_dropout"] == 0.1
    assert (tmp_path / "work" / "init" / "decoder_done").is_file()
    # then the [web] stage: from the pretraining's export, on the same images with 40% of the captions wrong
    web = tomllib.loads((tmp_path / "work" / "web" / "config.toml").read_text())
    assert web["model"]["path"] == str((tmp_path / "work" / "pretrained").resolve())
    assert web["data"]["jsonl"].endswith("web.jsonl") and web["data"]["caption_dropout"] == 0.1
    records = [json.loads(line) for line in Path(web["data"]["jsonl"]).read_text().splitlines()]
    truth = [json.loads(line) for line in (tmp_path / "work" / "data" / "train.jsonl").read_text().splitlines()]
    assert [r["md5"] for r in records] == [r["md5"] for r in truth]
    assert all((r["caption_en"] != t["caption_en"]) == bool(r.get("web_wrong")) for r, t in zip(records, truth))
    # the base is the [web] stage's last checkpoint, not the pretraining's
    last = SD3Adapter.from_pretrained(tmp_path / "work" / "web" / "checkpoints" / "step_000002")
    for a, b in zip(adapter.transformer.parameters(), last.transformer.parameters()):
        assert torch.equal(a, b.half().float())
    # --from-pretrained: the [web] stage alone, from a finished export
    again = tmp_path / "again"
    assert make_base.main(["--recipe", str(RECIPE), "--work", str(again / "work"), "--out", str(again / "base"),
                           "--device", "cpu", "--from-pretrained", str(tmp_path / "work" / "pretrained")]
                          + [a for item in MICRO for a in ("--set", item)]) == 0
    assert not (again / "work" / "init").exists() and not (again / "work" / "pretrain").exists()
    assert verify_sha256sums(again / "base") > 5


def test_decoder_fine_tuning_leaves_the_encoder_and_latent_scaling_alone(tmp_path):
    from diffusers import AutoencoderKL

    from soarbench.harness.data import read_records
    from soarbench.models.tiny import TinySD3Config, build_tiny_sd3
    from soarbench.worlds.shapes import write_training_split

    make_base = _make_base()
    records = read_records(write_training_split(tmp_path / "data", n_images=8, seed=0))
    model = tmp_path / "init"
    build_tiny_sd3(model, TinySD3Config(image_size=32, vae_channels=(32, 64)))
    make_base.train_vae(model, records, {"steps": 2, "batch_size": 4, "lr": 1e-3, "kl_weight": 1e-6, "seed": 0},
                        "cpu", log=lambda m: None)
    before = AutoencoderKL.from_pretrained(model / "vae")
    make_base.finetune_decoder(model, records, {"steps": 2, "batch_size": 4, "lr": 1e-3, "seed": 0}, "cpu",
                               log=lambda m: None)
    after = AutoencoderKL.from_pretrained(model / "vae")
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(b[k], a[k]) for k in b if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(b[k], a[k]) for k in b if k.startswith("decoder."))
    assert after.config.scaling_factor == before.config.scaling_factor
    assert after.config.shift_factor == before.config.shift_factor
