"""Provenance for every result: git sha and dirty flag, package versions, devices, hashes of inputs."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("soarbench", "torch", "diffusers", "transformers", "accelerate", "open_clip_torch", "numpy",
            "pillow", "safetensors", "peft")
_HASH_LIMIT = 256 << 20  # files larger than this are identified by size, not content (SD3.5's T5 is ~10 GB)


def git_state(path: Path | None = None) -> dict:
    cwd = str(path or Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return {"git_sha": sha or None, "git_dirty": dirty if sha else None}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def devices() -> dict:
    import torch

    info = {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
    return info


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_set_hash(prompts: list[str], metadata_rows: list[dict] | None) -> str:
    rows = metadata_rows if metadata_rows is not None else [{"prompt": p} for p in prompts]
    return sha256_text("\n".join(json.dumps(r, sort_keys=True) for r in rows))


def folder_hash(folder: Path) -> str:
    """One sha256 over a model folder: every file's relative path and content hash (size only if huge)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel.startswith("."):
            continue
        size = f.stat().st_size
        if size <= _HASH_LIMIT:
            from soarbench.io import sha256_file

            digest = sha256_file(f)
        else:
            digest = f"size:{size}"
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def collect(config: dict | None = None) -> dict:
    return {**git_state(), "versions": package_versions(), "devices": devices(),
            "resolved_config": config or {}}
