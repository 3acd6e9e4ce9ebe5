"""GenEval's official detector (mmdetection Mask2Former Swin-S) behind a small HTTP server on localhost.

SELF-CONTAINED: this file imports only the standard library and numpy at module level (mmdet, mmcv and torch
only when the model is loaded), so it runs with the python of a separate environment holding the official stack
(mmcv-full 1.7.1 + mmdet 2.27.0, python 3.8-3.10, old torch) that does not have soarbench installed. soarbench's
"mask2former" GenEval backend reuses its result conversion (`instances_from_result`) in-process, and its wire
format (`encode_instances` / `decode_instances`) as the client, so there is one conversion, not two.

Launch (normally through `soarbench metrics serve-geneval`, which resolves the checkpoint and waits for health):

    /opt/conda/envs/geneval/bin/python soarbench/geneval/detector_server.py \\
        --checkpoint reward_ckpts/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth --device cuda:0 --port 8765

The first stdout line is `listening on http://HOST:PORT` (flushed; with `--port 0` it names the free port the
system chose). Without `--config` the config is looked up where the official evaluator finds it, relative to the
installed mmdet: <mmdet>/.mim/configs/mask2former/... (pip/mim installs) and <mmdet>/../configs/mask2former/...
(an mmdetection checkout).

Endpoints (every answer is JSON; errors are {"error": "<one line>"} with status 400, 404 or 500):

    GET  /health  -> {"ok": true, "versions": {"python", "torch", "mmcv", "mmdet"}, "config", "checkpoint",
                      "checkpoint_label", "device", "classes": [80 names, the model's own class order]}
    POST /detect  body: one encoded image (PNG, or anything cv2/PIL decodes), Content-Type image/png
                  -> {"detections": [{"label": i, "score": s, "box": [x1, y1, x2, y2],
                                      "mask": {"shape": [H, W], "bits": base64(np.packbits(mask))} or null}, ...]}

    curl -s http://127.0.0.1:8765/health
    curl -s --data-binary @image.png -H 'Content-Type: image/png' http://127.0.0.1:8765/detect

Detections are every candidate the model returns (no threshold, no cap: GenEval's rules apply 0.3 / 0.9 and
16), grouped by class index and, within a class, in the official evaluator's order (`np.argsort(score)[::-1]`).
Scores and boxes are the model's float32 values, written as JSON floats (Python's repr: exact after float64),
masks bit-packed, so decoding gives back exactly what the model produced.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import importlib
import json
import os
import platform
import signal
import sys
import threading
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

CONFIG_NAME = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
# The same model's config as mmdet 3.x renamed it (an mmdet 3.x install ships only this name).
CONFIG_NAME_V3 = "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py"
# mmdetection's COCO class names in index order (GenEval's object_names.txt is the same list, except that it
# spells "mouse", "remote" and "keyboard" as "computer mouse", "tv remote" and "computer keyboard").
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
MAX_BODY = 64 << 20  # bytes; a 4k RGB PNG is far below this

# One detected instance: class index, score, (x1, y1, x2, y2) in pixels, HxW bool mask or None.
Instance = namedtuple("Instance", ["label", "score", "box", "mask"])


class BadRequest(ValueError):
    """A request the server cannot answer because of its content (HTTP 400)."""


# ------------------------------------------------------------------------------------------ mmdet results


def _numpy(value):
    """A numpy array from a numpy array, a list, or a torch tensor on any device (mmdet 3.x)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _per_class_from_instances(pred) -> tuple:
    """mmdet 3.x `pred_instances` regrouped as mmdet 2.x's per-class lists (bbox2result's layout).

    Returns (boxes, masks): boxes[c] an (n, 5) float32 array [x1, y1, x2, y2, score] in the instances' order,
    masks[c] the list of their HxW masks, or masks None when the instances carry none.
    """
    bboxes = _numpy(pred.bboxes).reshape(-1, 4)
    scores = _numpy(pred.scores).reshape(-1)
    labels = _numpy(pred.labels).reshape(-1).astype(np.int64)
    masks = getattr(pred, "masks", None)
    masks = None if masks is None else _numpy(masks)
    n_classes = int(labels.max()) + 1 if labels.size else 0
    rows = np.concatenate([bboxes, scores[:, None]], axis=1).astype(np.float32)
    boxes = [rows[labels == c] for c in range(n_classes)]
    per_class_masks = None if masks is None else [list(masks[labels == c]) for c in range(n_classes)]
    return boxes, per_class_masks


def _per_class(result) -> tuple:
    """(per-class box arrays, per-class mask lists or None) of one image's inference_detector result."""
    if hasattr(result, "pred_instances"):  # mmdet 3.x DetDataSample
        return _per_class_from_instances(result.pred_instances)
    if isinstance(result, dict) and "ins_results" in result:  # 2.x MaskFormer with stuff classes (panoptic)
        result = result["ins_results"]
    if isinstance(result, tuple):  # 2.x (bbox_results, segm_results), segm possibly absent or None
        boxes = result[0]
        masks = result[1] if len(result) > 1 else None
        return boxes, masks
    return result, None  # 2.x box-only detector: the per-class list itself


