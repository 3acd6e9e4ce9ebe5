"""The papers' prompt sets: pinned public sources, hash-checked local copies, and their parsers.

Every set is one file in a public GitHub repository at a pinned commit, with its sha256:

    fetch("ocr")              # download once from raw.githubusercontent.com (sha256-checked, atomic)
    prompt_file("ocr")        # the local copy, rehashed on every call
    load_prompts("ocr")       # 1018 prompts, one per line
    load_metadata("geneval")  # the 553 official GenEval rows

Where local copies live, searched in this order by `prompt_file` (the first file found must match its hash):

1. $SOARBENCH_DATA, when set (the folder that holds the files themselves);
2. the cache, ~/.cache/soarbench/prompts;
3. ../shared/data/prompts next to the repository (development checkouts and the tests).

`fetch` writes to $SOARBENCH_DATA when set, else to the cache. A file that is missing everywhere is a UserError
naming the command that fixes it (`soarbench data fetch NAME`); a file whose hash differs is a UserError naming
the file and both hashes.

Text sets have one prompt per line. A line ends at "\\n" (a "\\r\\n" ending is accepted too); nothing else is
stripped, so a prompt keeps its spaces and punctuation exactly. A final line terminator does not start an extra
prompt. A blank line is refused (a UserError naming file:line): none of the pinned files has one, and in a
prompts file that pairs prompts with images line by line an empty prompt is a mistake, not a prompt. (Flow-GRPO
and DiffusionNFT `strip()` each line; on the pinned files that changes nothing, as no line has surrounding
whitespace.)
"""
from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soarbench.errors import UserError, did_you_mean
from soarbench.io import atomic_write_bytes, atomic_write_text

ENV_DATA = "SOARBENCH_DATA"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEV_DIR = REPO_ROOT.parent / "shared" / "data" / "prompts"

GENEVAL_KIND = "geneval-metadata"  # GenEval metadata jsonl: one row (tag, include, [exclude,] prompt) per line
LINES_KIND = "lines"  # plain text: one prompt per line

_GENEVAL = ("djghosh13/geneval", "af4902f24d3ca90ebbb446dd9891a59e0f82725f")
_FLOW_GRPO = ("yifan123/flow_grpo", "ac4c86e8cae021841f1fde853d340e0db67690dd")
_DIFFUSION_NFT = ("NVlabs/DiffusionNFT", "24af5554898d85e93efa492f42b5e9cdf4156e9b")
_MAX_BYTES = 32 << 20  # far above any pinned file (the largest is 0.3 MB); a guard against a runaway server


@dataclass(frozen=True)
class PromptSet:
    name: str
    file: str  # the local file name (the same in every search folder)
    repository: str  # GitHub owner/name
    commit: str
    path: str  # inside the repository
    sha256: str
    kind: str  # GENEVAL_KIND | LINES_KIND
    rows: int  # lines (prompts, or metadata rows) in the file
    description: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repository}/{self.commit}/{self.path}"

    def command(self) -> str:
        return f"soarbench data fetch {self.name}"

    def provenance(self) -> dict[str, Any]:
        """What a result records about the prompts it was scored on."""
        return {"prompt_set": self.name, "sha256": self.sha256, "repository": self.repository,
                "commit": self.commit, "path": self.path}


def _entry(name: str, file: str, source: tuple[str, str], path: str, sha256: str, kind: str, rows: int,
           description: str) -> tuple[str, PromptSet]:
    return name, PromptSet(name, file, source[0], source[1], path, sha256, kind, rows, description)


PROMPT_SETS: dict[str, PromptSet] = dict([
    _entry("geneval", "geneval_evaluation_metadata.jsonl", _GENEVAL, "prompts/evaluation_metadata.jsonl",
           "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13", GENEVAL_KIND, 553,
           "GenEval's official metadata: 553 prompts over six tasks, 4 images each"),
    _entry("geneval_object_names", "geneval_object_names.txt", _GENEVAL, "prompts/object_names.txt",
           "608f6a0e5c8ca1c7a92b818430141fe268c85b7930b50f4160f1d65893b5bacd", LINES_KIND, 80,
           "the 80 COCO class names GenEval's prompts are generated from"),
    _entry("geneval_flowgrpo", "flowgrpo_geneval_test_metadata.jsonl", _FLOW_GRPO,
           "dataset/geneval/test_metadata.jsonl",
           "cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28", GENEVAL_KIND, 2212,
           "Flow-GRPO's GenEval test file: each official row 4 times, shuffled"),
    _entry("ocr", "flowgrpo_ocr_test.txt", _FLOW_GRPO, "dataset/ocr/test.txt",
           "4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc", LINES_KIND, 1018,
           "Flow-GRPO's OCR test prompts (the text to render is between the first double quotes)"),
    _entry("pickscore", "flowgrpo_pickscore_test.txt", _FLOW_GRPO, "dataset/pickscore/test.txt",
           "d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262", LINES_KIND, 2048,
           "Flow-GRPO's PickScore test prompts (Pick-a-Pic)"),
    _entry("drawbench", "diffusionnft_drawbench_test.txt", _DIFFUSION_NFT, "dataset/drawbench/test.txt",
           "9006b98feabb94b28a2bc0c88de42fd4f31a9ec3c2a19e308a02c5385b7172f0", LINES_KIND, 1000,
           "DiffusionNFT's DrawBench test file: 200 prompts, 5 lines each"),
])


def names() -> list[str]:
    return list(PROMPT_SETS)


