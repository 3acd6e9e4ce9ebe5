"""Hugging Face Hub ids: `--model owner/name[@rev]` and reward weights resolved through huggingface_hub's cache.

No network: a cache laid out as the Hub lays it (models--owner--name/{blobs, snapshots/<commit>, refs/main}) under
HF_HUB_CACHE, with HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soarbench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "benchmarks" / "shapes" / "base"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo: str, files: dict[str, Path | bytes], commit: str = COMMIT) -> Path:
    """Lay `files` (path in the repo -> a file or bytes) out as huggingface_hub caches a snapshot of `repo`."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for rel, source in files.items():
        data = source.read_bytes() if isinstance(source, Path) else source
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def _folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def _soarbench(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "soarbench", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **env})


@pytest.fixture()
def offline_cache(tmp_path):
    cache = tmp_path / "hub"
    hub_cache(cache, "soarbench-test/shapes-base", _folder_files(BASE))
    return cache, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}


def test_model_hub_id_loads_from_the_local_cache(offline_cache, tmp_path):
    cache, env = offline_cache
    out = tmp_path / "eval"
    proc = _soarbench(["eval", "--model", f"soarbench-test/shapes-base@{COMMIT}", "--benchmark", "shapes",
                       "--option", "n_per_tag=1", "--option", "images_per_prompt=1", "--option",
                       "min_images_per_task=1", "--steps", "1", "--out", out], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    settings = json.loads((out / "settings.json").read_text())
    from soarbench.models.sd3 import weights_fingerprint

    # the cached snapshot is the shipped base, file for file: the same content fingerprint
    assert settings["model"] == f"soarbench-test/shapes-base@{COMMIT}"
    assert settings["weights_sha256"] == weights_fingerprint(BASE)


def test_model_hub_id_not_in_the_cache_is_one_line(offline_cache):
    _, env = offline_cache
    proc = _soarbench(["export", "soarbench-test/not-cached", "--out", "x"], env)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model soarbench-test/not-cached (no such local path; "
                                                   "as a Hub id) is not in the local Hugging Face cache (")
    assert "hf download soarbench-test/not-cached" in lines[0]


def test_hub_id_parsing():
    from soarbench.hub import local_model_path, parse_hub_id

    assert parse_hub_id("stabilityai/stable-diffusion-3.5-medium") == ("stabilityai/stable-diffusion-3.5-medium",
                                                                       None)
    assert parse_hub_id("owner/name@v1.0") == ("owner/name", "v1.0")
    assert parse_hub_id("/abs/path") is None and parse_hub_id("./a/b") is None and parse_hub_id("a/b/c") is None
    assert parse_hub_id("name") is None
    assert local_model_path(BASE) == BASE  # an existing folder is never looked up on the Hub
    with pytest.raises(UserError, match="model folder does not exist"):
        from soarbench.models.sd3 import resolve_model_folder

        resolve_model_folder("/no/such/folder")
