"""Local weights of the reward and metric models: a manifest, hash-checked lookup, resumable download.

`reward_ckpts/manifest.toml` lists every weight set by name. An entry is one file (`file = ...`) or a folder of
files (`folder = ...`, e.g. a transformers model folder), each file with its public URL and, where known, its
size and sha256. An entry published on the Hugging Face Hub names `repo` and a pinned `revision` (a commit) and is
fetched with huggingface_hub.hf_hub_download, so its cache (HF_HOME / HF_HUB_CACHE), HF_ENDPOINT (a mirror),
HF_TOKEN and HF_HUB_OFFLINE apply; the file under the weights root is then a link to the cached file:

    path = resolve_weights("clip-vit-large-patch14")   # <root>/clip-vit-large-patch14, checked
    download("aesthetic-mlp")                          # resumable (HTTP Range), hash-checked, atomic rename
    verify()                                           # one FileCheck per file of every entry, full rehash
    state = load_checkpoint(path)                      # torch.load(weights_only=True) unless trust_pickle

The root is, in order: an explicit `root` argument, the SOARBENCH_REWARD_CKPTS environment variable,
<repo>/reward_ckpts. A missing file or one whose size or sha256 differs from its pin is a UserError of one line
that names the file and the command that fixes it (`soarbench ckpts download NAME`).

A file without a pinned sha256 is accepted when present; its hash is still computed once and recorded, so a
metric's version can name the exact weights it ran. Hashing multi-GB files on every run would be slow, so the
digest is cached in <root>/.verified.json keyed by (size, mtime); `verify()` always rehashes.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import pickle
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from soarbench.errors import UserError, did_you_mean
from soarbench.io import atomic_write_json, sha256_file

ENV_ROOT = "SOARBENCH_REWARD_CKPTS"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO_ROOT / "reward_ckpts"
DEFAULT_MANIFEST = DEFAULT_ROOT / "manifest.toml"
STAMPS_FILE = ".verified.json"
_CHUNK = 1 << 20

Progress = Callable[[str, int, "int | None"], None]  # (file relative to the root, bytes so far, total or None)


@dataclass(frozen=True)
class WeightFile:
    path: str  # relative to the weights root, "/"-separated
    url: str
    size: int | None = None
    sha256: str | None = None
    # The leading hex digits of the sha256 where only those are published, as in OpenMMLab's checkpoint names
    # (`..._20220504_001756-743b7d99.pth`: the first 8 digits of the file's sha256). A partial pin.
    sha256_prefix: str | None = None
    # (repository, pinned revision, path in the repository) for files published on the Hugging Face Hub: fetched
    # through huggingface_hub (its cache, HF_ENDPOINT, HF_TOKEN); None for other sources (a raw URL)
    hub: tuple[str, str, str] | None = None

    @property
    def pinned(self) -> bool:
        return self.sha256 is not None

    def hash_matches(self, digest: str) -> bool:
        if self.sha256 is not None:
            return digest == self.sha256
        return self.sha256_prefix is None or digest.startswith(self.sha256_prefix)

    def expected_hash(self) -> str:
        return self.sha256 or f"{self.sha256_prefix}..."


@dataclass(frozen=True)
class WeightsEntry:
    name: str
    path: str  # the file, or the folder, relative to the weights root
    is_folder: bool
    source: str
    description: str
    files: tuple[WeightFile, ...]

    def command(self) -> str:
        return f"soarbench ckpts download {self.name}"


@dataclass(frozen=True)
class FileCheck:
    """The state of one manifest file on disk."""
    entry: str
    file: str  # relative to the root
    status: str  # "ok" | "prefix ok" | "unpinned" | "missing" | "wrong size" | "wrong hash"
    sha256: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "prefix ok", "unpinned")


class Manifest:
    def __init__(self, entries: Mapping[str, WeightsEntry], path: Path | None = None):
        self.entries = dict(entries)
        self.path = path

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def get(self, name: str) -> WeightsEntry:
        if name not in self.entries:
            raise did_you_mean("weights", name, self.entries)
        return self.entries[name]


# ---------------------------------------------------------------------------------------------------- manifest


def _checked_hex(value: Any, where: str) -> str | None:
    if value in (None, ""):
        return None
    text = str(value).lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise UserError(f"{where}: sha256 must be 64 hex digits, got {value!r}")
    return text


def _checked_prefix(value: Any, where: str) -> str | None:
    if value in (None, ""):
        return None
    text = str(value).lower()
    if not 8 <= len(text) < 64 or any(c not in "0123456789abcdef" for c in text):
        raise UserError(f"{where}: sha256_prefix must be 8 to 63 hex digits, got {value!r}")
    return text


def _checked_size(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: size must be a positive integer (bytes), got {value!r}")
    return value


def _checked_relpath(value: Any, where: str) -> str:
    text = str(value or "").strip().strip("/")
    parts = text.split("/")
    if not text or any(p in ("", ".", "..") for p in parts) or Path(text).is_absolute():
        raise UserError(f"{where}: a relative path inside the weights root is required, got {value!r}")
    return text


def parse_manifest(data: Mapping[str, Any], where: str = "manifest") -> Manifest:
    """Entries from the parsed TOML: a [weights.NAME] table each, with `file` or `folder`."""
    tables = data.get("weights")
    if not isinstance(tables, Mapping) or not tables:
        raise UserError(f"{where}: expected [weights.NAME] tables")
    entries = {}
    for name, t in tables.items():
        at = f"{where}: [weights.{name}]"
        if not isinstance(t, Mapping):
            raise UserError(f"{at} must be a table")
        unknown = set(t) - {"file", "folder", "url", "base_url", "size", "sha256", "sha256_prefix", "source",
                            "description", "files", "repo", "revision", "repo_file"}
        if unknown:
            raise UserError(f"{at}: unknown keys {sorted(unknown)}")
        repo, revision = t.get("repo"), t.get("revision")
        if (repo is None) != (revision is None) or (repo is not None and (
                not isinstance(repo, str) or not isinstance(revision, str) or "/" not in repo or not revision)):
            raise UserError(f"{at}: a Hub entry needs both `repo = \"owner/name\"` and `revision` (a commit hash)")

        def hub(name: str):
            return (repo, revision, name) if repo else None

        def hub_url(name: str) -> str:
            return f"https://huggingface.co/{repo}/resolve/{revision}/{name}" if repo else ""
        if ("file" in t) == ("folder" in t):
            raise UserError(f"{at}: give exactly one of `file` or `folder`")
        if "file" in t:
            rel = _checked_relpath(t["file"], at)
            in_repo = _checked_relpath(t.get("repo_file") or rel.rsplit("/", 1)[-1], at)
            if not t.get("url") and not repo:
                raise UserError(f"{at}: `url` is required (or `repo` and `revision` for a Hub file)")
            files = (WeightFile(rel, str(t.get("url") or hub_url(in_repo)), _checked_size(t.get("size"), at),
                                _checked_hex(t.get("sha256"), at), _checked_prefix(t.get("sha256_prefix"), at),
                                hub(in_repo)),)
        else:
            rel = _checked_relpath(t["folder"], at)
            base = str(t.get("base_url", ""))
            listed = t.get("files")
            if not isinstance(listed, list) or not listed:
                raise UserError(f"{at}: a folder entry needs `files = [{{ name = ... }}, ...]`")
            files = []
            for item in listed:
                if not isinstance(item, Mapping) or "name" not in item:
                    raise UserError(f"{at}: each of `files` needs a `name`")
                inner = _checked_relpath(item["name"], at)
                url = str(item.get("url") or (base.rstrip("/") + "/" + inner if base else hub_url(inner)))
                if not url:
                    raise UserError(f"{at}: file {inner!r} has no `url` and the entry no `base_url` or `repo`")
                files.append(WeightFile(f"{rel}/{inner}", url, _checked_size(item.get("size"), f"{at} {inner}"),
                                        _checked_hex(item.get("sha256"), f"{at} {inner}"),
                                        _checked_prefix(item.get("sha256_prefix"), f"{at} {inner}"), hub(inner)))
            files = tuple(files)
        entries[name] = WeightsEntry(name=name, path=rel, is_folder="folder" in t, source=str(t.get("source", "")),
                                     description=str(t.get("description", "")), files=files)
    return Manifest(entries)


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    path = Path(path) if path is not None else DEFAULT_MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: weights manifest not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    manifest = parse_manifest(data, where=str(path))
    manifest.path = path
    return manifest


def _manifest(manifest: Manifest | str | os.PathLike | None) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)


def weights_root(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds the weights: `root`, else $SOARBENCH_REWARD_CKPTS, else <repo>/reward_ckpts."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_ROOT)
    return Path(env).expanduser() if env else DEFAULT_ROOT


def names(manifest: Manifest | str | os.PathLike | None = None) -> list[str]:
    return _manifest(manifest).names()


# ------------------------------------------------------------------------------------------- hashes, cached


class _Stamps:
    """sha256 of files under the root, cached by (size, mtime_ns) in <root>/.verified.json."""

    def __init__(self, root: Path):
        self.path = root / STAMPS_FILE
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def digest(self, rel: str, path: Path, rehash: bool = False) -> str:
        st = path.stat()
        stamp = self.data.get(rel)
        if (not rehash and isinstance(stamp, dict) and stamp.get("size") == st.st_size
                and stamp.get("mtime_ns") == st.st_mtime_ns and isinstance(stamp.get("sha256"), str)):
            return stamp["sha256"]
        digest = sha256_file(path)
        self.record(rel, path, digest)
        return digest

    def record(self, rel: str, path: Path, digest: str) -> None:
        st = path.stat()
        self.data[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            atomic_write_json(self.path, dict(sorted(self.data.items())))
            self.dirty = False
        except OSError:
            pass  # a read-only weights folder: the cache is an optimisation, checks still ran


def _check(entry: WeightsEntry, f: WeightFile, root: Path, stamps: _Stamps, rehash: bool) -> FileCheck:
    path = root / f.path
    if not path.is_file():
        return FileCheck(entry.name, f.path, "missing", detail=f"{path} is missing")
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        return FileCheck(entry.name, f.path, "wrong size",
                         detail=f"{path} has {size} bytes, expected {f.size}")
    digest = stamps.digest(f.path, path, rehash=rehash)
    if not f.hash_matches(digest):
        return FileCheck(entry.name, f.path, "wrong hash", digest,
                         detail=f"{path} has sha256 {digest[:16]}..., expected {f.expected_hash()[:16]}...")
    status = "ok" if f.pinned else "prefix ok" if f.sha256_prefix else "unpinned"
    return FileCheck(entry.name, f.path, status, digest)


# ------------------------------------------------------------------------------------------------- lookup


def missing_files(name: str, root: str | os.PathLike | None = None,
                  manifest: Manifest | str | os.PathLike | None = None) -> list[str]:
    """The entry's files that are not on disk (no hashing: a quick presence check for `metrics list`)."""
    base = weights_root(root)
    return [f.path for f in _manifest(manifest).get(name).files if not (base / f.path).is_file()]