def instances_from_result(result) -> list:
    """Every candidate instance of one image's `inference_detector` result, as `Instance`s.

    Handles mmdet 2.x results ((bbox_results, segm_results): per class an (n, 5) array [x1, y1, x2, y2, score]
    and a list of n HxW masks; segm_results, or one class's list, may be None) and mmdet 3.x DetDataSamples
    (pred_instances with bboxes, scores, labels and optionally masks). Ordered by class index, then as the
    official evaluator orders a class (np.argsort(score)[::-1]): soarbench's rules sort stably, so ties keep it.
    """
    boxes, masks = _per_class(result)
    instances = []
    for label, rows in enumerate(boxes):
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, 5)
        class_masks = None if masks is None or label >= len(masks) else masks[label]
        if class_masks is not None and len(class_masks) != len(rows):
            raise ValueError(f"class {label}: {len(rows)} boxes but {len(class_masks)} masks")
        for i in np.argsort(rows[:, 4])[::-1]:
            mask = None if class_masks is None else np.asarray(class_masks[i], dtype=bool)
            box = tuple(float(v) for v in rows[i, :4])
            instances.append(Instance(label, float(rows[i, 4]), box, mask))
    return instances


def model_classes(model) -> tuple:
    """The class names of a loaded mmdet model: 2.x `CLASSES`, 3.x `dataset_meta["classes"]`, else COCO's."""
    names = getattr(model, "CLASSES", None)
    if names is None:
        names = (getattr(model, "dataset_meta", None) or {}).get("classes")
    return tuple(str(n) for n in names) if names is not None else COCO_CLASSES


def config_candidates(mmdet_dir: str) -> list:
    """Where the official config may live relative to an installed mmdet package (in lookup order): the 2.x
    name the official evaluator uses, then the 3.x name of the same model."""
    return [
        path
        for name in (CONFIG_NAME, CONFIG_NAME_V3)
        for path in (os.path.join(mmdet_dir, ".mim", "configs", "mask2former", name),
                     os.path.normpath(os.path.join(mmdet_dir, "..", "configs", "mask2former", name)))
    ]


def find_config(mmdet_dir: str):
    """(the first existing official config path or None, the paths tried)."""
    tried = config_candidates(mmdet_dir)
    return next((p for p in tried if os.path.isfile(p)), None), tried


# ------------------------------------------------------------------------------------------- wire format


def encode_mask(mask) -> dict:
    mask = np.asarray(mask, dtype=bool)
    return {"shape": list(mask.shape), "bits": base64.b64encode(np.packbits(mask, axis=None).tobytes()).decode()}


def decode_mask(data: dict) -> np.ndarray:
    shape = tuple(int(s) for s in data["shape"])
    packed = np.frombuffer(base64.b64decode(data["bits"], validate=True), dtype=np.uint8)
    count = int(np.prod(shape)) if shape else 1
    return np.unpackbits(packed, count=count).astype(bool).reshape(shape)


def encode_instances(instances) -> list:
    """JSON-ready dicts; floats go out as Python floats, whose repr round-trips exactly."""
    return [{"label": int(inst.label), "score": float(inst.score), "box": [float(v) for v in inst.box],
             "mask": None if inst.mask is None else encode_mask(inst.mask)} for inst in instances]


def decode_instances(items) -> list:
    """The inverse of encode_instances (a malformed item raises ValueError naming its index)."""
    instances = []
    for index, item in enumerate(items):
        try:
            box = tuple(float(v) for v in item["box"])
            if len(box) != 4:
                raise ValueError(f"box has {len(box)} numbers")
            mask = None if item.get("mask") is None else decode_mask(item["mask"])
            instances.append(Instance(int(item["label"]), float(item["score"]), box, mask))
        except (KeyError, TypeError, ValueError, binascii.Error) as e:
            raise ValueError(f"detection {index} is malformed: {e}") from None
    return instances


# ---------------------------------------------------------------------------------------------- the model


