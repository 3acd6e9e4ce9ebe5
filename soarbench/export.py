"""`soarbench export CKPT --out DIR`: a checkpoint (or any model soarbench loads) as one whole diffusers folder.

A soarbench checkpoint holds only what training changed (the transformer, the text encoders when trained, a
merged LoRA's transformer) plus a record naming its base folder. The export loads it exactly as `soarbench eval`
does (SHA256SUMS verified, the LoRA already merged into the saved transformer) and writes every component of the
pipeline with `save_pretrained` into a temporary folder beside DIR, then renames it into place:

    DIR/model_index.json, scheduler/, vae/, text_encoder*/, tokenizer*/, transformer/   (diffusers' layout)
    DIR/soarbench_model.json   the T5 length the model was trained with (`soarbench eval --model DIR` reads it)
    DIR/SHA256SUMS             every file's sha256 (verified whenever soarbench loads DIR)

so that `DiffusionPipeline.from_pretrained(DIR)` (https://huggingface.co/docs/diffusers/using-diffusers/loading)
loads the trained model with nothing else on disk. Components not part of a diffusers pipeline (the actor-critic's
value head) are left out.

Every component is declared to load in float32 unless the caller passes `torch_dtype`: diffusers loads its models
in float32 by default, while transformers (5.x) loads a text encoder in the dtype its config.json records, so a
folder saved in fp16 would otherwise load mixed (an fp32 transformer fed fp16 text embeddings) and fail on the
first convolution. `--dtype` chooses how the weights are stored.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from soarbench.errors import UserError

STORAGE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def declare_float32_loading(folder: Path) -> list[str]:
    """Set `dtype` (and the older `torch_dtype`) to float32 in every component's config.json that records one.

    Weights keep their stored dtype; only the dtype a plain from_pretrained loads them in changes. Returns the
    components rewritten."""
    from soarbench.io import atomic_write_text

    changed = []
    for config in sorted(Path(folder).glob("*/config.json")):
        data = json.loads(config.read_text(encoding="utf-8"))
        keys = [k for k in ("dtype", "torch_dtype") if k in data and data[k] != "float32"]
        if keys:
            data.update({k: "float32" for k in keys})
            atomic_write_text(config, json.dumps(data, indent=2) + "\n")
            changed.append(config.parent.name)
    return changed


def export_pipeline(model: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Write `model` (a soarbench checkpoint or a pipeline folder) as a complete diffusers folder at `out`."""
    import torch

    from soarbench.io import atomic_write_text
    from soarbench.models.sd3 import MODEL_NOTE_FILE, SUMS_FILE, SD3Adapter, sha256sums_text

    if dtype not in STORAGE_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got '{dtype}'")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new --out (nothing is "
                        "overwritten)")
    adapter = SD3Adapter.from_pretrained(model, device="cpu", dtype=torch.float32)  # verifies SHA256SUMS
    pipe = adapter.pipe
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        pipe.to(getattr(torch, STORAGE_DTYPES[dtype])).save_pretrained(tmp, safe_serialization=True)
        declare_float32_loading(tmp)
        atomic_write_text(tmp / MODEL_NOTE_FILE,
                          json.dumps({"max_sequence_length": adapter.max_sequence_length}) + "\n")
        atomic_write_text(tmp / SUMS_FILE, sha256sums_text(tmp))
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