def resolve_weights(name: str, root: str | os.PathLike | None = None,
                    manifest: Manifest | str | os.PathLike | None = None) -> Path:
    """The local path of a manifest entry (its file or folder), after checking every file against its pins."""
    entry = _manifest(manifest).get(name)
    base = weights_root(root)
    stamps = _Stamps(base)
    try:
        for f in entry.files:
            check = _check(entry, f, base, stamps, rehash=False)
            if not check.ok:
                raise UserError(f"{check.detail} (weights '{name}'); fix: {entry.command()}")
    finally:
        stamps.save()
    return base / entry.path


def fingerprint(name: str, root: str | os.PathLike | None = None,
                manifest: Manifest | str | os.PathLike | None = None) -> str:
    """12 hex digits naming the exact files of an entry (sha256 over each file's path and sha256)."""
    entry = _manifest(manifest).get(name)
    base = weights_root(root)
    stamps = _Stamps(base)
    h = hashlib.sha256()
    try:
        for f in sorted(entry.files, key=lambda f: f.path):
            path = base / f.path
            if not path.is_file():
                raise UserError(f"{path} is missing (weights '{name}'); fix: {entry.command()}")
            h.update(f"{f.path}\0{stamps.digest(f.path, path)}\n".encode())
    finally:
        stamps.save()
    return h.hexdigest()[:12]


