"""Re-create the shapes world's base model from its recipe (see base_recipe.toml).

    python benchmarks/shapes/make_base.py --recipe benchmarks/shapes/base_recipe.toml --out benchmarks/shapes/base
    python benchmarks/shapes/make_base.py --recipe benchmarks/shapes/base_recipe.toml --out /tmp/base --device cuda
    python benchmarks/shapes/make_base.py --from-pretrained OLD_BASE --out /tmp/base   # the [web] stage only

Steps: build the tiny SD3; train its VAE; fine-tune the VAE decoder with the encoder frozen (a short full-VAE
training leaves a decoder that blurs shapes into blobs; decoder steps are cheap and leave the latents alone);
pretrain the transformer and both text encoders with soarbench's own SFT trainer, with caption dropout so the
unconditional branch that classifier-free guidance extrapolates from is learnt, at a constant learning rate that
then decays linearly to 0 (train.decay_steps); with a [web] section, continue pretraining on "web" captions (a
share of the same images described wrongly: soarbench.worlds.shapes.write_web_captions) and anneal again, so the
base has not converged on the exact captions post-training uses; export.

The work folder (--work, default .cache/make_base) keeps the data, the models and the pretraining runs, so an
interrupted run resumes. The result is a standard diffusers StableDiffusion3Pipeline folder (fp16 weights, no
T5) plus SHA256SUMS and recipe.toml.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

import soarbench  # noqa: F401  (torchvision fallback before diffusers imports)
from soarbench import config as C
from soarbench.harness.data import load_pixels, read_records
from soarbench.models.tiny import TinySD3Config, build_tiny_sd3
from soarbench.worlds.shapes import write_web_captions

SUMS_NAME = "SHA256SUMS"  # written last by export(): its presence marks a finished export


def fit(name: str, params, batch_loss, cfg: dict, log) -> None:
    """cfg["steps"] AdamW steps (lr cfg["lr"], no weight decay, cosine decay to 0) on batch_loss()."""
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), weight_decay=0.0)
    steps = int(cfg["steps"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    t0 = time.time()
    for step in range(1, steps + 1):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            log(f"{name} step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")


def train_vae(model_dir: Path, records, cfg: dict, device: str, log) -> None:
    """Fit the tiny VAE on the shapes images: L1 + MSE reconstruction and a small KL term."""
    import random

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").to(device).train()
    rng = random.Random(int(cfg["seed"]))
    gen = torch.Generator(device=device).manual_seed(int(cfg["seed"]))
    pixels = torch.stack([load_pixels(r, rng, False) for r in records]).to(device)
    bs = int(cfg["batch_size"])

    def batch_loss() -> torch.Tensor:
        x = pixels[torch.randint(len(pixels), (bs,), generator=gen, device=device)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        return (rec - x).abs().mean() + (rec - x).pow(2).mean() + float(cfg["kl_weight"]) * post.kl().mean()

    fit("vae", vae.parameters(), batch_loss, cfg, log)
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(pixels[i:i + 512]).latent_dist.mean for i in range(0, len(pixels), 512)])
        rec = torch.cat([vae.decode(lat[i:i + 512]).sample for i in range(0, len(lat), 512)])
    shift, scale = lat.mean().item(), 1.0 / lat.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    err = (rec.clamp(-1, 1) - pixels).abs().mul(127.5).mean().item()
    log(f"vae: mean abs reconstruction error {err:.2f}/255, shift {shift:.4f}, scale {scale:.4f}")
    vae.cpu().save_pretrained(model_dir / "vae")


def export(run_dir: Path, out: Path, recipe_text: str) -> None:
    """Full pipeline folder = the run's base folder (VAE, scheduler, tokenizers) + its last checkpoint, in fp16."""
    from diffusers import StableDiffusion3Pipeline

    from soarbench.export import declare_float32_loading
    from soarbench.harness.checkpoint import latest_checkpoint
    from soarbench.models.sd3 import SUMS_FILE, SD3Adapter, sha256sums_text

    ckpt = latest_checkpoint(run_dir)
    adapter = SD3Adapter.from_pretrained(ckpt, device="cpu", max_sequence_length=0)
    pipe: StableDiffusion3Pipeline = adapter.pipe
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp)
    # stored in fp16, loaded in float32 by a plain from_pretrained (as diffusers loads the transformer and VAE)
    declare_float32_loading(tmp)
    (tmp / "recipe.toml").write_text(recipe_text)
    # trained without T5 tokens: evaluation must use the same (zero) length
    (tmp / "soarbench_model.json").write_text(json.dumps({"max_sequence_length": adapter.max_sequence_length}) + "\n")
    (tmp / SUMS_FILE).write_text(sha256sums_text(tmp))  # the format verify_sha256sums reads, as checkpoints carry
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def finetune_decoder(model_dir: Path, records, cfg: dict, device: str, log) -> None:
    """Train the VAE decoder further (L1 + MSE) on the encoder's posterior means, the encoder frozen: the
    latents and their shift/scale are unchanged, only what is drawn from them gets sharper (the move of
    Stability's decoder-only "ft-MSE" VAE)."""
    import random

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").to(device)
    rng = random.Random(int(cfg["seed"]))
    gen = torch.Generator(device=device).manual_seed(int(cfg["seed"]))
    pixels = torch.stack([load_pixels(r, rng, False) for r in records]).to(device)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 512]).latent_dist.mean for i in range(0, len(pixels), 512)])
    decoder = [p for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))]
    vae.requires_grad_(False)
    for p in decoder:
        p.requires_grad_(True)
    bs = int(cfg["batch_size"])
    vae.decoder.train()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(pixels), (bs,), generator=gen, device=device)
        rec = vae.decode(latents[idx]).sample
        return (rec - pixels[idx]).abs().mean() + (rec - pixels[idx]).pow(2).mean()

    fit("decoder", decoder, batch_loss, cfg, log)
    vae.eval()
    with torch.no_grad():
        rec = torch.cat([vae.decode(latents[i:i + 512]).sample for i in range(0, len(latents), 512)])
    err = (rec.clamp(-1, 1) - pixels).abs().mul(127.5).mean().item()
    log(f"decoder: mean abs reconstruction error {err:.2f}/255")
    vae.cpu().save_pretrained(model_dir / "vae")