def get(name: str) -> PromptSet:
    if name not in PROMPT_SETS:
        raise did_you_mean("prompt set", name, PROMPT_SETS)
    return PROMPT_SETS[name]


# ---------------------------------------------------------------------------------------------------- folders


def cache_dir() -> Path:
    return Path.home() / ".cache" / "soarbench" / "prompts"


def data_dir() -> Path:
    """Where `fetch` writes: $SOARBENCH_DATA when set, else the cache."""
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else cache_dir()


def search_dirs() -> list[Path]:
    """The folders `prompt_file` looks in, in order."""
    env = os.environ.get(ENV_DATA)
    dirs = [Path(env).expanduser()] if env else []
    return [*dirs, cache_dir(), DEV_DIR]


# ---------------------------------------------------------------------------------------------------- files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_error(what: str, actual: str, ps: PromptSet, fix: str) -> UserError:
    return UserError(f"{what} has sha256 {actual}, expected {ps.sha256} (prompt set '{ps.name}'); {fix}")


def _read_checked(path: Path, ps: PromptSet) -> bytes:
    data = path.read_bytes()
    actual = _sha256(data)
    if actual != ps.sha256:
        raise _hash_error(str(path), actual, ps, f"delete it and run `{ps.command()}`")
    return data


def _find(ps: PromptSet) -> Path:
    for folder in search_dirs():
        path = folder / ps.file
        if path.is_file():
            return path
    raise UserError(f"prompt set '{ps.name}' ({ps.file}) is not downloaded; run `{ps.command()}`, {by_hand(ps)}")


def by_hand(ps: PromptSet, dest_dir: Path | None = None) -> str:
    """Where to put a prompt set's file without soarbench's download (an offline machine)."""
    where = (dest_dir if dest_dir is not None else data_dir()) / ps.file
    return f"or place the file by hand: download {ps.url} elsewhere and copy it to {where} (sha256 {ps.sha256})"


def prompt_file(name: str) -> Path:
    """The local copy of a prompt set (see the module docstring for where it is looked for), hash-checked."""
    ps = get(name)
    path = _find(ps)
    _read_checked(path, ps)
    return path


def fetch(name: str, dest_dir: str | os.PathLike | None = None, *, url: str | None = None,
          timeout: float = 60.0) -> Path:
    """Download a prompt set into `dest_dir` (default: `data_dir()`) unless a good copy is already there.

    The bytes are hashed before anything is written; a mismatch is a UserError naming the file, the expected
    and the actual hash, and leaves nothing behind. The file is then written atomically. `url` replaces the
    pinned source (a mirror); the pinned hash is enforced all the same.
    """
    ps = get(name)
    dest = Path(dest_dir).expanduser() if dest_dir is not None else data_dir()
    path = dest / ps.file
    if path.is_file() and _sha256(path.read_bytes()) == ps.sha256:
        return path
    source = url or ps.url
    request = urllib.request.Request(source, headers={"User-Agent": "soarbench"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(_MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise UserError(f"download of {ps.file} from {source} failed: HTTP {e.code} {e.reason}; "
                        f"{by_hand(ps, dest)}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"download of {ps.file} from {source} failed: the network or the server is unreachable "
                        f"({reason}); run the command again to retry, {by_hand(ps, dest)}") from None
    if len(data) > _MAX_BYTES:
        raise UserError(f"download of {ps.file} from {source} refused: more than {_MAX_BYTES} bytes")
    actual = _sha256(data)
    if actual != ps.sha256:
        raise _hash_error(f"{ps.file} downloaded from {source}", actual, ps, "nothing was written")
    atomic_write_bytes(path, data)
    return path


# ---------------------------------------------------------------------------------------------------- parsers


def read_prompt_lines(path: str | os.PathLike) -> list[str]:
    """One prompt per line, exactly as written (only the "\\n" or "\\r\\n" ending is removed).

    A final line ending does not start an extra prompt; a blank line is a UserError naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    prompts = []
    for lineno, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            raise UserError(f"{path}:{lineno}: blank line (one prompt per line; remove it)")
        prompts.append(line)
    return prompts


def load_prompts(name: str) -> list[str]:
    """A set's prompts in file order: one per line of a text set, one per row of a GenEval set."""
    ps = get(name)
    if ps.kind == GENEVAL_KIND:
        return [row["prompt"] for row in load_metadata(name)]
    return read_prompt_lines(prompt_file(name))


def load_metadata(name: str) -> list[dict[str, Any]]:
    """The rows of a GenEval metadata set, in file order."""
    from soarbench.geneval import grammar

    ps = get(name)
    if ps.kind != GENEVAL_KIND:
        valid = [n for n, p in PROMPT_SETS.items() if p.kind == GENEVAL_KIND]
        raise UserError(f"prompt set '{name}' has no GenEval metadata (sets that do: {', '.join(valid)})")
    return grammar.load_metadata(prompt_file(name))


def write_geneval_metadata(out: str | os.PathLike) -> tuple[Path, str, bool]:
    """Regenerate GenEval's evaluation_metadata.jsonl with the grammar module (from the pinned COCO names).

    Written atomically; returns (path, sha256 of the written bytes, whether it equals the pinned file's).
    """
    from soarbench.geneval import grammar

    classes = read_prompt_lines(prompt_file("geneval_object_names"))
    text = grammar.dumps_metadata(grammar.generate_metadata(classes, seed=43, n=100))
    out = Path(out)
    atomic_write_text(out, text)
    digest = _sha256(text.encode("utf-8"))
    return out, digest, digest == get("geneval").sha256
