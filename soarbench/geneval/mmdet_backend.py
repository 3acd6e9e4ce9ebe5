"""The "mask2former" GenEval backend: the OFFICIAL detector (mmdetection Mask2Former Swin-S COCO) + CLIP colours.

The official evaluator (djghosh13/geneval, evaluation/evaluate_images.py) builds its detector with
`mmdet.apis.init_detector(<mmdet>/../configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py,
<checkpoint>)` and reads `inference_detector`'s (bbox_results, segm_results). This backend runs that same model,
either in this process (when `import mmdet` works here) or through a scorer server on localhost that runs in a
separate environment with the known-good stack (mmcv-full 1.7.1 + mmdet 2.27.0 on python 3.8-3.10 with an old
torch, which soarbench's own environment cannot hold):

    backend = load_backend("mask2former")                                 # in-process if mmdet imports, else
                                                                          # the server at $SOARBENCH_GENEVAL_SERVER
                                                                          # or http://127.0.0.1:8765
    backend = load_backend("mask2former", server="http://127.0.0.1:8765") # always the server
    backend = load_backend("mask2former", config="cfg.py", checkpoint="path/to.pth", device="cuda:0")

Making the separate environment (once) and serving (each session):

    conda create -n geneval python=3.9 -y && conda activate geneval
    pip install torch==1.13.1 torchvision==0.14.1
    pip install -U openmim && mim install mmcv-full==1.7.1 && pip install mmdet==2.27.0
    soarbench ckpts download mask2former-mmdet
    soarbench metrics serve-geneval --python "$(conda run -n geneval which python)" --device cuda:0 --port 8765
    export SOARBENCH_GENEVAL_SERVER=http://127.0.0.1:8765      # then, e.g.:
    soarbench eval --images geneval_outputs --benchmark geneval --out evals/theirs

Training with the official detector as the reward passes the backend options through the method's
reward_options: `--set method.reward_options.geneval.backend=mask2former
--set method.reward_options.geneval.server=http://127.0.0.1:8765`.

Detector: images go to `inference_detector` as BGR uint8 arrays (mmdet reads files as BGR; the official evaluator
passes paths, this backend pixels), and `detector_server.instances_from_result` (the one conversion, shared with
the server) turns every candidate into a `Detection`: class by index through the model's class list (COCO's
"mouse", "remote", "keyboard" renamed to GenEval's names), the float32 score, mmdet's box and the boolean mask.
No threshold, cap or NMS here: the rules engine applies GenEval's 0.3 / 0.9 and 16.

Checked here end to end against a real mmdet 3.3.0 + mmcv 2.1.0 (built from source) running the 3.x config of the
same model with random weights: the server's detections equal the in-process conversion bit for bit (100
instances per 512 px image, about 7 s each on 2 CPU cores), and GenEvalMetric scores through it. The official 2.x
stack (mmcv-full 1.7.1 + mmdet 2.27.0) and the trained checkpoint have not been run here (no wheels, no download).

Colours: hf_backend's ClipColorClassifier (the official protocol) with the CLIP ViT-L/14 transformers folder,
always in this process, also when the detector is the server.
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from soarbench.errors import UserError
from soarbench.geneval import detector_server as wire
from soarbench.geneval.backends import Backend
from soarbench.geneval.hf_backend import ClipColorClassifier, geneval_name
from soarbench.geneval.rules import Detection

NAME = "mask2former"
OFFICIAL = "official detector (mmdetection Mask2Former Swin-S COCO, as djghosh13/geneval)"
DEFAULT_CHECKPOINT = "mask2former-mmdet"
DEFAULT_CLIP = "clip-vit-large-patch14"
DEFAULT_PORT = 8765
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
ENV_SERVER = "SOARBENCH_GENEVAL_SERVER"  # the server URL when no `server` option is given
SERVER_SCRIPT = Path(wire.__file__).resolve()
REQUEST_TIMEOUT = 300.0  # seconds; the server's first image on a GPU includes CUDA's warm-up


# ------------------------------------------------------------------------------------------ detections


def _names(classes: Sequence[str]) -> list[str]:
    return [geneval_name(c) for c in classes]


def _as_detections(instances: Sequence[Any], names: Sequence[str]) -> list[Detection]:
    detections = []
    for inst in instances:
        if not 0 <= inst.label < len(names):
            raise UserError(f"the detector reported class index {inst.label}, but its class list has "
                            f"{len(names)} names: the config and checkpoint do not match")
        detections.append(Detection(names[inst.label], inst.score, tuple(inst.box), inst.mask))
    return detections


def detections_from_result(result: Any, classes: Sequence[str] = wire.COCO_CLASSES) -> list[Detection]:
    """Every candidate of one `inference_detector` result (mmdet 2.x tuple or 3.x DetDataSample) as Detections.

    `classes` are the model's class names by index (mmdet spelling; renamed to GenEval's here).
    """
    return _as_detections(wire.instances_from_result(result), _names(classes))


def _bgr(image: Any) -> np.ndarray:
    from soarbench.metrics.pixels import as_rgb

    return np.ascontiguousarray(np.asarray(as_rgb(image))[..., ::-1])


def _png(image: Any) -> bytes:
    from soarbench.metrics.pixels import as_rgb

    buffer = io.BytesIO()
    as_rgb(image).save(buffer, format="PNG", compress_level=1)  # lossless; level 1 is fast and small enough
    return buffer.getvalue()


class MMDetDetector:
    """mmdet's Mask2Former in this process (implements backends.Detector)."""

    def __init__(self, config: Path, checkpoint: Path, device: str):
        apis = importlib.import_module("mmdet.apis")
        self.model = apis.init_detector(str(config), str(checkpoint), device=device)
        self._infer = apis.inference_detector
        self._names = _names(wire.model_classes(self.model))
        self.classes: tuple[str, ...] = tuple(dict.fromkeys(self._names))

    def detect(self, image: Any) -> list[Detection]:
        return _as_detections(wire.instances_from_result(self._infer(self.model, _bgr(image))), self._names)


