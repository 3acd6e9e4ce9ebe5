"""OCR accuracy, Flow-GRPO's protocol to the letter, over a pluggable OCR engine.

    metric = OCRMetric()                       # rapidocr (PP-OCR ONNX models shipped in its wheel)
    metric = OCRMetric(engine="paddleocr")     # the reference engine, PaddleOCR 2.x, when installed
    metric = OCRMetric(protocol="paper")       # the papers' engine: PaddleOCR 2.9.1 (required, no fallback)
    records = metric.score(images, prompts)    # [{"score", "target", "recognized", "distance", "engine"}, ...]

Protocol (flow_grpo/ocr.py):
  - target = the text between the first pair of double quotes of the prompt (`prompt.split('"')[1]`: with a
    single quote it is the rest of the prompt);
  - recognised text = every line the engine returns with confidence > 0, in reading order, joined with no
    separator;
  - both lowercased with spaces (" ") removed;
  - dist = 0 if the target is a substring of the recognised text, else their Levenshtein distance, capped at
    len(target); score = 1 - dist / len(target), in [0, 1];
  - an OCR failure (the engine raises) scores 0.
The pixels are handed to the engine as an RGB uint8 array, exactly as Flow-GRPO hands them to PaddleOCR (both
engines read arrays in OpenCV's BGR order, so the channel order the reference ran with is kept).

Engines. The reference is PaddleOCR 2.9.1 (lang "en", no angle classifier: en_PP-OCRv3 det, en_PP-OCRv4 rec,
its default drop_score 0.5). The default here is rapidocr 3.10, whose wheel ships PP-OCRv6 small det/rec ONNX
models and needs no download: run with no angle classifier, detector limit_type "max" / limit_side_len 960 (as
PaddleOCR; rapidocr's own defaults upscale small images and are ~20x slower) and text_score 0.5 (PaddleOCR's
drop_score). The two engines' models differ, so their numbers are close but not equal: the engine and its
models are part of the metric's version and of every record, and describe() names them ("engine_models").

Protocols: "official" runs the chosen engine (rapidocr unless told otherwise); "paper" is the Flow-GRPO
evaluation as published and therefore requires the paddleocr engine (a UserError with its install line when
paddleocr is absent, or when another engine is asked for).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from soarbench.errors import UserError, did_you_mean
from soarbench.metrics.base import Metric, MetricInfo, check_protocol
from soarbench.metrics.clipscore import check_pairs
from soarbench.metrics.pixels import as_rgb

RAPIDOCR_INSTALL = "pip install rapidocr==3.10.* onnxruntime"
PADDLEOCR_INSTALL = "pip install paddleocr==2.9.1 paddlepaddle"

# ------------------------------------------------------------------------------------- the protocol, pure


def target_text(prompt: str) -> str:
    """The text between the first pair of double quotes (the rest of the prompt after a lone quote)."""
    parts = str(prompt).split('"')
    if len(parts) < 2:
        raise UserError(f"OCR prompts give the text to render in double quotes; this one has none: {prompt!r}")
    return parts[1]


def normalize(text: str) -> str:
    """Lowercase, spaces removed (only " ", as the reference)."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit-cost insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def join_lines(lines: Sequence[tuple[str, float]]) -> str:
    """The recognised lines with confidence > 0, in the engine's (reading) order, with no separator."""
    return "".join(text for text, confidence in lines if confidence > 0)


def ocr_score(recognized: str, target: str) -> tuple[float, int]:
    """(score, capped distance) of recognised text against a prompt's target, both raw (normalised here)."""
    recognized, target = normalize(recognized), normalize(target)
    if not target:
        raise UserError("OCR target text is empty once spaces are removed; the score would divide by zero")
    distance = 0 if target in recognized else min(levenshtein(recognized, target), len(target))
    return 1.0 - distance / len(target), distance


# ---------------------------------------------------------------------------------------------- engines