def locate(spec: str | os.PathLike, root: str | os.PathLike | None = None,
           manifest: Manifest | str | os.PathLike | None = None) -> tuple[Path, str]:
    """(path, label) for a manifest name (checked; label "NAME@FINGERPRINT") or a path (label "local:PATH").

    Metrics take either: a name for the published weights, a path for one's own (a fine-tune, a test model).
    A string with a path separator is a path; otherwise a manifest name wins over a same-named local path.
    """
    text = os.fspath(spec)
    if not isinstance(spec, os.PathLike) and "/" not in text and os.sep not in text:
        man = _manifest(manifest)
        if text in man:
            return resolve_weights(text, root, man), f"{text}@{fingerprint(text, root, man)}"
        if not Path(text).exists():
            raise UserError(f"unknown weights '{text}': give a name from {man.path or 'the manifest'} "
                            f"({', '.join(man.names())}) or a path")
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    return path, f"local:{path}"


def verify(which: Iterable[str] | None = None, root: str | os.PathLike | None = None,
           manifest: Manifest | str | os.PathLike | None = None) -> list[FileCheck]:
    """Every file of the named entries (default: all), each fully rehashed."""
    man = _manifest(manifest)
    base = weights_root(root)
    stamps = _Stamps(base)
    checks = []
    try:
        for name in (list(which) if which is not None else man.names()):
            entry = man.get(name)
            checks.extend(_check(entry, f, base, stamps, rehash=True) for f in entry.files)
    finally:
        stamps.save()
    return checks


