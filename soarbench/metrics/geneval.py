"""GenEval as a soarbench metric: official decision rules (soarbench.geneval.rules) over a pluggable backend.

    metric = GenEvalMetric(backend="shapes")            # exact detector of the shapes world
    records = metric.score(images, prompts, metadata)   # one official results row (+ score) per image
    metric.summarize(records)                           # {"geneval": ..., "geneval/counting": ..., ...}

Options are the official `--options` that change decisions (threshold, counting_threshold, max_objects,
position_threshold) plus whatever the chosen backend's factory accepts (for "shapes": max_color_distance,
min_area). Each record carries the official row fields (tag, prompt, correct, reason, metadata, details),
"score" (1.0 if correct else 0.0) and "partial_credit" (Flow-GRPO's dense reward; see rules.partial_credit).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from soarbench.errors import UserError, did_you_mean
from soarbench.geneval.backends import backend_options, load_backend
from soarbench.geneval.rules import RuleConfig, evaluate_image, summarize
from soarbench.metrics.base import Metric, MetricInfo

# The commit of djghosh13/geneval whose rules and prompt generator are reproduced.
GENEVAL_COMMIT = "af4902f"
_RULE_FIELDS = {f.name: f for f in dataclasses.fields(RuleConfig)}


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

    def __init__(self, backend: str = "shapes", **options: Any):
        valid = [*_RULE_FIELDS, *backend_options(backend)]  # also rejects an unknown backend name
        for name in options:
            if name not in valid:
                raise did_you_mean("GenEval option", name, valid)
        self.rules = _rule_config({k: v for k, v in options.items() if k in _RULE_FIELDS})
        self.backend = load_backend(backend, **{k: v for k, v in options.items() if k not in _RULE_FIELDS})
        self.info = MetricInfo(
            name="geneval",
            version=f"geneval-rules-{GENEVAL_COMMIT}/{self.backend.version}",
            scale="accuracy in [0, 1]",
            higher_is_better=True,
            needs=list(self.backend.needs),
        )

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
                detector.detect(rgb),
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
        """Flat numbers: overall (mean of task accuracies), per task, image-level mean, prompts with any hit."""
        summary = summarize(records)
        out = {"geneval": summary["overall"]}
        out.update({f"geneval/{tag}": acc for tag, acc in summary["tasks"].items()})
        out["geneval/image_mean"] = summary["image_mean"]
        out["geneval/prompt_any_correct"] = summary["prompt_any_correct"]
        credits = [float(r["partial_credit"]) for r in records if "partial_credit" in r]
        if credits:
            out["geneval/partial_credit"] = sum(credits) / len(credits)
        return out