# ---------------------------------------------------------------------------------------------- client


def serve_command(url: str | None = None) -> str:
    """The command that starts a server answering at `url`."""
    port = DEFAULT_PORT
    if url:
        tail = url.rstrip("/").rsplit(":", 1)[-1]
        port = int(tail) if tail.isdigit() else port
    return f"soarbench metrics serve-geneval --python /path/to/mmdet-env/bin/python --port {port}"


def _server_error(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read().decode())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return f"HTTP {error.code} {error.reason}"


def _request(url: str, path: str, body: bytes | None = None, timeout: float = REQUEST_TIMEOUT) -> Any:
    """The JSON answer of GET (no body) or POST (an image body) url+path; any failure is a one-line UserError."""
    request = urllib.request.Request(url + path, data=body, method="GET" if body is None else "POST")
    if body is not None:
        request.add_header("Content-Type", "image/png")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as e:
        raise UserError(f"GenEval detector server {url}{path}: {_server_error(e)}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"GenEval detector server {url} is unreachable ({reason}); start it with: "
                        f"{serve_command(url)}") from None
    except ValueError:
        raise UserError(f"GenEval detector server {url}{path} answered something that is not JSON") from None


def fetch_health(url: str, timeout: float = 10.0) -> dict[str, Any]:
    """The server's /health answer, checked for the fields the client relies on."""
    health = _request(url, "/health", timeout=timeout)
    if not isinstance(health, dict) or not health.get("ok") or not isinstance(health.get("classes"), list):
        raise UserError(f"{url}/health is not a soarbench GenEval detector server's answer")
    return health


