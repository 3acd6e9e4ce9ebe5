"""The "mask2former-hf" GenEval backend: Mask2Former (transformers) + CLIP zero-shot colours. NON-OFFICIAL.

The official evaluator (djghosh13/geneval, evaluation/evaluate_images.py) runs mmdetection 2.x's Mask2Former
Swin-S COCO checkpoint; this backend runs the transformers port of a Mask2Former Swin-S COCO instance model
(facebook/mask2former-swin-small-coco-instance, manifest entry "mask2former-swin-s-coco") instead, so the
detector's scores and masks differ from the official stack and numbers are not interchangeable with published
GenEval results. Its version string and `needs` say so.

    backend = load_backend("mask2former-hf")                          # manifest weights, checked
    backend = load_backend("mask2former-hf", model="path/to/folder", clip="path/to/clip", device="cpu")

Detector: the image goes through the folder's Mask2Former image processor and model; the processor's
`post_process_instance_segmentation` (score threshold 0.0, per-instance binary maps at the image's size, no
NMS) gives every query with a non-empty mask as a `Detection`: the class from `config.id2label` (COCO's
"mouse", "remote", "keyboard" are renamed to GenEval's "computer mouse", "tv remote", "computer keyboard", the
names the official evaluator gives those class indices), the score (class probability x mean mask probability
inside the mask, as mmdetection computes it; the processor rounds it to 6 decimals), the box = the mask's
extent with exclusive ends (mmdetection's `mask2bbox`), and the boolean mask. The rules engine then applies
GenEval's own 0.3 / 0.9 thresholds.

Colour classifier: the official protocol. Each object's mask is composited over a #999999 image, the result is
cropped to the box (PIL rounds the box to whole pixels), and CLIP ViT-L/14 classifies the crop zero-shot over
the ten GenEval colours. Crops go through OpenAI CLIP's own transform as open_clip's "openai" preprocess runs it
(torchvision's shortest-side bicubic resize and centre crop), not the transformers processor, whose crop offset
differs by a pixel on some of the crops' arbitrary shapes. Each colour's text embedding is the mean of the
L2-normalised embeddings of "a photo of a {c} {classname}", "a photo of a {c}-colored {classname}" and "a photo
of a {c} object", renormalised (clip_benchmark's zero_shot_classifier); the colour is the argmax of image . text.
Text embeddings are cached per class name. The official CLIP is open_clip's ViT-L-14 "openai"; the transformers
folder of the same weights (manifest entry "clip-vit-large-patch14") is used here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from soarbench.errors import UserError
from soarbench.geneval.backends import Backend
from soarbench.geneval.grammar import COLORS
from soarbench.geneval.rules import Detection
from soarbench.metrics.clipscore import HFClip, openai_clip_pixels, resolve_device
from soarbench.metrics.pixels import as_rgb
from soarbench.metrics.weights import locate

NAME = "mask2former-hf"
DEFAULT_MODEL = "mask2former-swin-s-coco"
DEFAULT_CLIP = "clip-vit-large-patch14"
BACKGROUND = "#999999"  # the official crops' background (the evaluator's default bgcolor "#999")
TEMPLATES = ("a photo of a {c} {classname}", "a photo of a {c}-colored {classname}", "a photo of a {c} object")
# COCO category names that GenEval's object_names.txt spells differently for the same class index.
GENEVAL_NAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
NON_OFFICIAL = "NON-OFFICIAL (transformers Mask2Former; the official detector is mmdetection's Mask2Former Swin-S)"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def geneval_name(label: str) -> str:
    """A detector label as GenEval names the class (mmdet 3.x's coco_classes() write "traffic_light")."""
    name = str(label).strip().replace("_", " ")
    return GENEVAL_NAMES.get(name, name)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x1, y1, x2, y2) of a boolean mask's extent, ends exclusive; None for an empty mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def masked_crop(image: Image.Image, obj: Detection) -> Image.Image:
    """The official colour crop: the object's mask composited over #999999, cropped to its box.

    Without a mask the image itself is cropped (as the official `ImageCrops` does).
    """
    if obj.mask is not None:
        mask = np.asarray(obj.mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask of shape {mask.shape} does not match the image ({image.height}, {image.width})")
        blank = Image.new("RGB", image.size, color=BACKGROUND)
        image = Image.composite(image, blank, Image.fromarray(mask))
    return image.crop(tuple(float(v) for v in obj.box[:4]))


def _image_processor(folder: Path):
    """The Mask2Former image processor of a folder, with the PIL backend where transformers has one."""
    try:
        from transformers import Mask2FormerImageProcessorPil as processor_class  # transformers >= 5
    except ImportError:  # transformers 4.x: Mask2FormerImageProcessor is the PIL implementation
        from transformers import Mask2FormerImageProcessor as processor_class
    return processor_class.from_pretrained(str(folder), local_files_only=True)


class HFMask2FormerDetector:
    """Instance detections of a transformers Mask2FormerForUniversalSegmentation (implements backends.Detector)."""

    def __init__(self, folder: Path, device: torch.device):
        from transformers import Mask2FormerForUniversalSegmentation

        if not folder.is_dir():
            raise UserError(f"{folder}: the Mask2Former model must be a folder (transformers layout)")
        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder), local_files_only=True)
            self.processor = _image_processor(folder)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a Mask2Former model from {folder}: {_first_line(e)}") from None
        self.device = device
        self.model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        n_classes = int(self.model.class_predictor.out_features) - 1  # the last logit is "no object"
        missing = [i for i in range(n_classes) if i not in id2label]
        if missing:
            raise UserError(f"{folder}: config.id2label has no name for class ids {missing[:5]}")
        self.names = [geneval_name(id2label[i]) for i in range(n_classes)]
        self.classes: tuple[str, ...] = tuple(dict.fromkeys(self.names))

    @torch.no_grad()
    def detect(self, image: Any) -> list[Detection]:
        pil = as_rgb(image)
        size = (pil.height, pil.width)
        inputs = self.processor(images=[pil], return_tensors="pt")
        pixel_mask = inputs.get("pixel_mask")
        outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device, torch.float32),
                             pixel_mask=None if pixel_mask is None else pixel_mask.to(self.device))
        # One image per call, so the processor resizes (to a multiple of its size_divisor) and never pads: the
        # mask logits cover exactly the image. Post-processing runs on the CPU, where the processor builds its maps.
        outputs.class_queries_logits = outputs.class_queries_logits.float().cpu()
        outputs.masks_queries_logits = outputs.masks_queries_logits.float().cpu()
        result = self.processor.post_process_instance_segmentation(
            outputs, threshold=0.0, target_sizes=[size], return_binary_maps=True
        )[0]
        segments = result["segments_info"]
        if not segments:
            return []
        maps = result["segmentation"].detach().cpu().numpy() > 0.5  # (n_instances, H, W)
        detections = []
        for info, mask in zip(segments, maps, strict=True):
            box = mask_box(mask)
            if box is None:
                continue
            detections.append(Detection(self.names[int(info["label_id"])], float(info["score"]), box, mask))
        return detections


