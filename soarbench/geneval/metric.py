"""GenEval as a soarbench metric: official decision rules (soarbench.geneval.rules) over a pluggable backend.

    metric = GenEvalMetric(backend="shapes")            # exact detector of the shapes world
    records = metric.score(images, prompts, metadata)   # one official results row (+ score) per image
    metric.summarize(records)                           # {"geneval": ..., "geneval/counting": ..., ...}
    metric = GenEvalMetric(backend="mask2former", protocol="paper")   # the papers' detector input (below)

Options are the official `--options` that change decisions (threshold, counting_threshold, max_objects,
position_threshold) plus whatever the chosen backend's factory accepts (for "shapes": edge_tolerance, max_color_distance,
min_area). Each record carries the official row fields (tag, prompt, correct, reason, metadata, details),
"score" (1.0 if correct else 0.0) and "partial_credit" (Flow-GRPO's dense reward; see rules.partial_credit).

Protocols. "official" hands the detector the RGB image as djghosh13/geneval does (it passes file paths, which
mmdet reads as BGR, as its models expect). "paper" reproduces the evaluation code behind the published
Flow-GRPO / DiffusionNFT / HY-SOAR tables, which hands mmdet an RGB array that mmdet takes for BGR: their
detector sees red and blue swapped. With a Mask2Former backend ("mask2former", "mask2former-hf") the detector
input is swapped here; the colour classifier (CLIP on the crops) still gets the true RGB image, as in those
pipelines. The "shapes" backend is the exact detector of the procedural shapes world, not a network trained on
BGR images, so the swap reproduces no published pipeline there: "paper" is accepted and recorded but changes
nothing for it.

Averages. summarize() reports both:
  "geneval"            official overall: the unweighted mean of the six task accuracies (GenEval's paper and
                       djghosh13/geneval's summary_scores.py);
  "geneval/paper_avg"  the image-level mean over all images (= "geneval/image_mean"), what the Flow-GRPO /
                       DiffusionNFT / HY-SOAR evaluation code averages and their tables' GenEval column shows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from soarbench.errors import UserError, did_you_mean
from soarbench.geneval.backends import backend_options, load_backend
from soarbench.geneval.rules import RuleConfig, evaluate_image, summarize
from soarbench.metrics.base import Metric, MetricInfo, check_protocol

# The commit of djghosh13/geneval whose rules and prompt generator are reproduced.
GENEVAL_COMMIT = "af4902f"
_RULE_FIELDS = {f.name: f for f in dataclasses.fields(RuleConfig)}
# Backends whose detector is the papers' mmdet / Mask2Former, fed BGR: "paper" swaps red and blue for them.
PAPER_SWAP_BACKENDS = ("mask2former", "mask2former-hf")


def _rule_config(options: Mapping[str, Any]) -> RuleConfig:
    """A RuleConfig from options given as numbers or as strings (as a command line passes them)."""
    values = {}
    for name, value in options.items():
        kind = type(getattr(RuleConfig(), name))
        try:
            values[name] = kind(value)
        except (TypeError, ValueError):
            raise UserError(f"GenEval option {name} must be a {kind.__name__}, got {value!r}") from None
    return RuleConfig(**values)


def _check_metadata(index: int, prompt: str, meta: Any) -> Mapping[str, Any]:
    if not isinstance(meta, Mapping) or not all(k in meta for k in ("tag", "include", "prompt")):
        raise UserError(f"GenEval image {index}: metadata must be a GenEval row with tag, include and prompt")
    # A shifted prompt/metadata pairing would silently score every image against the wrong question.
    if str(prompt).strip().lower() != str(meta["prompt"]).strip().lower():
        raise UserError(
            f"GenEval image {index}: prompt {prompt!r} does not match its metadata prompt {meta['prompt']!r}"
            " (are prompts and metadata in the same order?)"
        )
    return meta


class GenEvalMetric(Metric):
    """GenEval accuracy with the official rules; the backend supplies detection and colour naming."""

    reward_field = "partial_credit"  # Flow-GRPO trains on the dense partial credit, not the 0/1 score
    REWARDS = ("partial_credit", "score")

    def __init__(self, backend: str = "shapes", protocol: str = "official", reward: str = "partial_credit",
                 **options: Any):
        """`reward`: the record field a training reward takes, "partial_credit" (Flow-GRPO's dense reward) or
        "score" (the 0/1 accuracy GenEval reports: what a positive control trained on the reported metric uses;
        partial credit pays 0.75 for two objects in the wrong relation, so it can trade positions away)."""
        self.protocol = check_protocol("GenEval", protocol)
        if reward not in self.REWARDS:
            raise did_you_mean("GenEval reward", str(reward), self.REWARDS)
        self.reward_field = reward
        valid = [*_RULE_FIELDS, *backend_options(backend)]  # also rejects an unknown backend name
        for name in options:
            if name not in valid:
                raise did_you_mean("GenEval option", name, valid)
        self.rules = _rule_config({k: v for k, v in options.items() if k in _RULE_FIELDS})
        self.backend = load_backend(backend, **{k: v for k, v in options.items() if k not in _RULE_FIELDS})
        self.info = MetricInfo(
            name="geneval",
            version=f"geneval-rules-{GENEVAL_COMMIT}/{self.backend.version}"
                    + ("/paper-rb-swap" if self.swaps_detector_channels else ""),
            scale="accuracy in [0, 1]",
            higher_is_better=True,
            needs=list(self.backend.needs),
        )

    @property
    def swaps_detector_channels(self) -> bool:
        """True when the detector is handed the image with red and blue swapped (protocol "paper", Mask2Former)."""
        return self.protocol == "paper" and self.backend.name in PAPER_SWAP_BACKENDS

    def detector_input(self, rgb: np.ndarray) -> np.ndarray:
        """What the detector is handed: the RGB image, or (protocol "paper") its channels reversed."""
        return np.ascontiguousarray(rgb[..., ::-1]) if self.swaps_detector_channels else rgb

    def score(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        metadata: Sequence[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        if metadata is None:
            raise UserError("GenEval scores images against metadata rows (tag, include, prompt); none were given")
        if not len(images) == len(prompts) == len(metadata):
            raise UserError(
                f"GenEval needs one prompt and one metadata row per image; got {len(images)} images, "
                f"{len(prompts)} prompts, {len(metadata)} metadata rows"
            )
        detector, colors = self.backend.detector, self.backend.color_classifier
        records = []
        for index, (image, prompt, meta) in enumerate(zip(images, prompts, metadata)):
            meta = _check_metadata(index, prompt, meta)
            rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)[..., :3]
            row = evaluate_image(
                meta,
                detector.detect(self.detector_input(rgb)),
                image=rgb,
                color_classifier=colors,
                config=self.rules,
                class_order=detector.classes,
                with_partial_credit=True,
            )
            del row["filename"]  # the metric sees pixels, not files; the harness records where images live
            records.append({**row, "score": 1.0 if row["correct"] else 0.0})
        return records

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Flat numbers: overall (mean of task accuracies), per task, image-level mean (also under the name
        "geneval/paper_avg": the average the papers' tables show), prompts with any correct image."""
        summary = summarize(records)
        out = {"geneval": summary["overall"]}
        out.update({f"geneval/{tag}": acc for tag, acc in summary["tasks"].items()})
        out["geneval/image_mean"] = summary["image_mean"]
        out["geneval/paper_avg"] = summary["image_mean"]
        out["geneval/prompt_any_correct"] = summary["prompt_any_correct"]
        credits = [float(r["partial_credit"]) for r in records if "partial_credit" in r]
        if credits:
            out["geneval/partial_credit"] = sum(credits) / len(credits)
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": self.backend.name,
                "detector_input": "RGB with red and blue swapped (the papers' mmdet call)"
                if self.swaps_detector_channels else "RGB",
                "averages": {"geneval": "mean of the six task accuracies (official)",
                             "geneval/paper_avg": "image-level mean over all images (the papers' tables)"}}
