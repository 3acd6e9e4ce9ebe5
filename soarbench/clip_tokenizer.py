"""CLIP's BPE tokenizer files built offline from the vocabulary that open_clip ships.

open_clip carries `bpe_simple_vocab_16e6.txt.gz` (the merges of OpenAI's CLIP tokenizer). Converted to
`vocab.json` + `merges.txt`, it loads as transformers' CLIPTokenizer with ids identical to OpenAI CLIP's, so the
tiny model needs no hub download. We locate the file without importing open_clip (that import is slow).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
_N_MERGES = CLIP_VOCAB_SIZE - 256 - 256 - 2  # byte tokens, byte tokens + "</w>", two specials


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters.

    Order matters: the vocabulary lists the printable bytes first, then the remapped ones.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    remapped = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(remapped)})
    return table


def open_clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: it ships the CLIP BPE vocabulary")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer_files(out_dir: Path, bpe_path: Path | None = None) -> None:
    """Write vocab.json and merges.txt for transformers' CLIPTokenizer."""
    bpe_path = bpe_path or open_clip_bpe_path()
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES]]
    base = list(_byte_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