class RapidOCREngine:
    """rapidocr with its bundled PP-OCR ONNX models, configured like PaddleOCR's English pipeline."""

    name = "rapidocr"

    def __init__(self, device: str = "cpu", threads: int | None = None, det_limit_side_len: int = 960,
                 det_limit_type: str = "max", text_score: float = 0.5):
        try:
            from rapidocr import RapidOCR
        except ImportError:
            raise UserError(f"OCR engine 'rapidocr' is not installed: {RAPIDOCR_INSTALL}") from None
        from importlib.metadata import version

        if det_limit_type not in ("max", "min"):
            raise UserError(f"det_limit_type must be 'max' or 'min', got {det_limit_type!r}")
        params: dict[str, Any] = {
            "Global.use_cls": False,
            "Global.text_score": float(text_score),
            "Global.log_level": "error",
            "Det.lang_type": "en",
            "Rec.lang_type": "en",
            "Det.limit_type": det_limit_type,
            "Det.limit_side_len": int(det_limit_side_len),
            "EngineConfig.onnxruntime.use_cuda": str(device).startswith("cuda"),
        }
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise UserError(f"threads must be a positive integer, got {threads!r}")
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
            params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
        self._ocr = RapidOCR(params=params)
        self.version = version("rapidocr")
        self.models = self._model_names()
        self.settings = {"det_limit_type": det_limit_type, "det_limit_side_len": int(det_limit_side_len),
                         "text_score": float(text_score), "use_cls": False}
        self.tag = f"det-{det_limit_type}{int(det_limit_side_len)}-score{float(text_score):g}"

    def _model_names(self) -> dict[str, str]:
        """The ONNX files rapidocr resolves for det and rec (through its own model table)."""
        try:
            from rapidocr.inference_engine.base import FileInfo, InferSession
        except ImportError:
            return {"det": "unknown", "rec": "unknown"}
        names = {}
        for task in ("Det", "Rec"):
            cfg = self._ocr.cfg[task]
            try:
                info = InferSession.get_model_url(FileInfo(
                    engine_type=cfg.engine_type, ocr_version=cfg.ocr_version, task_type=cfg.task_type,
                    lang_type=cfg.lang_type, model_type=cfg.model_type))
                names[task.lower()] = Path(str(info["model_dir"])).name
            except (KeyError, ValueError, AttributeError):
                names[task.lower()] = "unknown"
        return names

    def read(self, rgb: np.ndarray) -> list[tuple[str, float]]:
        result = self._ocr(rgb)
        texts, scores = getattr(result, "txts", None), getattr(result, "scores", None)
        if not texts:
            return []
        return [(str(t), float(s)) for t, s in zip(texts, scores, strict=True)]


class PaddleOCREngine:
    """PaddleOCR 2.x exactly as Flow-GRPO builds it: lang "en", no angle classifier."""

    name = "paddleocr"

    def __init__(self, device: str = "cpu"):
        try:
            import paddleocr
        except ImportError:
            raise UserError(f"OCR engine 'paddleocr' is not installed: {PADDLEOCR_INSTALL}") from None
        self.version = str(getattr(paddleocr, "__version__", "unknown"))
        if not self.version.startswith("2."):
            raise UserError(f"OCR engine 'paddleocr' {self.version} is installed; the reference protocol uses the "
                            f"2.x API and models: {PADDLEOCR_INSTALL}")
        self._ocr = paddleocr.PaddleOCR(use_angle_cls=False, lang="en", use_gpu=str(device).startswith("cuda"),
                                        show_log=False)
        args = getattr(self._ocr, "args", None)
        self.models = {"det": Path(str(getattr(args, "det_model_dir", "unknown"))).name,
                       "rec": Path(str(getattr(args, "rec_model_dir", "unknown"))).name}
        self.settings = {"lang": "en", "use_angle_cls": False,
                         "drop_score": float(getattr(args, "drop_score", 0.5))}
        self.tag = f"en-nocls-score{self.settings['drop_score']:g}"

    def read(self, rgb: np.ndarray) -> list[tuple[str, float]]:
        result = self._ocr.ocr(rgb, cls=False)
        lines = result[0] if result else None
        return [(str(text), float(confidence)) for _box, (text, confidence) in (lines or [])]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


