"""Do the shipped shapes configs still train exactly as before? Fingerprint short runs of every method, compare two.

    python benchmarks/shapes/fingerprint.py --out runs/fp-before            # on the old commit
    python benchmarks/shapes/fingerprint.py --out runs/fp-after --compare runs/fp-before/fingerprint.json

Each method config of benchmarks/shapes/ (sft, soar, flow_grpo, flow_grpo_control, dance_grpo, diffusion_nft,
direct_align, seppo, actor_critic; srpo.toml scores with CLIP weights from the hub, so it is left out and
direct_align runs its code path) trains for a few optimizer steps from its own settings (`--no-eval`,
budget in optimizer steps, a checkpoint mid-way and at the end), and the run is reduced to sha256 digests of

  train_log.jsonl   every row in its key order, with the measured times (budget.wall_s, budget.device_s)
                    removed: losses, rewards, grad norms, learning rates, counted passes, each float to its last bit;
  every checkpoint  each tensor of each .safetensors file (name, dtype, shape, bytes) and of trainer_state.pt
                    (optimizer moments, RNG states, the method's state), so the weights are compared bit for bit.

A refactor that claims to change no result must give the same digests (`--compare` prints each run and file
that differs and exits 1). The digests depend on the machine's kernels: compare runs made on one machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import soarbench  # noqa: F401  (torchvision fallback before torch imports elsewhere)
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
# run -> (config, optimizer steps, overrides): at least three units of every method (three epochs of value
# pre-training and two policy epochs for the actor-critic), a checkpoint after half of them; then the variants
# the shipped configs do not exercise (Flow-GRPO-Fast's window, DanceGRPO's reference settings, the actor-critic's
# head critic, full fine-tuning with frozen copies)
RUNS = {"sft": ("sft", 6, ()), "soar": ("soar", 6, ()), "flow_grpo": ("flow_grpo", 6, ()),
        "flow_grpo_control": ("flow_grpo_control", 6, ()), "dance_grpo": ("dance_grpo", 6, ()),
        "diffusion_nft": ("diffusion_nft", 4, ()), "direct_align": ("direct_align", 6, ()),
        "seppo": ("seppo", 6, ()), "actor_critic": ("actor_critic", 10, ()),
        "flow_grpo_fast": ("flow_grpo", 4, ("method.sde_window=3", "method.init_same_noise=true")),
        "dance_grpo_reference": ("dance_grpo", 4, ("method.rollout_batch_size=4", "method.ema=true",
                                                   "method.ema_schedule=epoch", "method.round_timestep=true",
                                                   "method.sigma_grid=scheduler")),
        "diffusion_nft_full": ("diffusion_nft", 2, ("method.lora=false", "train.lr=1e-5")),
        "actor_critic_head": ("actor_critic", 8, ("method.critic=head",)),
        "actor_critic_full": ("actor_critic", 8, ("method.lora=false", "train.lr=1e-5"))}
MEASURED = ("wall_s", "device_s")


def _update(h, obj) -> None:
    """Feed a nested structure into the hash: tensors by dtype, shape and bytes; the rest by repr."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            _update(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _update(h, item)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def digest(obj) -> str:
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def log_digest(path: Path) -> str:
    """The log's rows, each with its keys in their written order, less the measured times."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        for key in MEASURED:
            row.get("budget", {}).pop(key, None)
    return hashlib.sha256("\n".join(json.dumps(row) for row in rows).encode()).hexdigest()


def without_measured(obj):
    """A checkpoint's trainer state less the meter's measured times (wall_s, device_s), at any depth."""
    if isinstance(obj, dict):
        return {k: without_measured(v) for k, v in obj.items() if k not in MEASURED}
    return obj


def run_fingerprint(folder: Path) -> dict[str, str]:
    """relative file -> digest, for the log and every tensor file of every checkpoint."""
    out = {"train_log.jsonl": log_digest(folder / "train_log.jsonl")}
    for path in sorted((folder / "checkpoints").rglob("*")):
        rel = str(path.relative_to(folder))
        if path.suffix == ".safetensors":
            out[rel] = digest(load_file(str(path)))
        elif path.suffix == ".pt":
            out[rel] = digest(without_measured(torch.load(path, map_location="cpu", weights_only=False)))
    return out


def train(config: str, steps: int, overrides, out: Path) -> float:
    cmd = [sys.executable, "-m", "soarbench", "train", "--config", str(HERE / f"{config}.toml"), "--out", str(out),
           "--no-eval", "--set", "budget.unit=optimizer_steps", "--set", f"budget.amount={steps}",
           "--set", f"train.checkpoint_every={steps // 2}"]
    for item in overrides:
        cmd += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{out.name}: training failed ({' '.join(cmd[2:])}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def compare(now: dict, before: dict) -> list[str]:
    diffs = []
    for run in sorted(set(now) | set(before)):
        a, b = now.get(run, {}), before.get(run, {})
        for rel in sorted(set(a) | set(b)):
            if a.get(rel) != b.get(rel):
                diffs.append(f"{run}/{rel}: {b.get(rel, 'missing')[:12]} -> {a.get(rel, 'missing')[:12]}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs and fingerprint.json")
    ap.add_argument("--compare", type=Path, help="an earlier fingerprint.json: exit 1 on any difference")
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS), help="these configs only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prints = {}
    for name in args.only or RUNS:
        config, steps, overrides = RUNS[name]
        folder = args.out / name
        if not (folder / "done.json").exists():
            if folder.exists():
                sys.exit(f"{folder}: an unfinished run is in the way; remove it and run again")
            seconds = train(config, steps, overrides, folder)
            print(f"{name}: {steps} optimizer steps in {seconds:.0f} s", flush=True)
        prints[name] = run_fingerprint(folder)
    tmp = args.out / "fingerprint.json.tmp"
    tmp.write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
    tmp.replace(args.out / "fingerprint.json")
    files = sum(len(v) for v in prints.values())
    print(f"{len(prints)} runs, {files} digests -> {args.out / 'fingerprint.json'}")
    if args.compare:
        before = json.loads(args.compare.read_text())
        before = {k: v for k, v in before.items() if k in prints}
        diffs = compare(prints, before)
        for line in diffs:
            print("DIFFERS", line)
        print(f"{'identical' if not diffs else f'{len(diffs)} differences'}: {files} digests of {len(prints)} runs "
              f"against {args.compare}")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