class ServerDetector:
    """The official detector through a `detector_server.py` on localhost (implements backends.Detector)."""

    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.health = fetch_health(self.url)
        self._names = _names(self.health["classes"])
        self.classes: tuple[str, ...] = tuple(dict.fromkeys(self._names))

    def detect(self, image: Any) -> list[Detection]:
        answer = _request(self.url, "/detect", body=_png(image), timeout=self.timeout)
        try:
            instances = wire.decode_instances(answer["detections"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"GenEval detector server {self.url}/detect: unexpected answer ({e})") from None
        return _as_detections(instances, self._names)


# --------------------------------------------------------------------------------------------- backend


def mmdet_version() -> str | None:
    """The importable mmdet's version, or None when mmdet cannot be imported here."""
    if importlib.util.find_spec("mmdet") is None:
        return None
    try:
        return str(getattr(importlib.import_module("mmdet"), "__version__", "unknown"))
    except Exception:  # a broken install (e.g. mmcv built for another torch) counts as absent
        return None


def default_config() -> Path:
    """The official config shipped with the importable mmdet (UserError naming the paths tried)."""
    mmdet = importlib.import_module("mmdet")
    found, tried = wire.find_config(os.path.dirname(mmdet.__file__))
    if found is None:
        raise UserError(f"no mmdet config {wire.CONFIG_NAME}: tried {', '.join(tried)}; pass config=PATH")
    return Path(found)


def _server_backend(url: str, clip: Any, clip_label: str, clip_path: Path) -> Backend:
    detector = ServerDetector(url)
    v = detector.health.get("versions", {})
    where = f"server:mmdet-{v.get('mmdet')},mmcv-{v.get('mmcv')},torch-{v.get('torch')}"
    return Backend(name=NAME, version=f"{NAME}-official/{where}/{detector.health.get('checkpoint_label')}/"
                                      f"clip:{clip_label}",
                   detector=detector, color_classifier=clip, needs=(OFFICIAL, f"detector server {url}",
                                                                    str(clip_path)))


def _local_backend(version: str, config: str | None, checkpoint: str, device: Any, weights_root: str | None,
                   clip: Any, clip_label: str, clip_path: Path) -> Backend:
    from soarbench.metrics.weights import locate

    config_path = Path(config).expanduser() if config else default_config()
    if not config_path.is_file():
        raise UserError(f"{config_path}: no such mmdet config file")
    checkpoint_path, checkpoint_label = locate(checkpoint, weights_root)
    detector = MMDetDetector(config_path, checkpoint_path, str(device))
    return Backend(name=NAME, version=f"{NAME}-official/mmdet-{version}/{checkpoint_label}/clip:{clip_label}",
                   detector=detector, color_classifier=clip, needs=(OFFICIAL, str(checkpoint_path), str(clip_path)))


def make_backend(config: str | None = None, checkpoint: str = DEFAULT_CHECKPOINT, clip: str = DEFAULT_CLIP,
                 device: str = "auto", server: str | None = None, weights_root: str | None = None) -> Backend:
    """The "mask2former" backend: in-process mmdet, or the server at `server` / $SOARBENCH_GENEVAL_SERVER.

    Without a server URL and without an importable mmdet it asks http://127.0.0.1:8765. With a server, `config`,
    `checkpoint` and the detector's device are the server's (its /health answer names them in the version).
    """
    from soarbench.metrics.clipscore import HFClip, resolve_device
    from soarbench.metrics.weights import locate

    url = server or os.environ.get(ENV_SERVER) or None
    version = None if url else mmdet_version()
    if url is None and version is None:
        url = DEFAULT_URL
    torch_device = resolve_device(device)
    clip_path, clip_label = locate(clip, weights_root)
    colors = ClipColorClassifier(HFClip(clip_path, device=torch_device))
    if url is not None:
        try:
            return _server_backend(url.rstrip("/"), colors, clip_label, clip_path)
        except UserError as e:
            if server or os.environ.get(ENV_SERVER):
                raise
            raise UserError(f"mmdet is not importable here, so the default server was asked: {e}") from None
    return _local_backend(version, config, checkpoint, torch_device, weights_root, colors, clip_label, clip_path)


# ----------------------------------------------------------------------------------- the server process


class DetectorServerProcess:
    """`PYTHON detector_server.py ...` as a child: started, awaited until healthy, stopped with SIGINT.

    The child's stderr is passed through to ours and its last lines are kept, so a child that dies is reported
    in one line with its own last words.
    """

    def __init__(self, command: Sequence[str]):
        self.command = list(command)
        try:
            self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True, bufsize=1)
        except OSError as e:
            raise UserError(f"cannot start {self.command[0]}: {e.strerror or e}") from None
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._urls: queue.Queue[str] = queue.Queue()
        self._pumps = [threading.Thread(target=self._pump_stdout, daemon=True),
                       threading.Thread(target=self._pump_stderr, daemon=True)]
        for pump in self._pumps:
            pump.start()

    def _pump_stdout(self) -> None:
        for line in self.process.stdout:
            if line.startswith("listening on "):
                self._urls.put(line.split("listening on ", 1)[1].strip())

    def _pump_stderr(self) -> None:
        for line in self.process.stderr:
            self._stderr_tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    def last_stderr_line(self) -> str:
        for pump in self._pumps:
            pump.join(timeout=2.0)  # the child is gone: let the pumps drain what it wrote last
        lines = [line for line in self._stderr_tail if line.strip()]
        return lines[-1].strip() if lines else "(nothing on stderr)"

    def _died(self, when: str) -> UserError:
        return UserError(f"the GenEval detector server exited with status {self.process.returncode} {when}: "
                         f"{self.last_stderr_line()}")

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The URL and /health answer once the child listens; a UserError if it dies or takes too long."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                url = self._urls.get(timeout=0.1)
                break
            except queue.Empty:
                if self.process.poll() is not None:
                    raise self._died("before it was ready") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise UserError(f"the GenEval detector server did not listen within {timeout:g} s (loading "
                                    f"the model?); its last stderr line: {self.last_stderr_line()}") from None
        return {"url": url, **fetch_health(url)}

    def wait(self) -> None:
        """Block until the child exits (Ctrl-C raises KeyboardInterrupt here); its exit is a UserError."""
        self.process.wait()
        raise self._died("while serving")

    def stop(self, grace: float = 10.0) -> int:
        """SIGINT (the server's clean stop), then SIGTERM, then SIGKILL; returns the exit status."""
        for send in (lambda: self.process.send_signal(signal.SIGINT), self.process.terminate, self.process.kill):
            if self.process.poll() is not None:
                break
            send()
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        return self.process.wait()