# ---------------------------------------------------------------------------------------------- download


def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "soarbench"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)


def _resumed_at(response, offset: int) -> bool:
    """True when the server answered the Range request with the bytes from `offset` on."""
    if not offset or getattr(response, "status", None) != 206:
        return False
    content_range = response.headers.get("Content-Range", "")
    return content_range.startswith(f"bytes {offset}-")


def by_hand(f: WeightFile, dest: Path) -> str:
    """Where to put a weight file without soarbench's download (an offline machine), and how it is checked."""
    check = (f"sha256 {f.sha256}" if f.sha256 else f"sha256 starting {f.sha256_prefix}" if f.sha256_prefix
             else "not pinned: its sha256 is recorded on first use")
    return f"or place the file by hand: download {f.url} elsewhere and copy it to {dest} ({check})"


def _fetch(f: WeightFile, part: Path, timeout: float, progress: Progress | None) -> None:
    """Bring `part` to the full content of f.url, continuing from whatever part already holds."""
    have = part.stat().st_size if part.exists() else 0
    if f.size is not None and have > f.size:
        part.unlink()
        have = 0
    if f.size is not None and have == f.size:
        return
    try:
        response = _open(f.url, have, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            return  # nothing past what we hold: the part is complete (its hash decides)
        raise UserError(f"download of {f.path} from {f.url} failed: HTTP {e.code} {e.reason}; "
                        f"{by_hand(f, part.parent / Path(f.path).name)}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"download of {f.path} from {f.url} failed: the network or the server is unreachable "
                        f"({reason}); run the command again to retry, "
                        f"{by_hand(f, part.parent / Path(f.path).name)}") from None
    with response:
        if have and not _resumed_at(response, have):
            have = 0  # the server sent the whole file: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else f.size
        done = have
        try:
            with open(part, "ab" if have else "wb") as out:
                while block := response.read(_CHUNK):
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(f.path, done, total)
                out.flush()
                os.fsync(out.fileno())
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise UserError(f"download of {f.path} interrupted after {done} bytes ({e}); run the command again "
                            "to resume") from None
    if total is not None and done < total:
        raise UserError(f"download of {f.path} ended after {done} of {total} bytes; run the command again to "
                        "resume")


def _from_hub(f: WeightFile, name: str, part: Path, dest: Path) -> None:
    """Fetch a Hub file at its pinned revision into huggingface_hub's cache (reused when already there) and make
    `part` point at it: a symbolic link to the cached file, or a copy where links cannot be made."""
    import shutil

    from huggingface_hub import hf_hub_download

    from soarbench.hub import hub_error

    repo, revision, in_repo = f.hub
    try:
        cached = Path(hf_hub_download(repo, in_repo, revision=revision)).resolve()
    except Exception as e:  # noqa: BLE001  (huggingface_hub's own errors become one line each)
        error = hub_error(e, f"{in_repo} of {repo}@{revision}", revision,
                          f"hf download {repo} {in_repo} --revision {revision}")
        if error is None:
            raise
        raise UserError(f"{error} (weights '{name}'), {by_hand(f, dest)}") from None
    part.unlink(missing_ok=True)
    try:
        part.symlink_to(cached)
    except OSError:
        shutil.copyfile(cached, part)


def download(name: str, root: str | os.PathLike | None = None,
             manifest: Manifest | str | os.PathLike | None = None, progress: Progress | None = None,
             timeout: float = 60.0) -> Path:
    """Fetch every missing or wrong file of an entry; returns its local path.

    Each file is written to a hidden `.NAME.part` beside its destination and continued with an HTTP Range
    request when a part is already there (an interrupted download resumes). A complete part is checked against
    the pinned size and sha256, then renamed into place; a part with the wrong hash is deleted.
    """
    man = _manifest(manifest)
    entry = man.get(name)
    base = weights_root(root)
    stamps = _Stamps(base)
    try:
        for f in entry.files:
            if _check(entry, f, base, stamps, rehash=False).ok:
                continue
            dest = base / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f".{dest.name}.part")
            if f.hub is not None:
                _from_hub(f, name, part, dest)
            else:
                _fetch(f, part, timeout, progress)
            size, digest = part.stat().st_size, sha256_file(part)
            if (f.size is not None and size != f.size) or not f.hash_matches(digest):
                part.unlink()
                expected = (f"sha256 {f.expected_hash()}" if f.sha256 or f.sha256_prefix else f"{f.size} bytes")
                raise UserError(f"download of {f.path} from {f.url} gave {size} bytes with sha256 {digest}, "
                                f"expected {expected}; the partial file was removed, run the command again")
            os.replace(part, dest)
            stamps.record(f.path, dest, digest)
    finally:
        stamps.save()
    return base / entry.path


# --------------------------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | os.PathLike, trust_pickle: bool = False, map_location: str = "cpu") -> Any:
    """A checkpoint's content: safetensors directly, pickles through torch.load(weights_only=True).

    A pickle that needs more than tensors and plain containers can run arbitrary code when loaded; it is refused
    unless the caller passes trust_pickle=True for a file whose source it trusts.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: refusing to unpickle objects beyond tensors ({first[:160]}); pass "
                            "trust_pickle=True only if you trust where this file came from") from None
    return torch.load(path, map_location=map_location, weights_only=False)