def training_data(data_dir: Path, cfg: dict, size: int):
    """The recipe's shapes images, written by the harness's own generator (again when the split changed)."""
    from soarbench.harness.data import ensure_generated

    jsonl = data_dir / "train.jsonl"
    ensure_generated({"jsonl": str(jsonl), "generate": {"world": "shapes", "n_images": int(cfg["n_images"]),
                                                        "seed": int(cfg["seed"]), "image_size": size}})
    return jsonl, read_records(jsonl)


def pretrain(section: dict, model_dir: Path, jsonl: Path, run_dir: Path, device: str, log) -> None:
    from soarbench.harness.train import train

    cfg = C.deep_merge(section, {"model": {"path": str(model_dir.resolve())}, "data": {"jsonl": str(jsonl.resolve())},
                                 "train": {"device": device}, "run": {"name": "base", "group": "base"}})
    train(cfg, run_dir, resume=(run_dir / "train_log.jsonl").exists(), log=log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=Path(__file__).with_name("base_recipe.toml"))
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("base"))
    ap.add_argument("--work", type=Path, default=Path(".cache/make_base"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--export-only", action="store_true", help="export the work folder's last checkpoint")
    ap.add_argument("--from-pretrained", type=Path, default=None,
                    help="a finished export of the pretraining stage (e.g. the base of a single-stage recipe): "
                         "only the [web] stage runs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override a recipe value")
    args = ap.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    recipe = C.apply_overrides(C.load_toml(args.recipe), args.overrides)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    recipe_text = args.recipe.read_text() + "\n# overrides: " + json.dumps(args.overrides) + "\n"
    jsonl, records = training_data(work / "data", recipe["data"], int(recipe["tiny"]["image_size"]))
    log(f"data: {len(records)} images ({time.time() - t_start:.0f}s)")
    model_dir = work / "init"
    if args.from_pretrained is not None:
        pass  # stages 1-4 are done: the [web] stage starts from their export
    elif not (model_dir / "model_index.json").is_file():
        build_tiny_sd3(model_dir, TinySD3Config.from_dict(recipe["tiny"]))
    if args.from_pretrained is None and not (model_dir / "vae_done").is_file():
        train_vae(model_dir, records, recipe["vae"], device, log)
        (model_dir / "vae_done").write_text("ok")
    if args.from_pretrained is None and not (model_dir / "decoder_done").is_file():
        finetune_decoder(model_dir, records, recipe["decoder"], device, log)
        (model_dir / "decoder_done").write_text("ok")
    run_dir = work / "pretrain"
    web = recipe.get("web")
    if args.from_pretrained is None:
        if not args.export_only:
            pretrain(recipe["pretrain"], model_dir, jsonl, run_dir, device, log)
        if web is None:  # a single-stage recipe: the pretrained model is the base
            export(run_dir, args.out, recipe_text)
            log(f"base written to {args.out} in {time.time() - t_start:.0f}s")
            return 0
        pretrained = work / "pretrained"
        if not (pretrained / SUMS_NAME).is_file():
            export(run_dir, pretrained, recipe_text)
    elif web is None:
        raise SystemExit("make_base: --from-pretrained needs a recipe with a [web] stage")
    else:
        pretrained = args.from_pretrained
    web_jsonl = write_web_captions(jsonl, jsonl.with_name("web.jsonl"), float(web["noise"]), int(web["seed"]))
    web_run = work / "web"
    if not args.export_only:
        pretrain({k: v for k, v in web.items() if k not in ("noise", "seed")}, pretrained, web_jsonl, web_run,
                 device, log)
    export(web_run, args.out, recipe_text)
    log(f"base written to {args.out} in {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
