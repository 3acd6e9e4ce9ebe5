"""What the GenEval rules need from the outside world: a detector and a colour classifier.

The rules (rules.py) are model-free; a *backend* supplies the two learned parts of the official evaluator:

* a `Detector` turning an image into `Detection`s over its class list (officially Mask2Former Swin-S on COCO);
* a `ColorClassifier` naming the colour of detected objects (officially CLIP ViT-L/14 zero-shot over the ten
  GenEval colours on mask-composited crops).

Backends are registered lazily by name, so a heavy one is imported only when chosen: "shapes", the exact
detector of the procedural shapes world (soarbench.worlds.shapes), "mask2former-hf", transformers'
Mask2Former with the CLIP colour protocol, labelled NON-OFFICIAL (soarbench.geneval.hf_backend), and
"mask2former", the official mmdetection detector with the same colour protocol, run in-process when mmdet imports
or through `soarbench metrics serve-geneval`'s server on localhost (soarbench.geneval.mmdet_backend).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from soarbench.errors import did_you_mean
from soarbench.geneval.rules import Detection
from soarbench.registry import LazyRegistry


@runtime_checkable
class Detector(Protocol):
    """Finds object instances in one RGB image."""

    classes: Sequence[str]  # every class it can report, in its canonical order (orders the details JSON)

    def detect(self, image: np.ndarray) -> list[Detection]:
        """All candidate detections of an HxWx3 uint8 image, unfiltered: the rules apply thresholds and caps."""
        ...


@runtime_checkable
class ColorClassifier(Protocol):
    """Names one of the ten GenEval colours for each detected object."""

    def classify(self, image: np.ndarray, objects: Sequence[Detection], classname: str) -> list[str]:
        """One colour name (from grammar.COLORS) per object, in order."""
        ...


@dataclass(frozen=True)
class Backend:
    """A detector and colour classifier that belong together, and the version string results record."""

    name: str
    version: str
    detector: Detector
    color_classifier: ColorClassifier
    needs: tuple[str, ...] = ()  # weight files or extras the backend downloads/imports


# name -> "module:factory"; factory(**options) -> Backend. Imported only when the backend is built.
BACKENDS = LazyRegistry("GenEval backend")
BACKENDS.add("shapes", "soarbench.worlds.shapes:make_backend")
BACKENDS.add("mask2former-hf", "soarbench.geneval.hf_backend:make_backend")  # NON-OFFICIAL detector
BACKENDS.add("mask2former", "soarbench.geneval.mmdet_backend:make_backend")  # the official detector


def backend_options(name: str) -> list[str]:
    """The keyword options a backend's factory accepts (an unknown backend is a UserError)."""
    factory = BACKENDS.load(name)
    return [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def load_backend(name: str, **options: Any) -> Backend:
    """Build a backend by name; an unknown name or option is a UserError that suggests the nearest valid one."""
    valid = backend_options(name)
    for option in options:
        if option not in valid:
            raise did_you_mean(f"option for GenEval backend '{name}'", option, valid)
    return BACKENDS.load(name)(**options)
