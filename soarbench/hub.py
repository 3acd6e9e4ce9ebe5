"""Hugging Face Hub ids for models and weights, resolved through huggingface_hub and its local cache.

`--model stabilityai/stable-diffusion-3.5-medium` (or `owner/name@REVISION`, a commit hash, tag or branch) names a
Hub repository when no such local path exists. It is fetched with `huggingface_hub.snapshot_download`, so
everything huggingface_hub honours applies (https://huggingface.co/docs/huggingface_hub/package_reference/
environment_variables): the cache (HF_HOME, HF_HUB_CACHE) is reused, HF_ENDPOINT points at a mirror, HF_TOKEN
(or `hf auth login`) opens gated repositories, and HF_HUB_OFFLINE=1 uses the cache only. Only the pipeline's own
components are fetched (the folders model_index.json names), not the single-file checkpoints some repositories
carry beside them.

Offline, an id that is not in the cache is one line naming the id, the cache and the command that fetches it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from soarbench.errors import UserError

# owner/name[@revision]: what the Hub accepts as a repository id (letters, digits, '-', '_', '.')
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<rev>[A-Za-z0-9_./-]+))?$")
_SKIP = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data"]  # safetensors only
_EXTRA_FILES = ["model_index.json", "SHA256SUMS", "soarbench_model.json"]


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `text` has the form owner/name[@revision], else None."""
    m = _HUB_ID.match(str(text))
    if m is None or str(text).startswith((".", "/")):
        return None
    return m.group("repo"), m.group("rev")


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _fetch_command(repo: str, revision: str | None, files: str = "") -> str:
    return f"hf download {repo}{f' --revision {revision}' if revision else ''}{files}"


def hub_error(e: BaseException, subject: str, revision: str | None, fetch: str) -> UserError | None:
    """One UserError line for huggingface_hub's failures (`subject` names what was asked for), or None for an
    error that is not the Hub's."""
    from huggingface_hub import errors

    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return UserError(f"{subject} is not in the local Hugging Face cache ({cache_dir()}) and the Hub cannot be "
                         f"reached (HF_HUB_OFFLINE=1 or no network); run the command again where the Hub is "
                         f"reachable, or fetch it with `{fetch}` (same HF_HOME / HF_HUB_CACHE)")
    if isinstance(e, errors.GatedRepoError):
        return UserError(f"{subject} is gated on the Hub: accept its license on the repository's page, then log in "
                         "(`hf auth login`) or set HF_TOKEN")
    if isinstance(e, errors.RepositoryNotFoundError):
        return UserError(f"{subject}: no such repository on the Hub (a private one needs HF_TOKEN or "
                         "`hf auth login`)")
    if isinstance(e, errors.RevisionNotFoundError):
        return UserError(f"{subject}: the repository has no revision '{revision}' (give a commit hash, tag or "
                         "branch)")
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return UserError(f"{subject}: not in the repository ({str(e).splitlines()[0]})")
    if isinstance(e, (errors.HfHubHTTPError, OSError)):
        return UserError(f"{subject}: the Hub could not be reached ({str(e).splitlines()[0] or type(e).__name__});"
                         f" run the command again to retry, or fetch it with `{fetch}`")
    return None


def snapshot_model(text: str) -> Path:
    """The local snapshot folder of a pipeline named by a Hub id (downloaded into the cache when missing)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo, revision = parse_hub_id(text)
    fetch = _fetch_command(repo, revision)
    try:
        index = json.loads(Path(hf_hub_download(repo, "model_index.json", revision=revision)).read_text())
        components = [name for name, value in index.items()
                      if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None]
        folder = snapshot_download(repo, revision=revision, ignore_patterns=_SKIP,
                                   allow_patterns=_EXTRA_FILES + [f"{name}/*" for name in components])
    except Exception as e:  # noqa: BLE001  (huggingface_hub's own errors become one line each)
        at = f"{repo}@{revision}" if revision else repo
        error = hub_error(e, f"model {at} (no such local path; as a Hub id)", revision, fetch)
        if error is None:
            raise
        raise error from None
    return Path(folder)


def local_model_path(path: str | Path) -> Path:
    """`path` itself when it exists or is not a Hub id; the cached snapshot of the Hub repository otherwise."""
    if Path(path).exists() or parse_hub_id(str(path)) is None:
        return Path(path)
    return snapshot_model(str(path))
