"""Local reward weights: manifest, checked lookup, resumable hash-checked download, safe checkpoint loading."""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.metrics import weights as w

torch.set_num_threads(1)

HEAD = b"head weights " * 4000  # 52 kB
CONFIG = b'{"model": "tiny"}'
BLOB = bytes(range(256)) * 600  # 153.6 kB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Server:
    """A loopback HTTP server for a few files with Range support and scripted misbehaviour."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.truncate_next = 0  # send only this many bytes of the next response, then hang up
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                data = server.files.get(self.path)
                server.requests.append((self.path, self.headers.get("Range")))
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                ranged = self.headers.get("Range")
                if ranged and not server.ignore_range:
                    start = int(ranged.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.truncate_next:
                    body, server.truncate_next = body[:server.truncate_next], 0
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_manifest(path: Path, url: str, head_sha: str | None = None) -> Path:
    head_sha = head_sha or sha(HEAD)
    path.write_text(f'''
[weights.head]
file = "heads/head.pth"
url = "{url}/head.pth"
size = {len(HEAD)}
sha256 = "{head_sha}"
source = "{url}"

[weights.tiny-folder]
folder = "tiny"
base_url = "{url}/tiny"
files = [
  {{ name = "config.json", sha256 = "{sha(CONFIG)}" }},
  {{ name = "blob.bin" }},
]
''', encoding="utf-8")
    return path


@pytest.fixture()
def manifest_file(tmp_path):
    return write_manifest(tmp_path / "manifest.toml", "http://127.0.0.1:9")


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "ckpts"
    r.mkdir()
    return r


def put(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------ manifest


def test_project_manifest_parses_and_pins_the_aesthetic_head_of_the_spec():
    manifest = w.load_manifest()
    assert {"clip-vit-large-patch14", "pickscore-v1", "clip-vit-h-14-processor", "hpsv2.1",
            "aesthetic-mlp"} <= set(manifest.names())
    head = manifest.get("aesthetic-mlp").files[0]
    assert head.path == "sac+logos+ava1-l14-linearMSE.pth" and head.size == 3_714_759
    assert head.sha256 == "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
    clip = manifest.get("clip-vit-large-patch14")
    assert clip.is_folder and "clip-vit-large-patch14/model.safetensors" in {f.path for f in clip.files}
    assert all(f.url.startswith("https://") for e in manifest.entries.values() for f in e.files)


@pytest.mark.parametrize("body, message", [
    ('[weights.x]\nfile = "a"\nfolder = "b"\nurl = "u"\n', "exactly one of"),
    ('[weights.x]\nfile = "../escape"\nurl = "u"\n', "relative path"),
    ('[weights.x]\nfile = "a"\nurl = "u"\nsha256 = "abc"\n', "64 hex"),
    ('[weights.x]\nfile = "a"\n', "`url` is required"),
    ('[weights.x]\nfolder = "f"\nfiles = [{ name = "a" }]\n', "no `url`"),
    ('[weights.x]\nfile = "a"\nurl = "u"\nsha = "typo"\n', "unknown keys"),
    ('[other]\n', "[weights.NAME]"),
])
def test_bad_manifests_are_one_line_errors(tmp_path, body, message):
    path = tmp_path / "m.toml"
    path.write_text(body)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        w.load_manifest(path)


def test_unknown_name_suggests_the_nearest(manifest_file, root):
    with pytest.raises(UserError, match="did you mean 'head'"):
        w.resolve_weights("haed", root, manifest_file)


# --------------------------------------------------------------------------------------------------- lookup


def test_missing_file_names_the_file_and_the_command(manifest_file, root):
    with pytest.raises(UserError) as e:
        w.resolve_weights("head", root, manifest_file)
    msg = str(e.value)
    assert "\n" not in msg and str(root / "heads/head.pth") in msg and "soarbench ckpts download head" in msg


def test_wrong_size_and_wrong_hash_are_refused(manifest_file, root):
    put(root, "heads/head.pth", HEAD[:-1])
    with pytest.raises(UserError, match=r"bytes, expected .*soarbench ckpts download head"):
        w.resolve_weights("head", root, manifest_file)
    put(root, "heads/head.pth", HEAD[:-1] + b"!")  # right size, wrong content
    with pytest.raises(UserError, match=r"sha256 .* expected .*soarbench ckpts download head"):
        w.resolve_weights("head", root, manifest_file)


def test_good_files_resolve_and_unpinned_ones_are_recorded(manifest_file, root):
    put(root, "heads/head.pth", HEAD)
    assert w.resolve_weights("head", root, manifest_file) == root / "heads/head.pth"
    put(root, "tiny/config.json", CONFIG)
    put(root, "tiny/blob.bin", BLOB)  # no pin: accepted, its hash recorded for provenance
    assert w.resolve_weights("tiny-folder", root, manifest_file) == root / "tiny"
    stamps = (root / w.STAMPS_FILE).read_text()
    assert sha(BLOB) in stamps and sha(HEAD) in stamps
    first = w.fingerprint("tiny-folder", root, manifest_file)
    put(root, "tiny/blob.bin", BLOB[::-1])  # a different unpinned file: a different fingerprint
    assert w.fingerprint("tiny-folder", root, manifest_file) != first


def test_a_folder_with_a_missing_file_is_refused(manifest_file, root):
    put(root, "tiny/config.json", CONFIG)
    with pytest.raises(UserError, match="tiny/blob.bin is missing.*download tiny-folder"):
        w.resolve_weights("tiny-folder", root, manifest_file)


def test_root_from_argument_then_environment_then_repo(monkeypatch, tmp_path):
    monkeypatch.delenv(w.ENV_ROOT, raising=False)
    assert w.weights_root() == w.REPO_ROOT / "reward_ckpts"
    monkeypatch.setenv(w.ENV_ROOT, str(tmp_path / "env"))
    assert w.weights_root() == tmp_path / "env"
    assert w.weights_root(tmp_path / "arg") == tmp_path / "arg"


def test_environment_root_is_used_by_resolve(monkeypatch, manifest_file, root):
    put(root, "heads/head.pth", HEAD)
    monkeypatch.setenv(w.ENV_ROOT, str(root))
    assert w.resolve_weights("head", manifest=manifest_file) == root / "heads/head.pth"


def test_verify_rehashes_everything(manifest_file, root):
    put(root, "heads/head.pth", HEAD)
    put(root, "tiny/config.json", b"{}")
    checks = {c.file: c for c in w.verify(root=root, manifest=manifest_file)}
    assert checks["heads/head.pth"].status == "ok" and checks["heads/head.pth"].sha256 == sha(HEAD)
    assert checks["tiny/config.json"].status == "wrong hash"  # pinned by hash only
    assert checks["tiny/blob.bin"].status == "missing" and not checks["tiny/blob.bin"].ok
    # a stale cache entry (same size and mtime, different content) is caught by verify, which always rehashes
    path = root / "heads/head.pth"
    stat = path.stat()
    path.write_bytes(HEAD[:-1] + b"!")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert w.resolve_weights("head", root, manifest_file)  # the cache trusts (size, mtime)
    assert w.verify(["head"], root, manifest_file)[0].status == "wrong hash"


def test_locate_takes_a_name_or_a_path(manifest_file, root, tmp_path):
    put(root, "heads/head.pth", HEAD)
    path, label = w.locate("head", root, manifest_file)
    assert path == root / "heads/head.pth" and label.startswith("head@") and len(label) == len("head@") + 12
    own = put(tmp_path, "mine/head.pth", b"x")
    assert w.locate(str(own), root, manifest_file) == (own, f"local:{own}")
    with pytest.raises(UserError, match="no such file"):
        w.locate(str(tmp_path / "nope/x.pth"), root, manifest_file)
    with pytest.raises(UserError, match="unknown weights 'nope'"):
        w.locate("nope", root, manifest_file)


# ------------------------------------------------------------------------------------------------- download


@pytest.fixture()
def server():
    with Server({"/head.pth": HEAD, "/tiny/config.json": CONFIG, "/tiny/blob.bin": BLOB}) as s:
        yield s


def test_download_fetches_checks_and_renames(tmp_path, root, server):
    manifest = write_manifest(tmp_path / "m.toml", server.url)
    seen = []
    path = w.download("head", root, manifest, progress=lambda f, done, total: seen.append((f, done, total)))
    assert path.read_bytes() == HEAD and not list(path.parent.glob(".*.part"))
    assert seen[-1] == ("heads/head.pth", len(HEAD), len(HEAD))
    assert w.resolve_weights("head", root, manifest) == path
    n = len(server.requests)
    w.download("head", root, manifest)  # already there and good: no request
    assert len(server.requests) == n


def test_download_resumes_an_interrupted_transfer_with_range(tmp_path, root, server):
    manifest = write_manifest(tmp_path / "m.toml", server.url)
    server.truncate_next = 20_000
    with pytest.raises(UserError, match="run the command again"):
        w.download("head", root, manifest)
    part = root / "heads" / ".head.pth.part"
    assert part.exists() and 0 < part.stat().st_size < len(HEAD)
    have = part.stat().st_size
    w.download("head", root, manifest)
    assert server.requests[-1] == ("/head.pth", f"bytes={have}-")
    assert (root / "heads/head.pth").read_bytes() == HEAD and not part.exists()


def test_download_restarts_when_the_server_ignores_range(tmp_path, root, server):
    manifest = write_manifest(tmp_path / "m.toml", server.url)
    put(root, "heads/.head.pth.part", HEAD[:1000])
    server.ignore_range = True
    w.download("head", root, manifest)
    assert (root / "heads/head.pth").read_bytes() == HEAD


def test_a_complete_part_is_not_fetched_again(tmp_path, root, server):
    manifest = write_manifest(tmp_path / "m.toml", server.url)
    put(root, "heads/.head.pth.part", HEAD)
    w.download("head", root, manifest)
    assert server.requests == [] and (root / "heads/head.pth").read_bytes() == HEAD


def test_wrong_content_is_removed_and_reported(tmp_path, root, server):
    manifest = write_manifest(tmp_path / "m.toml", server.url, head_sha=sha(b"something else"))
    with pytest.raises(UserError, match="expected sha256.*partial file was removed"):
        w.download("head", root, manifest)
    assert not (root / "heads/head.pth").exists() and not (root / "heads/.head.pth.part").exists()


def test_download_of_a_folder_entry_and_http_errors(tmp_path, root, server):
    manifest = write_manifest(tmp_path / "m.toml", server.url)
    folder = w.download("tiny-folder", root, manifest)
    assert (folder / "config.json").read_bytes() == CONFIG and (folder / "blob.bin").read_bytes() == BLOB
    del server.files["/head.pth"]
    with pytest.raises(UserError, match="HTTP 404"):
        w.download("head", root, manifest)


def _closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ckpts_download_offline_says_retry_and_where_to_place_each_file(tmp_path, root, monkeypatch, cli):
    url = f"http://127.0.0.1:{_closed_port()}"
    manifest = write_manifest(tmp_path / "m.toml", url)
    with pytest.raises(UserError) as e:
        w.download("head", root, manifest, timeout=5)
    message = str(e.value)
    assert "\n" not in message and message.startswith(
        f"download of heads/head.pth from {url}/head.pth failed: the network or the server is unreachable (")
    assert message.endswith(f"; run the command again to retry, or place the file by hand: download {url}/head.pth "
                            f"elsewhere and copy it to {root / 'heads' / 'head.pth'} (sha256 {sha(HEAD)})")
    # the command line: the same line after `error: `, exit 2; an unpinned file says how it is checked instead
    monkeypatch.setattr(w, "DEFAULT_MANIFEST", manifest)
    monkeypatch.setenv(w.ENV_ROOT, str(root))
    put(root, "tiny/config.json", CONFIG)
    code, out, err = cli("ckpts", "download", "tiny-folder")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: download of tiny/blob.bin from {url}/tiny/blob.bin failed: the network or the "
                          "server is unreachable (")
    assert err.endswith(f"or place the file by hand: download {url}/tiny/blob.bin elsewhere and copy it to "
                        f"{root / 'tiny' / 'blob.bin'} (not pinned: its sha256 is recorded on first use)")


# ------------------------------------------------------------------------------------- Hugging Face Hub files
HUB_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture()
def hub_offline(tmp_path, monkeypatch):
    """An offline huggingface_hub over a cache laid out as the Hub lays it: soarbench-test/heads holds head.pth at
    HUB_COMMIT, and different bytes at the newer commit its main branch points to."""
    from huggingface_hub import constants
    from test_hub import hub_cache

    cache = tmp_path / "hub"
    hub_cache(cache, "soarbench-test/heads", {"head.pth": b"a newer head"}, commit="f" * 40)
    hub_cache(cache, "soarbench-test/heads", {"head.pth": HEAD}, commit=HUB_COMMIT)
    (cache / "models--soarbench-test--heads" / "refs" / "main").write_text("f" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    manifest = tmp_path / "hub.toml"
    manifest.write_text(f"""
