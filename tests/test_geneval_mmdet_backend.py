"""The official "mask2former" GenEval backend without mmdetection: the one mmdet-result conversion on hand-made
mmdet 2.x and 3.x results, the server's wire format, and the server, its client and `soarbench metrics
serve-geneval` as real processes over a FAKE `mmdet` package written here (init_detector / inference_detector
that find solid-colour rectangles: red = cat, blue = dog, green = COCO's "mouse"), so every byte between the
model's output and GenEval's verdict runs as it does with the real detector."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import soarbench  # noqa: F401  (torchvision fallback first)
from soarbench.errors import UserError
from soarbench.geneval import detector_server as wire
from soarbench.geneval import grammar
from soarbench.geneval import mmdet_backend
from soarbench.geneval.backends import BACKENDS, load_backend
from soarbench.geneval.rules import Detection
from soarbench.geneval.metric import GenEvalMetric
from soarbench.metrics.weights import load_manifest

try:  # pytest puts tests/ on sys.path (rootdir conftest, no __init__.py)
    from test_metric_clipscore import write_tiny_clip
except ImportError:  # pragma: no cover - run from the repository root as a package
    from tests.test_metric_clipscore import write_tiny_clip

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
F32 = np.float32
GREY, RED, BLUE, GREEN = (153, 153, 153), (255, 0, 0), (0, 0, 255), (0, 255, 0)
CAT, DOG, MOUSE = 15, 16, 64  # COCO indices

FAKE_APIS = '''
"""A fake mmdet.apis: one detection per solid rectangle of a class colour, in mmdet 2.x's result format."""
import os
import types

import numpy as np

CLASS_OF_RGB = {(255, 0, 0): 15, (0, 0, 255): 16, (0, 255, 0): 64}  # cat, dog, mouse


def init_detector(config, checkpoint=None, device="cuda:0"):
    assert os.path.isfile(config) and os.path.isfile(checkpoint), (config, checkpoint)
    return types.SimpleNamespace(config=config, checkpoint=checkpoint, device=device)  # no CLASSES: COCO's


def _column_runs(columns):
    """[start, stop) of each run of consecutive True columns."""
    edges = np.diff(np.concatenate([[0], columns.astype(np.int8), [0]]))
    return zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))


def inference_detector(model, img):
    assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.shape[2] == 3, "a BGR uint8 array"
    rgb = img[..., ::-1]
    height = rgb.shape[0]
    boxes = [np.zeros((0, 5), np.float32) for _ in range(80)]
    masks = [[] for _ in range(80)]
    for colour, label in CLASS_OF_RGB.items():
        hit = np.all(rgb == np.array(colour, np.uint8), axis=-1)
        rows = []
        for x1, x2 in _column_runs(hit.any(axis=0)):  # rectangles of one colour never share columns here
            mask = np.zeros_like(hit)
            mask[:, x1:x2] = hit[:, x1:x2]
            ys = np.flatnonzero(mask.any(axis=1))
            y1, y2 = ys[0], ys[-1] + 1
            rows.append([x1, y1, x2, y2, 0.5 + 0.5 * (y2 - y1) / height])  # taller = more confident
            masks[label].append(mask)
        if rows:
            boxes[label] = np.array(rows, np.float32)
    return boxes, masks