def _version(module: str, *distributions: str) -> str | None:
    """A package's version without importing it when it is not imported yet (torch's import is slow)."""
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__version__", None):
        return str(loaded.__version__)
    from importlib import metadata

    for dist in distributions or (module,):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def decode_bgr(data: bytes) -> np.ndarray:
    """An encoded image as an HxWx3 BGR uint8 array, decoded as mmdet decodes a file when it can.

    The official evaluator passes file paths, which mmdet reads with mmcv.imfrombytes(flag="color",
    channel_order="bgr"); where mmcv is missing (a test environment) PIL decodes it instead.
    """
    try:
        import mmcv
    except ImportError:
        mmcv = None
    if mmcv is not None and hasattr(mmcv, "imfrombytes"):
        try:
            image = mmcv.imfrombytes(data, flag="color", channel_order="bgr")
        except Exception as e:  # cv2 and turbojpeg raise various types for undecodable bytes
            raise BadRequest(f"the body is not an image mmcv can decode ({type(e).__name__})") from None
        if image is None:
            raise BadRequest("the body is not an image mmcv can decode")
        return image
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as opened:
            rgb = np.asarray(opened.convert("RGB"))
    except Exception as e:  # PIL raises several types for undecodable bytes
        raise BadRequest(f"the body is not a decodable image ({type(e).__name__})") from None
    return np.ascontiguousarray(rgb[..., ::-1])


class DetectorService:
    """An mmdet model loaded once; `detect` is serialised because one model on one GPU is not thread-safe."""

    def __init__(self, config: str | None, checkpoint: str, device: str, checkpoint_label: str | None = None):
        mmdet = importlib.import_module("mmdet")
        apis = importlib.import_module("mmdet.apis")
        if config is None:
            config, tried = find_config(os.path.dirname(mmdet.__file__))
            if config is None:
                raise SystemExit(f"error: no mmdet config {CONFIG_NAME}; tried {', '.join(tried)} (pass --config)")
        self.config, self.checkpoint, self.device = config, checkpoint, device
        self.checkpoint_label = checkpoint_label or f"local:{checkpoint}"
        self.model = apis.init_detector(config, checkpoint, device=device)
        self._infer = apis.inference_detector
        self.classes = model_classes(self.model)
        self.versions = {"python": platform.python_version(), "torch": _version("torch"),
                         "mmcv": _version("mmcv", "mmcv-full", "mmcv"), "mmdet": _version("mmdet")}
        self._lock = threading.Lock()

    def health(self) -> dict:
        return {"ok": True, "versions": self.versions, "config": self.config, "checkpoint": self.checkpoint,
                "checkpoint_label": self.checkpoint_label, "device": self.device, "classes": list(self.classes)}

    def detect(self, bgr: np.ndarray) -> list:
        with self._lock:
            return instances_from_result(self._infer(self.model, bgr))


# ------------------------------------------------------------------------------------------------- HTTP


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:500]


class Handler(BaseHTTPRequestHandler):
    service: DetectorService  # set on the subclass that `make_server` builds
    protocol_version = "HTTP/1.1"  # keep-alive: a client may send many images over one connection

    def _reply(self, status: int, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._reply(status, {"error": message.replace("\n", " ")})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?", 1)[0] == "/health":
            self._reply(200, self.service.health())
        else:
            self._error(404, f"no endpoint GET {self.path}; use GET /health or POST /detect")

    def do_POST(self) -> None:  # noqa: N802
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(400, "POST needs a Content-Length")
            self.close_connection = True  # the unread body would be taken for the next request
            return
        body = self.rfile.read(int(length)) if int(length) <= MAX_BODY else None
        if self.path.split("?", 1)[0] != "/detect":
            self._error(404, f"no endpoint POST {self.path}; use POST /detect with an image body")
            return
        if not body:
            self._error(400, "POST /detect needs an image body (at most 64 MiB), e.g. a PNG")
            self.close_connection = True
            return
        try:
            instances = self.service.detect(decode_bgr(body))
        except BadRequest as e:
            self._error(400, _one_line(e))
            return
        except Exception as e:  # the model failed: report it, keep serving
            self._error(500, f"detection failed: {type(e).__name__}: {_one_line(e)}")
            return
        self._reply(200, {"detections": encode_instances(instances)})

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        sys.stderr.write(f"detector_server: {self.address_string()} {format % args}\n")


def make_server(service: DetectorService, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"service": service})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="GenEval's official mmdet detector over HTTP (see the docstring).")
    parser.add_argument("--checkpoint", required=True, help="the mmdet .pth checkpoint file")
    parser.add_argument("--config", default=None, help=f"mmdet config (default: {CONFIG_NAME} of the installed mmdet)")
    parser.add_argument("--checkpoint-label", default=None, help="how versions name the checkpoint (e.g. NAME@HASH)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8765, help="0 = any free port (the first stdout line names it)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: checkpoint {args.checkpoint} is not a file")
    service = DetectorService(args.config, args.checkpoint, args.device, args.checkpoint_label)
    server = make_server(service, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    # A process started in the background by a shell inherits SIGINT ignored; SIGINT is how this server is
    # stopped (Ctrl-C, or soarbench's launcher), so it always raises KeyboardInterrupt here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C or the launcher's SIGINT: a clean stop, not a traceback
        pass
    finally:
        server.server_close()
    print("detector_server: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
