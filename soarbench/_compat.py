"""Make torchvision importable beside a CPU-only torch.

The torchvision 0.28.0 wheel that matches torch 2.13.0 is a CUDA build: its compiled ops fail to load with the
CPU torch, `import torchvision` then raises "operator torchvision::nms does not exist", and transformers,
diffusers, open_clip and timm all import torchvision. We register the `torchvision::nms` schema with a CPU
kernel, but only when the real op is missing; on a machine whose torchvision ops load this does nothing.
Imported first by `soarbench/__init__.py`.
"""
from __future__ import annotations

import importlib.util


def _nms_cpu(boxes, scores, iou_threshold: float):
    import torch

    order = scores.argsort(descending=True)
    boxes = boxes[order]
    x1, y1, x2, y2 = boxes.unbind(-1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2[i + 1:]) - torch.maximum(x1[i], x1[i + 1:])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[i + 1:]) - torch.maximum(y1[i], y1[i + 1:])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[i + 1:] - inter).clamp(min=1e-12)
        suppressed[i + 1:] |= iou > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long)]


def _native_ops_load(spec) -> bool:
    """Load torchvision's compiled ops the way torchvision does; False when they cannot load here.

    Probing `torch.ops.torchvision.nms` is not enough: before `import torchvision` the op is simply not yet
    registered, and defining it then would collide with the real library when it loads later.
    """
    import glob
    import os

    import torch

    folder = list(spec.submodule_search_locations or [])[0]
    libs = glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])
        return True
    except (OSError, RuntimeError):
        return False


def install_torchvision_fallback() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    import torch

    if _native_ops_load(spec):
        return  # the real ops are registered
    try:
        torch.ops.torchvision.nms  # noqa: B018 - registered by an earlier fallback in this process
        return
    except (AttributeError, RuntimeError):
        pass
    try:
        lib = torch.library.Library("torchvision", "DEF")
        # torchvision registers fake (meta) kernels for exactly these two ops at import time
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl("nms", _nms_cpu, "CPU")
        lib.impl("qnms", lambda d, s, t: _nms_cpu(d.dequantize(), s.dequantize(), t), "CPU")
        # keep the library object alive for the life of the process
        install_torchvision_fallback._lib = lib  # type: ignore[attr-defined]
    except RuntimeError:
        pass  # another copy defined it first


install_torchvision_fallback()