class ClipColorClassifier:
    """GenEval's zero-shot colour classifier on mask-composited crops (implements backends.ColorClassifier)."""

    def __init__(self, clip: HFClip):
        self.clip = clip
        self._text: dict[str, torch.Tensor] = {}

    def color_embeddings(self, classname: str) -> torch.Tensor:
        """(10, D) unit colour embeddings for a class: per-template unit embeddings averaged, renormalised."""
        if classname not in self._text:
            texts = [t.format(c=c, classname=classname) for c in COLORS for t in TEMPLATES]
            per_template = self.clip.embed_texts(texts).reshape(len(COLORS), len(TEMPLATES), -1)
            self._text[classname] = torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)
        return self._text[classname]

    def classify(self, image: Any, objects: Sequence[Detection], classname: str) -> list[str]:
        if not objects:
            return []
        pil = as_rgb(image)
        # open_clip's "openai" transform, as the official evaluator preprocesses its crops
        pixels = torch.stack([openai_clip_pixels(masked_crop(pil, obj), self.clip.image_size) for obj in objects])
        logits = self.clip.embed_pixels(pixels) @ self.color_embeddings(classname).T
        return [COLORS[int(i)] for i in logits.argmax(dim=-1)]


def make_backend(model: str = DEFAULT_MODEL, clip: str = DEFAULT_CLIP, device: str = "auto",
                 weights_root: str | None = None) -> Backend:
    """The "mask2former-hf" backend; `model` and `clip` are manifest names or paths to transformers folders."""
    torch_device = resolve_device(device)
    model_path, model_label = locate(model, weights_root)
    clip_path, clip_label = locate(clip, weights_root)
    return Backend(
        name=NAME,
        version=f"{NAME}-NON-OFFICIAL/{model_label}/clip:{clip_label}",
        detector=HFMask2FormerDetector(model_path, torch_device),
        color_classifier=ClipColorClassifier(HFClip(clip_path, device=torch_device)),
        needs=(NON_OFFICIAL, str(model_path), str(clip_path)),
    )