def server_command(python: str, checkpoint: Path, checkpoint_label: str, config: str | None, device: str,
                   host: str, port: int) -> list[str]:
    """The child's command line: the self-contained script under the given python, unbuffered."""
    command = [python, "-u", str(SERVER_SCRIPT), "--checkpoint", str(checkpoint), "--checkpoint-label",
               checkpoint_label, "--device", device, "--host", host, "--port", str(port)]
    return command + (["--config", config] if config else [])


def start_server(python: str | None = None, config: str | None = None, checkpoint: str = DEFAULT_CHECKPOINT,
                 device: str = "cuda:0", host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 weights_root: str | None = None, timeout: float = 600.0) -> tuple[DetectorServerProcess, dict]:
    """Launch detector_server.py under `python` (default: this one) and wait for it: (process, health + url)."""
    from soarbench.metrics.weights import locate

    python = python or sys.executable
    if os.sep in python and not os.access(python, os.X_OK):
        raise UserError(f"{python}: not an executable python (give the mmdet environment's python)")
    if config is not None and not Path(config).is_file():
        raise UserError(f"{config}: no such mmdet config file")
    checkpoint_path, label = locate(checkpoint, weights_root)
    command = server_command(python, checkpoint_path.resolve(), label,
                             None if config is None else str(Path(config).resolve()), device, host, port)
    child = DetectorServerProcess(command)
    try:
        return child, child.wait_ready(timeout)
    except BaseException:
        child.stop()
        raise
