"""The papers' prompt sets: pinned sources, hash-checked copies, hash-checked downloads, and benchmark sizes."""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from soarbench import prompts
from soarbench.benchmarks import BENCHMARKS, build_benchmark
from soarbench.errors import UserError
from soarbench.metrics.registry import METRICS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/prompts is not present")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No $SOARBENCH_DATA and an empty home, so only the shared development copies are found."""
    monkeypatch.delenv(prompts.ENV_DATA, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture()
def serve(tmp_path):
    """serve(data) -> the URL of `data` on a local HTTP server (127.0.0.1, a free port)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()

    def publish(data: bytes, name: str = "file.txt") -> str:
        (root / name).write_bytes(data)
        return f"http://127.0.0.1:{server.server_address[1]}/{name}"

    yield publish
    server.shutdown()
    server.server_close()


# ------------------------------------------------------------------------------------------------ the table


@needs_shared
def test_table_is_the_pinned_sources_and_hashes():
    sums = dict(reversed(line.split()) for line in (SHARED / "SHA256SUMS").read_text().splitlines() if line)
    sources = {}
    for line in (SHARED / "SOURCES.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].endswith((".txt", ".jsonl")):
            sources[cells[0]] = tuple(cells[1:])
    for ps in prompts.PROMPT_SETS.values():
        assert sources[ps.file] == (ps.repository, ps.commit, ps.path)
        assert sums[ps.file] == ps.sha256
        assert ps.url == f"https://raw.githubusercontent.com/{ps.repository}/{ps.commit}/{ps.path}"
    assert {"geneval", "geneval_flowgrpo", "ocr", "pickscore", "drawbench"} <= set(prompts.names())


@needs_shared
@pytest.mark.parametrize("name", prompts.names())
def test_shared_copies_pass_their_pins(name):
    ps = prompts.get(name)
    assert prompts.prompt_file(name) == SHARED / ps.file
    loaded = prompts.load_metadata(name) if ps.kind == prompts.GENEVAL_KIND else prompts.load_prompts(name)
    assert len(loaded) == ps.rows


@needs_shared
def test_lookup_order_and_a_tampered_copy(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv(prompts.ENV_DATA, str(data))
    good = (SHARED / "flowgrpo_ocr_test.txt").read_bytes()
    cached = prompts.cache_dir() / "flowgrpo_ocr_test.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(good)
    assert prompts.prompt_file("ocr") == cached  # the cache before the shared folder
    tampered = data / "flowgrpo_ocr_test.txt"
    data.mkdir()
    tampered.write_bytes(good.replace(b"Spring Collection 2024", b"Spring Collection 2025", 1))
    actual = hashlib.sha256(tampered.read_bytes()).hexdigest()
    with pytest.raises(UserError) as e:  # $SOARBENCH_DATA first, and a bad copy is never skipped over
        prompts.load_prompts("ocr")
    assert str(e.value) == (f"{tampered} has sha256 {actual}, expected {prompts.get('ocr').sha256} "
                            "(prompt set 'ocr'); delete it and run `soarbench data fetch ocr`")


def test_a_missing_set_names_the_command(monkeypatch, tmp_path):
    monkeypatch.setattr(prompts, "DEV_DIR", tmp_path / "nowhere")
    with pytest.raises(UserError) as e:
        prompts.load_prompts("pickscore")
    ps = prompts.get("pickscore")
    where = tmp_path / "home" / ".cache" / "soarbench" / "prompts" / "flowgrpo_pickscore_test.txt"
    assert str(e.value) == ("prompt set 'pickscore' (flowgrpo_pickscore_test.txt) is not downloaded; "
                            "run `soarbench data fetch pickscore`, or place the file by hand: download "
                            f"https://raw.githubusercontent.com/yifan123/flow_grpo/{ps.commit}/dataset/pickscore/"
                            f"test.txt elsewhere and copy it to {where} (sha256 {ps.sha256})")
    with pytest.raises(UserError, match="did you mean 'drawbench'"):
        prompts.get("drawbenh")


# ------------------------------------------------------------------------------------------------ download


@needs_shared
def test_fetch_checks_the_hash_and_writes_atomically(tmp_path, serve):
    good = (SHARED / "diffusionnft_drawbench_test.txt").read_bytes()
    dest = tmp_path / "dest"
    path = prompts.fetch("drawbench", dest, url=serve(good))
    assert path == dest / "diffusionnft_drawbench_test.txt" and path.read_bytes() == good
    assert [p.name for p in dest.iterdir()] == [path.name]
    # a good copy is kept without asking the server again
    assert prompts.fetch("drawbench", dest, url="http://127.0.0.1:9/unreachable") == path


def test_fetch_refuses_a_wrong_file_and_leaves_nothing(tmp_path, serve):
    bad = b"a photo of a cat\n"
    url = serve(bad)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UserError) as e:
        prompts.fetch("drawbench", dest, url=url)
    assert str(e.value) == (f"diffusionnft_drawbench_test.txt downloaded from {url} has sha256 "
                            f"{hashlib.sha256(bad).hexdigest()}, expected {prompts.get('drawbench').sha256} "
                            "(prompt set 'drawbench'); nothing was written")
    assert list(dest.iterdir()) == []


def test_fetch_reports_http_errors(tmp_path, serve):
    url = serve(b"x").replace("file.txt", "missing.txt")
    with pytest.raises(UserError, match=r"download of flowgrpo_ocr_test.txt from .*missing.txt failed: HTTP 404"):
        prompts.fetch("ocr", tmp_path, url=url)


def _closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_fetch_offline_says_retry_and_where_to_place_the_file(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/test.txt"
    dest = tmp_path / "dest"
    with pytest.raises(UserError) as e:
        prompts.fetch("ocr", dest, url=url)
    ps = prompts.get("ocr")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"download of flowgrpo_ocr_test.txt from {url} failed: the network or the server is "
                              "unreachable (")
    assert message.endswith(f"; run the command again to retry, or place the file by hand: download {ps.url} "
                            f"elsewhere and copy it to {dest / 'flowgrpo_ocr_test.txt'} (sha256 {ps.sha256})")
    assert not dest.exists() or list(dest.iterdir()) == []


def test_cli_data_fetch_and_geneval_metadata_offline(tmp_path, monkeypatch, cli):
    """No network (urlopen refused): one line with the retry and the by-hand path, exit 2; geneval-metadata
    names the object list it needs and where it goes."""
    import urllib.error

    def refused(*args, **kwargs):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(prompts.urllib.request, "urlopen", refused)
    monkeypatch.setattr(prompts, "DEV_DIR", tmp_path / "nowhere")
    data = tmp_path / "data"
    monkeypatch.setenv(prompts.ENV_DATA, str(data))
    code, out, err = cli("data", "fetch", "drawbench")
    ps = prompts.get("drawbench")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert err == (f"error: download of {ps.file} from {ps.url} failed: the network or the server is unreachable "
                   "([Errno 111] Connection refused); run the command again to retry, or place the file by hand: "
                   f"download {ps.url} elsewhere and copy it to {data / ps.file} (sha256 {ps.sha256})")
    code, out, err = cli("data", "geneval-metadata", "--out", tmp_path / "meta.jsonl")
    names = prompts.get("geneval_object_names")
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "meta.jsonl").exists()
    assert err == (f"error: prompt set 'geneval_object_names' ({names.file}) is not downloaded; run `soarbench data "
                   f"fetch geneval_object_names`, or place the file by hand: download {names.url} elsewhere and copy "
                   f"it to {data / names.file} (sha256 {names.sha256})")


@needs_shared
def test_fetch_defaults_to_soarbench_data_and_the_cli_keeps_a_good_copy(tmp_path, monkeypatch, cli):
    data = tmp_path / "data"
    data.mkdir()
    (data / "flowgrpo_ocr_test.txt").write_bytes((SHARED / "flowgrpo_ocr_test.txt").read_bytes())
    monkeypatch.setenv(prompts.ENV_DATA, str(data))
    assert prompts.data_dir() == data
    code, out, _ = cli("data", "fetch", "ocr")  # present: no network needed
    assert code == 0 and out == f"ocr\t{data / 'flowgrpo_ocr_test.txt'}"
    code, _, err = cli("data", "fetch", "ocrr")
    assert code == 2 and err.startswith("error: unknown prompt set 'ocrr'")


# ------------------------------------------------------------------------------------------------ parsers


def test_prompt_lines_keep_text_exactly(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"  a sign that says \"hi\" \r\nsecond\n")
    assert prompts.read_prompt_lines(f) == ['  a sign that says "hi" ', "second"]
    f.write_bytes("no final newline\nnaïve".encode())
    assert prompts.read_prompt_lines(f) == ["no final newline", "naïve"]
    f.write_bytes(b"one\n\nthree\n")
    with pytest.raises(UserError) as e:
        prompts.read_prompt_lines(f)
    assert str(e.value) == f"{f}:2: blank line (one prompt per line; remove it)"
    f.write_bytes(b"\xff\n")
    with pytest.raises(UserError, match="not UTF-8"):
        prompts.read_prompt_lines(f)
    with pytest.raises(UserError, match="has no GenEval metadata"):
        prompts.load_metadata("ocr")


@needs_shared
def test_flow_grpo_geneval_file_is_each_official_row_four_times():
    official = prompts.load_metadata("geneval")
    flow_grpo = prompts.load_metadata("geneval_flowgrpo")
    assert Counter(json.dumps(r) for r in flow_grpo) == Counter({json.dumps(r): 4 for r in official})


@needs_shared
def test_geneval_metadata_command_regenerates_the_official_file(tmp_path, cli):
    out = tmp_path / "meta" / "evaluation_metadata.jsonl"
    code, stdout, _ = cli("data", "geneval-metadata", "--out", str(out))
    sha = prompts.get("geneval").sha256
    assert code == 0
    assert stdout == f"{out}\t{sha}\tmatches the published file ({sha})"
    assert out.read_bytes() == (SHARED / "geneval_evaluation_metadata.jsonl").read_bytes()


# ------------------------------------------------------------------------------------------------ benchmarks


@needs_shared
@pytest.mark.parametrize("name,n_prompts,per_prompt", [
    ("geneval", 553, 4), ("ocr", 1018, 1), ("pickscore", 2048, 1), ("drawbench", 1000, 1)])
def test_benchmarks_at_the_papers_protocol(name, n_prompts, per_prompt):
    bench = build_benchmark(name)
    assert (len(bench.prompts), bench.images_per_prompt) == (n_prompts, per_prompt)
    assert (bench.height, bench.width, bench.num_steps, bench.guidance) == (512, 512, 40, 4.5)
    assert bench.source["prompt_set"] == name and bench.source["sha256"] == prompts.get(name).sha256
    assert all(m in METRICS.names() for m in bench.metrics)
    assert bench.prompts == prompts.load_prompts(name)


@needs_shared
def test_geneval_is_2212_samples_and_names_its_detector():
    bench = build_benchmark("geneval")
    assert len(bench.prompts) * bench.images_per_prompt == 2212 == prompts.get("geneval_flowgrpo").rows
    assert bench.metadata == prompts.load_metadata("geneval")
    assert bench.metrics == {"geneval": {"backend": "mask2former"}}
    assert set(build_benchmark("drawbench").metrics) == {"pickscore", "clipscore", "hpsv2", "aesthetic",
                                                                "imagereward"}
    assert len(set(build_benchmark("drawbench").prompts)) == 200
    assert {"geneval", "ocr", "pickscore", "drawbench", "shapes"} <= set(BENCHMARKS.names())
    assert re.fullmatch(r"[0-9a-f]{64}", bench.source["sha256"])