'''


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fake_mmdet(tmp_path_factory) -> Path:
    """A folder to put on PYTHONPATH: a fake mmdet 2.27.0 with the official config where mim installs it."""
    root = tmp_path_factory.mktemp("fake_mmdet")
    package = root / "mmdet"
    config = package / ".mim" / "configs" / "mask2former" / wire.CONFIG_NAME
    config.parent.mkdir(parents=True)
    config.write_text("# the fake detector needs no settings\n")
    (package / "__init__.py").write_text('__version__ = "2.27.0"\n')
    (package / "apis.py").write_text(textwrap.dedent(FAKE_APIS))
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights root with a tiny CLIP at its manifest path, and a stand-in checkpoint file (given by path: the
    manifest checks the real one's hash)."""
    root = tmp_path_factory.mktemp("ckpts")
    write_tiny_clip(root / load_manifest().get("clip-vit-large-patch14").path)
    (root / "fake.pth").write_bytes(b"not a real checkpoint")
    return root


@pytest.fixture()
def in_process_mmdet(fake_mmdet, monkeypatch):
    """The fake mmdet importable in this process (and forgotten afterwards)."""
    monkeypatch.syspath_prepend(str(fake_mmdet))
    for name in [m for m in sys.modules if m == "mmdet" or m.startswith("mmdet.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "mmdet" or m.startswith("mmdet.")]:
        del sys.modules[name]


def child_env(fake_mmdet: Path | None, weights: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", mmdet_backend.ENV_SERVER)}
    env["OMP_NUM_THREADS"] = "1"
    if fake_mmdet is not None:
        env["PYTHONPATH"] = str(fake_mmdet)
    if weights is not None:
        env["SOARBENCH_REWARD_CKPTS"] = str(weights)
    return env


def first_line(process: subprocess.Popen, prefix: str) -> str:
    """The first stdout line starting with `prefix` (the process's stderr on failure)."""
    for line in process.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no '{prefix}' line; stderr: {process.stderr.read()}")


@pytest.fixture(scope="module")
def server(fake_mmdet, weights):
    """detector_server.py as a real process under this python with the fake mmdet: its URL."""
    checkpoint = weights / "fake.pth"
    process = subprocess.Popen(
        [sys.executable, "-u", str(mmdet_backend.SERVER_SCRIPT), "--checkpoint", str(checkpoint),
         "--checkpoint-label", "fake@000000000000", "--device", "cpu", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(fake_mmdet), cwd=fake_mmdet)
    try:
        line = first_line(process, "listening on ")
        yield line.split("listening on ", 1)[1]
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- hand-made data


def picture(*rects, size=(48, 64)) -> np.ndarray:
    """A grey RGB image with filled rectangles (colour, x1, y1, x2, y2), ends exclusive."""
    image = np.full((*size, 3), GREY, dtype=np.uint8)
    for colour, x1, y1, x2, y2 in rects:
        image[y1:y2, x1:x2] = colour
    return image


def box_mask(x1, y1, x2, y2, size=(6, 8)) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def assert_same(actual: list[Detection], expected: list[Detection]) -> None:
    """Equal class, score and box (Detection's ==), and exactly equal masks (or both None)."""
    assert actual == expected
    for a, e in zip(actual, expected):
        assert (a.mask is None) == (e.mask is None)
        if e.mask is not None:
            assert a.mask.dtype == bool
            np.testing.assert_array_equal(a.mask, e.mask)


MASKS = [box_mask(0, 0, 2, 2), box_mask(1, 1, 5, 3), box_mask(2, 2, 3, 6), box_mask(4, 0, 8, 6)]


def mmdet2_result(with_masks: bool = True):
    boxes = [np.zeros((0, 5), F32) for _ in range(80)]
    boxes[CAT] = np.array([[0, 0, 2, 2, 0.5], [1.25, 1, 5, 3, 0.9], [2, 2, 3, 6, 0.7]], F32)  # unsorted
    boxes[MOUSE] = np.array([[4, 0, 8, 6, 0.31]], F32)
    masks = [[] for _ in range(80)]
    masks[CAT], masks[MOUSE] = MASKS[:3], [MASKS[3]]
    return (boxes, masks if with_masks else None)


def expected_detections(with_masks: bool = True) -> list[Detection]:
    """By class index, each class by descending score; float32 values, GenEval's name for "mouse"."""
    def det(cls, score, box, mask):
        return Detection(cls, float(F32(score)), tuple(float(F32(v)) for v in box), mask if with_masks else None)

    return [det("cat", 0.9, (1.25, 1, 5, 3), MASKS[1]), det("cat", 0.7, (2, 2, 3, 6), MASKS[2]),
            det("cat", 0.5, (0, 0, 2, 2), MASKS[0]), det("computer mouse", 0.31, (4, 0, 8, 6), MASKS[3])]


# ---------------------------------------------------------------------------------------------- conversion


def test_registered_as_the_official_backend():
    assert "mask2former" in BACKENDS.names()
    assert BACKENDS.load("mask2former") is mmdet_backend.make_backend
    assert len(wire.COCO_CLASSES) == 80
    names = (REPO.parent / "shared" / "data" / "prompts" / "geneval_object_names.txt")
    if names.is_file():  # GenEval's class order is mmdet's, with three names respelled
        official = [line.strip() for line in names.read_text().splitlines() if line.strip()]
        assert mmdet_backend._names(wire.COCO_CLASSES) == official


def test_mmdet2_results_become_every_candidate_in_the_official_order():
    assert_same(mmdet_backend.detections_from_result(mmdet2_result()), expected_detections())
    # No segm results (None), or only the bbox list: boxes without masks.
    assert_same(mmdet_backend.detections_from_result(mmdet2_result(with_masks=False)), expected_detections(False))
    assert_same(mmdet_backend.detections_from_result(mmdet2_result()[0]), expected_detections(False))
    # A panoptic MaskFormer wraps the instance results in a dict.
    assert_same(mmdet_backend.detections_from_result({"ins_results": mmdet2_result(), "pan_results": None}),
                expected_detections())
    # One class's masks may be None while others have them.
    boxes, masks = mmdet2_result()
    masks[MOUSE] = None
    expected = expected_detections()
    expected[3] = Detection("computer mouse", expected[3].score, expected[3].box)
    assert_same(mmdet_backend.detections_from_result((boxes, masks)), expected)
    # Nothing found anywhere.
    assert mmdet_backend.detections_from_result(([np.zeros((0, 5), F32)] * 80, [[] for _ in range(80)])) == []


def test_mmdet3_data_samples_give_the_same_detections():
    order = [MOUSE, CAT, CAT, CAT]  # interleaved as a model emits queries
    rows = [((4, 0, 8, 6), 0.31, 3), ((0, 0, 2, 2), 0.5, 0), ((2, 2, 3, 6), 0.7, 2), ((1.25, 1, 5, 3), 0.9, 1)]
    instances = SimpleNamespace(
        bboxes=torch.tensor([r[0] for r in rows], dtype=torch.float32),
        scores=torch.tensor([r[1] for r in rows], dtype=torch.float32),
        labels=torch.tensor(order),
        masks=torch.from_numpy(np.stack([MASKS[r[2]] for r in rows])),
    )
    assert_same(mmdet_backend.detections_from_result(SimpleNamespace(pred_instances=instances)),
                expected_detections())
    del instances.masks
    assert_same(mmdet_backend.detections_from_result(SimpleNamespace(pred_instances=instances)),
                expected_detections(False))
    empty = SimpleNamespace(bboxes=torch.zeros(0, 4), scores=torch.zeros(0), labels=torch.zeros(0, dtype=torch.long))
    assert mmdet_backend.detections_from_result(SimpleNamespace(pred_instances=empty)) == []


def test_a_class_index_beyond_the_class_list_is_a_user_error():
    with pytest.raises(UserError, match="class index 64"):
        mmdet_backend.detections_from_result(mmdet2_result(), classes=wire.COCO_CLASSES[:20])


def test_the_wire_format_round_trips_exactly():
    rng = np.random.default_rng(0)
    odd = rng.random((7, 13)) > 0.5  # 91 bits: not a whole number of bytes
    instances = [wire.Instance(3, 0.1 + 0.2, (1 / 3, 2.5e-7, 1e300, -0.0), odd),
                 wire.Instance(0, float(F32(0.9)), (0.0, 0.0, 5.0, 3.0), None),
                 wire.Instance(79, 5e-324, (1.0, 2.0, 3.0, 4.0), np.zeros((1, 1), dtype=bool))]
    decoded = wire.decode_instances(json.loads(json.dumps(wire.encode_instances(instances))))
    assert len(decoded) == len(instances)
    for got, sent in zip(decoded, instances):
        assert (got.label, got.score, got.box) == (sent.label, sent.score, sent.box)
        if sent.mask is None:
            assert got.mask is None
        else:
            assert got.mask.dtype == bool and got.mask.shape == sent.mask.shape
            np.testing.assert_array_equal(got.mask, sent.mask)
    with pytest.raises(ValueError, match="detection 0 is malformed"):
        wire.decode_instances([{"label": 1, "score": 0.5, "box": [1, 2, 3]}])


# ------------------------------------------------------------------------------------------ the server


def get_json(url: str, data: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "image/png"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_health_names_versions_config_and_classes(server, fake_mmdet):
    status, health = get_json(server + "/health")
    assert status == 200 and health["ok"] is True
    assert health["versions"]["mmdet"] == "2.27.0"
    assert set(health["versions"]) == {"python", "torch", "mmcv", "mmdet"}
    assert health["config"] == str(fake_mmdet / "mmdet" / ".mim" / "configs" / "mask2former" / wire.CONFIG_NAME)
    assert health["checkpoint_label"] == "fake@000000000000" and health["device"] == "cpu"
    assert health["classes"] == list(wire.COCO_CLASSES)


def test_server_detections_equal_the_in_process_path(server, weights, in_process_mmdet, monkeypatch):
    monkeypatch.delenv(mmdet_backend.ENV_SERVER, raising=False)
    local = load_backend("mask2former", checkpoint=str(weights / "fake.pth"), device="cpu",
                         weights_root=str(weights))
    remote = load_backend("mask2former", server=server, device="cpu", weights_root=str(weights))
    assert isinstance(local.detector, mmdet_backend.MMDetDetector)
    assert isinstance(remote.detector, mmdet_backend.ServerDetector)
    assert local.version.startswith(f"mask2former-official/mmdet-2.27.0/local:{weights / 'fake.pth'}/")
    assert remote.version.startswith("mask2former-official/server:mmdet-2.27.0,") and "/fake@000000000000/" in \
        remote.version
    assert "clip:clip-vit-large-patch14@" in local.version and "clip:clip-vit-large-patch14@" in remote.version
    assert local.detector.classes == remote.detector.classes and "computer mouse" in local.detector.classes
    image = picture((RED, 2, 4, 10, 40), (RED, 14, 30, 20, 34), (BLUE, 30, 1, 45, 47), (GREEN, 50, 10, 60, 20))
    detections = remote.detector.detect(image)
    assert_same(detections, local.detector.detect(image))
    assert [d.cls for d in detections] == ["cat", "cat", "dog", "computer mouse"]
    assert detections[0].box == (2.0, 4.0, 10.0, 40.0) and detections[0].score == float(F32(0.5 + 0.5 * 36 / 48))
    np.testing.assert_array_equal(detections[0].mask, np.all(image == RED, axis=-1) & (np.arange(64) < 12))


def test_server_answers_bad_requests_with_400_and_one_line(server):
    status, answer = get_json(server + "/detect", data=b"\x89PNG but not really")
    assert status == 400 and "\n" not in answer["error"] and "not a decodable image" in answer["error"]
    status, answer = get_json(server + "/elsewhere")
    assert status == 404 and "/health" in answer["error"]
    # The server keeps serving after bad requests.
    assert get_json(server + "/health")[0] == 200


def test_geneval_metric_scores_through_the_server(server, weights):
    metric = GenEvalMetric(backend="mask2former", server=server, device="cpu", weights_root=str(weights))
    assert metric.info.version.startswith("geneval-rules-")
    assert "mask2former-official/server:mmdet-2.27.0" in metric.info.version
    tall_cat, short_cat = (RED, 4, 2, 14, 46), (RED, 20, 40, 26, 46)  # scores 0.958 and 0.5625
    dog, mouse = (BLUE, 40, 2, 60, 46), (GREEN, 30, 20, 36, 26)
    cases = [  # (metadata row, image, correct, reason)
        (grammar.single_object("cat"), picture(short_cat), True, ""),
        (grammar.two_object("dog", "computer mouse"), picture(dog, mouse), True, ""),
        (grammar.position("cat", "left of", "dog"), picture(tall_cat, dog), True, ""),
        (grammar.position("dog", "left of", "cat"), picture(tall_cat, dog), False,
         "expected dog left of target, found right of target"),
        # counting raises the bar to 0.9 for every class: the short cat does not count
        (grammar.counting("cat", 2), picture(tall_cat, short_cat), False, "expected cat>=2, found 1"),
        (grammar.counting("cat", 2), picture(tall_cat, (RED, 20, 2, 26, 46)), True, ""),
    ]
    records = metric.score([Image.fromarray(c[1]) for c in cases], [c[0]["prompt"] for c in cases],
                           [c[0] for c in cases])
    for (row, _, correct, reason), record in zip(cases, records):
        assert (record["correct"], record["reason"]) == (correct, reason), row["prompt"]
    details = json.loads(records[2]["details"])
    assert details == {"cat": [[4.0, 2.0, 14.0, 46.0, float(F32(0.5 + 0.5 * 44 / 48))]],
                       "dog": [[40.0, 2.0, 60.0, 46.0, float(F32(0.5 + 0.5 * 44 / 48))]]}

    # Colour: the client's CLIP names the crop; the verdict follows it (a tiny random CLIP, so ask it first).
    image = picture(tall_cat)
    seen = metric.backend.color_classifier.classify(image, metric.backend.detector.detect(image), "cat")
    assert len(seen) == 1
    for colour in (seen[0], "red" if seen[0] != "red" else "blue"):
        record = metric.score([Image.fromarray(image)], [f"a photo of a {colour} cat"],
                              [grammar.colors("cat", colour)])[0]
        expected = "" if colour == seen[0] else f"expected {colour} cat>=1, found 0 {colour}; and 1 {seen[0]}"
        assert (record["correct"], record["reason"]) == (colour == seen[0], expected)


def test_an_unreachable_server_is_a_one_line_user_error(weights, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as error:
        load_backend("mask2former", server=url, device="cpu", weights_root=str(weights))
    message = str(error.value)
    assert "\n" not in message and url in message and "unreachable" in message
    assert "soarbench metrics serve-geneval" in message and f"--port {url.rsplit(':', 1)[1]}" in message
    # Without the option, the environment variable names the server.
    monkeypatch.setenv(mmdet_backend.ENV_SERVER, url)
    with pytest.raises(UserError, match="unreachable"):
        GenEvalMetric(backend="mask2former", device="cpu", weights_root=str(weights))


def test_missing_config_is_a_user_error_naming_the_paths_tried(in_process_mmdet, fake_mmdet, weights, monkeypatch,
                                                              tmp_path):
    monkeypatch.delenv(mmdet_backend.ENV_SERVER, raising=False)
    monkeypatch.setattr(wire, "CONFIG_NAME", "nowhere.py")
    with pytest.raises(UserError, match=r"no mmdet config nowhere\.py: tried .*\.mim.*configs"):
        load_backend("mask2former", checkpoint=str(weights / "fake.pth"), device="cpu", weights_root=str(weights))
    with pytest.raises(UserError, match="no such mmdet config file"):
        load_backend("mask2former", config=str(tmp_path / "x.py"), device="cpu", weights_root=str(weights))


# --------------------------------------------------------------------------------------------- the CLI


def test_serve_geneval_starts_answers_and_stops_on_sigint(fake_mmdet, weights):
    command = [sys.executable, "-m", "soarbench", "metrics", "serve-geneval", "--device", "cpu", "--port", "0",
               "--checkpoint", str(weights / "fake.pth")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=child_env(fake_mmdet, weights), cwd=REPO)
    try:
        url = first_line(process, "GenEval detector server: ").rsplit(" ", 1)[1]
        rest = [process.stdout.readline() for _ in range(4)]
        assert f"export {mmdet_backend.ENV_SERVER}={url}" in rest[1]
        assert f"method.reward_options.geneval.server={url}" in rest[2]
        status, health = get_json(url + "/health")
        assert status == 200 and health["checkpoint_label"] == f"local:{weights / 'fake.pth'}"
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "detector server stopped (exit status 0)" in err, err
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_serve_geneval_reports_a_child_that_dies_in_one_line(cli, weights, monkeypatch):
    monkeypatch.setenv("SOARBENCH_REWARD_CKPTS", str(weights))
    monkeypatch.delenv("PYTHONPATH", raising=False)  # no mmdet for the child
    code, out, err = cli("metrics", "serve-geneval", "--device", "cpu", "--port", "0", "--timeout", "60",
                         "--checkpoint", weights / "fake.pth")
    assert code == 2 and out == ""
    last = err.splitlines()[-1]
    assert last.startswith("error: the GenEval detector server exited with status 1 before it was ready: ")
    assert "No module named 'mmdet'" in last
    code, out, err = cli("metrics", "serve-geneval", "--python", "/nonexistent/python", "--port", "0")
    assert code == 2 and "not an executable python" in err


def test_without_mmdet_or_a_url_the_default_server_is_asked(weights, monkeypatch):
    monkeypatch.delenv(mmdet_backend.ENV_SERVER, raising=False)
    monkeypatch.setattr(mmdet_backend, "DEFAULT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UserError, match=r"mmdet is not importable here, so the default server was asked: .*"
                                        r"unreachable.*soarbench metrics serve-geneval"):
        load_backend("mask2former", device="cpu", weights_root=str(weights))


def test_config_lookup_prefers_the_2x_name_and_finds_the_3x_one(tmp_path):
    package = tmp_path / "site" / "mmdet"
    v3 = package / ".mim" / "configs" / "mask2former" / wire.CONFIG_NAME_V3
    v3.parent.mkdir(parents=True)
    v3.write_text("# mmdet 3.x")
    assert wire.find_config(str(package))[0] == str(v3)
    checkout = tmp_path / "site" / "configs" / "mask2former" / wire.CONFIG_NAME  # <mmdet>/../configs (a checkout)
    checkout.parent.mkdir(parents=True)
    checkout.write_text("# mmdet 2.x")
    found, tried = wire.find_config(str(package))
    assert found == str(checkout) and len(tried) == 4