[weights.head]
file = "heads/head.pth"
repo = "soarbench-test/heads"
revision = "{HUB_COMMIT}"
sha256 = "{sha(HEAD)}"

[weights.absent]
folder = "absent"
repo = "soarbench-test/absent"
revision = "{HUB_COMMIT}"
files = [{{ name = "config.json" }}]
""", encoding="utf-8")
    return cache, manifest


def test_hub_weights_come_from_the_cache_at_the_pinned_revision(hub_offline, root):
    cache, manifest = hub_offline
    entry = w.load_manifest(manifest).get("head")
    assert entry.files[0].hub == ("soarbench-test/heads", HUB_COMMIT, "head.pth")
    assert entry.files[0].url == f"https://huggingface.co/soarbench-test/heads/resolve/{HUB_COMMIT}/head.pth"
    path = w.download("head", root, manifest)
    assert path == root / "heads" / "head.pth" and path.read_bytes() == HEAD  # the pinned commit, not main's
    # a link into the cache: the weights are stored once, in huggingface_hub's cache
    assert path.is_symlink() and path.resolve().parent == cache / "models--soarbench-test--heads" / "blobs"
    assert w.resolve_weights("head", root, manifest) == path
    assert [c.status for c in w.verify(["head"], root, manifest)] == ["ok"]


def test_hub_weights_not_in_the_cache_offline_are_one_line(hub_offline, root):
    _, manifest = hub_offline
    with pytest.raises(UserError) as e:
        w.download("absent", root, manifest)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"config.json of soarbench-test/absent@{HUB_COMMIT} is not in the local Hugging Face "
                              "cache (")
    assert f"fetch it with `hf download soarbench-test/absent config.json --revision {HUB_COMMIT}`" in message
    assert message.endswith(f"(weights 'absent'), or place the file by hand: download https://huggingface.co/"
                            f"soarbench-test/absent/resolve/{HUB_COMMIT}/config.json elsewhere and copy it to "
                            f"{root / 'absent' / 'config.json'} (not pinned: its sha256 is recorded on first use)")
    assert not (root / "absent").exists() or not list((root / "absent").iterdir())


def test_project_manifest_fetches_hub_files_at_pinned_commits():
    manifest = w.load_manifest()
    for name in ("clip-vit-large-patch14", "pickscore-v1", "clip-vit-h-14-processor", "hpsv2.1", "imagereward-v1",
                 "bert-base-uncased-tokenizer"):
        for f in manifest.get(name).files:
            assert f.hub is not None and re.fullmatch(r"[0-9a-f]{40}", f.hub[1]), (name, f.hub)
    # on no Hub repository: raw URLs
    assert manifest.get("aesthetic-mlp").files[0].hub is None and manifest.get("mask2former-mmdet").files[0].hub is None


# ---------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_load_weights_only_and_pickles_need_explicit_trust(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    assert torch.equal(w.load_checkpoint(plain)["state_dict"]["w"], torch.ones(2))

    rich = tmp_path / "rich.pt"
    torch.save({"args": argparse.Namespace(lr=1.0), "w": torch.ones(1)}, rich)
    with pytest.raises(UserError, match="trust_pickle=True"):
        w.load_checkpoint(rich)
    assert w.load_checkpoint(rich, trust_pickle=True)["args"].lr == 1.0

    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(st))
    assert torch.equal(w.load_checkpoint(st)["w"], torch.zeros(3))
    with pytest.raises(UserError, match="no such checkpoint"):
        w.load_checkpoint(tmp_path / "absent.pt")


def test_a_sha256_prefix_is_a_partial_pin(tmp_path):
    manifest = w.parse_manifest({"weights": {"det": {
        "file": "det-743b.pth", "url": "http://127.0.0.1:9/det.pth", "sha256_prefix": sha(HEAD)[:8].upper()}}})
    root = tmp_path / "root"
    put(root, "det-743b.pth", HEAD)
    check = w.verify(["det"], root, manifest)[0]
    assert (check.status, check.ok, check.sha256) == ("prefix ok", True, sha(HEAD))
    assert w.resolve_weights("det", root, manifest) == root / "det-743b.pth"
    put(root, "det-743b.pth", HEAD + b"!")
    assert w.verify(["det"], root, manifest)[0].status == "wrong hash"
    with pytest.raises(UserError, match=rf"expected {sha(HEAD)[:8]}\.\.\..*soarbench ckpts download det"):
        w.resolve_weights("det", root, manifest)
    for bad in ("743b", "xyz12345", sha(HEAD)):
        with pytest.raises(UserError, match="sha256_prefix must be 8 to 63 hex digits"):
            w.parse_manifest({"weights": {"d": {"file": "d.pth", "url": "http://x/d", "sha256_prefix": bad}}})


def test_download_refuses_a_file_whose_hash_does_not_start_with_the_prefix(tmp_path):
    with Server({"/det.pth": HEAD}) as server:
        for prefix, ok in ((sha(HEAD)[:8], True), ("00000000", False)):
            manifest = w.parse_manifest({"weights": {"det": {
                "file": "det.pth", "url": f"{server.url}/det.pth", "sha256_prefix": prefix}}})
            root = tmp_path / prefix
            if ok:
                assert w.download("det", root, manifest).read_bytes() == HEAD
            else:
                with pytest.raises(UserError, match="expected sha256 00000000\\.\\.\\."):
                    w.download("det", root, manifest)
                assert not any(root.rglob("*det*"))  # neither the file nor its part stays