ENGINES = {"rapidocr": RapidOCREngine, "paddleocr": PaddleOCREngine}
# What each engine's models are, in words, for describe() (the file names are in engine.models).
ENGINE_MODELS = {"rapidocr": "PP-OCRv6 small det + rec (ONNX, shipped in the rapidocr wheel)",
                 "paddleocr": "en_PP-OCRv3 det + en_PP-OCRv4 rec (PaddleOCR 2.9.1, lang en, no angle classifier)"}


# -------------------------------------------------------------------------------------------------- metric


class OCRMetric(Metric):
    """Flow-GRPO's OCR score. `weights_root` is accepted like every metric's; the OCR models ship inside the
    engine's package, so it is not used."""

    def __init__(self, engine: str | None = None, weights_root: str | None = None, device: str = "cpu",
                 protocol: str = "official", **engine_options: Any):
        self.protocol = check_protocol("OCR", protocol)
        if engine is None:
            engine = "paddleocr" if protocol == "paper" else "rapidocr"
        if engine not in ENGINES:
            raise did_you_mean("OCR engine", engine, ENGINES)
        if protocol == "paper" and engine != "paddleocr":
            raise UserError(f"OCR protocol 'paper' runs the papers' engine, paddleocr, not '{engine}' "
                            f"(drop the engine option; install it with: {PADDLEOCR_INSTALL})")
        if protocol == "paper" and not _installed("paddleocr"):
            raise UserError(f"OCR protocol 'paper' needs the paddleocr engine, which is not installed: "
                            f"{PADDLEOCR_INSTALL}")
        try:
            self.engine = ENGINES[engine](device=device, **engine_options)
        except TypeError as e:
            raise UserError(f"OCR engine '{engine}': {e}") from None
        models = "+".join(Path(m).stem for m in self.engine.models.values())
        self.engine_label = f"{self.engine.name}-{self.engine.version}"
        self.info = MetricInfo(
            name="ocr",
            version=f"flow-grpo-ocr/{self.engine_label}/{models}/{self.engine.tag}",
            scale="1 - capped Levenshtein distance / len(target), in [0, 1]",
            higher_is_better=True,
            needs=[f"{self.engine.name} ({RAPIDOCR_INSTALL if engine == 'rapidocr' else PADDLEOCR_INSTALL})"],
        )

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str],
              metadata: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        check_pairs("OCR", images, prompts)
        targets = [target_text(p) for p in prompts]  # bad prompts fail before any OCR runs
        for index, target in enumerate(targets):
            if not normalize(target):
                raise UserError(f"OCR prompt {index}: the quoted text is empty once spaces are removed: "
                                f"{prompts[index]!r}")
        records = []
        for image, target in zip(images, targets, strict=True):
            try:
                recognized = join_lines(self.engine.read(np.asarray(as_rgb(image))))
            except Exception as e:  # the reference's "OCR failure": the image scores 0
                records.append({"score": 0.0, "target": target, "recognized": None,
                                "distance": len(normalize(target)), "engine": self.engine_label,
                                "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            score, distance = ocr_score(recognized, target)
            records.append({"score": score, "target": target, "recognized": recognized, "distance": distance,
                            "engine": self.engine_label})
        return records

    def summarize(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        if not records:
            return {"ocr": float("nan")}
        scores = [float(r["score"]) for r in records]
        out = {"ocr": sum(scores) / len(scores), "ocr/exact": sum(s == 1.0 for s in scores) / len(scores)}
        failures = sum("error" in r for r in records)
        if failures:
            out["ocr/failures"] = float(failures)
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "engine": self.engine.name, "engine_version": self.engine.version,
                "engine_models": ENGINE_MODELS.get(self.engine.name, "unknown"),
                "models": dict(self.engine.models), "settings": dict(self.engine.settings)}
