"""The SD3 / SD3.5 adapter: the one loader and the few calls the harness makes on a model.

The same class serves SD3.5-Medium from a local diffusers folder and the tiny shapes model; they differ only in
the files on disk. A fine-tuned checkpoint is a folder with `soarbench_checkpoint.json` naming its base model and
the components it replaces (the transformer, and the text encoders when they were trained), so evaluation loads
exactly what training saved.

Conventions (SD3, rectified flow): z_sigma = (1 - sigma) z0 + sigma z1, sigma = 1 is noise, the transformer
predicts v = z1 - z0 at timestep sigma * 1000, latents are (vae_latent - shift_factor) * scaling_factor.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from soarbench.errors import UserError

CHECKPOINT_FILE = "soarbench_checkpoint.json"
MODEL_NOTE_FILE = "soarbench_model.json"  # optional, in a base folder: {"max_sequence_length": N}
DEFAULT_MAX_SEQUENCE_LENGTH = 77
TRAINABLE_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
# saved beside the pipeline's components but not part of the pipeline: read by their own loaders (the actor-critic's
# value head: soarbench.models.value_head.load_steering)
EXTRA_COMPONENTS = ("value_head",)


@dataclass
class TextEmbeddings:
    """Prompt embeddings as SD3 consumes them: a token sequence and a pooled vector per prompt."""

    tokens: torch.Tensor  # (B, seq, joint_attention_dim)
    pooled: torch.Tensor  # (B, pooled_projection_dim)

    def __getitem__(self, idx) -> "TextEmbeddings":
        return TextEmbeddings(self.tokens[idx], self.pooled[idx])

    def to(self, *args, **kwargs) -> "TextEmbeddings":
        return TextEmbeddings(self.tokens.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(parts: Sequence["TextEmbeddings"]) -> "TextEmbeddings":
        return TextEmbeddings(torch.cat([p.tokens for p in parts]), torch.cat([p.pooled for p in parts]))

    def repeat(self, n: int) -> "TextEmbeddings":
        return TextEmbeddings(self.tokens.expand(n, *self.tokens.shape[1:]),
                              self.pooled.expand(n, *self.pooled.shape[1:]))


def resolve_model_folder(path: str | Path) -> tuple[Path, dict | None]:
    """(base pipeline folder, checkpoint record or None); a UserError for anything that is not a model.

    A checkpoint record names its base model relative to the checkpoint folder (`base_model`), so a run folder
    moved together with its base keeps working, and keeps the absolute path it was trained from
    (`base_model_absolute`) as a fallback for a run folder moved alone. A Hugging Face Hub id (owner/name[@rev])
    that is no local path is resolved to its cached snapshot (soarbench.hub)."""
    from soarbench.hub import local_model_path

    path = local_model_path(path)
    if not path.exists():
        raise UserError(f"{path}: model folder does not exist")
    if (path / CHECKPOINT_FILE).is_file():
        record = _read_record(path / CHECKPOINT_FILE)
        base_folder, _ = resolve_model_folder(_base_of(path, record))
        return base_folder, record
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path}: not a model folder (expected model_index.json of a diffusers SD3 pipeline, "
                        f"or {CHECKPOINT_FILE} of a soarbench checkpoint)")
    return path, None


def _read_record(file: Path) -> dict:
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not a valid checkpoint record ({e.__class__.__name__})") from None
    if not isinstance(record, dict) or not isinstance(record.get("base_model"), str) or \
            not isinstance(record.get("components"), list):
        raise UserError(f"{file}: expected a JSON object with 'base_model' (a path) and 'components' (a list)")
    return record


def _base_of(checkpoint: Path, record: dict) -> Path:
    """The base folder named by a checkpoint record: relative to the checkpoint first, then the absolute path."""
    named = Path(record["base_model"])
    candidates = [named if named.is_absolute() else (checkpoint.resolve() / named).resolve()]
    if record.get("base_model_absolute"):
        candidates.append(Path(record["base_model_absolute"]))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = " nor ".join(str(c) for c in dict.fromkeys(candidates))
    raise UserError(f"{checkpoint / CHECKPOINT_FILE}: its base model is missing: neither {tried} exists "
                    f"(move the base model with the run folder, or put it back at the absolute path)")


SUMS_FILE = "SHA256SUMS"
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def verify_sha256sums(folder: Path) -> int:
    """Check every file listed in folder/SHA256SUMS (sha256sum's format: '<hex>  <path>'); the number checked.

    Nothing to do where no SHA256SUMS ships. A missing or changed file is one UserError line naming it."""
    from soarbench.io import sha256_file

    sums = Path(folder) / SUMS_FILE
    if not sums.is_file():
        return 0
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{sums}: not UTF-8 text") from None
    checked = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        m = _SUM_LINE.match(line.rstrip("\r"))
        if m is None:
            raise UserError(f"{sums}:{lineno}: expected '<64 hex digits>  <file>', got {line[:80]!r}")
        expected, rel = m.group(1).lower(), m.group(2)
        target = Path(folder) / rel
        if not target.is_file():
            raise UserError(f"{target}: listed in {sums} (line {lineno}) but missing")
        actual = sha256_file(target)
        if actual != expected:
            raise UserError(f"{target}: sha256 {actual[:12]}... differs from {sums} line {lineno} "
                            f"({expected[:12]}...): the file is damaged or was changed")
        checked += 1
    return checked


def sha256sums_text(folder: Path, skip: tuple[str, ...] = ()) -> str:
    """SHA256SUMS for every file under `folder` (sorted relative paths; SHA256SUMS itself, `skip` and hidden entries
    left out), in the format verify_sha256sums reads."""
    from soarbench.io import sha256_file

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (SUMS_FILE, *skip)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))  # e.g. .cache/
    return "".join(f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)


def weights_fingerprint(path: str | Path) -> str:
    """One sha256 naming a model's content: its base folder's and, for a checkpoint, the checkpoint's files.

    A folder that ships SHA256SUMS contributes that file (from_pretrained verifies it against the files); one
    without is hashed file by file here (sha256 runs at about 1.7 GB/s on one core). Keyed to content, not to the
    path: a checkpoint replaced at the same path gets another fingerprint."""
    import hashlib

    from soarbench.hub import local_model_path

    path = local_model_path(path)
    base, record = resolve_model_folder(path)
    folders = [("base", base)] + ([("checkpoint", Path(path))] if record is not None else [])
    h = hashlib.sha256()
    for role, folder in folders:
        sums = folder / SUMS_FILE
        text = sums.read_text(encoding="utf-8") if sums.is_file() else sha256sums_text(folder)
        h.update(f"{role}\n{text}".encode("utf-8"))
    return h.hexdigest()


def recorded_sequence_length(base: Path, record: dict | None) -> int:
    """The T5 length a model was trained with: the checkpoint's record, else the base's soarbench_model.json,
    else 77; a recorded value that is not an integer >= 0 is one UserError line naming the file."""
    if record is not None and "max_sequence_length" in record:
        return _sequence_length(record["max_sequence_length"], f"{CHECKPOINT_FILE} of the checkpoint")
    note = base / MODEL_NOTE_FILE
    if note.is_file():
        try:
            data = json.loads(note.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{note}: not valid JSON (expected {{\"max_sequence_length\": N}})") from None
        if not isinstance(data, dict):
            raise UserError(f"{note}: expected a JSON object such as {{\"max_sequence_length\": 77}}")
        return _sequence_length(data.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH), str(note))
    return DEFAULT_MAX_SEQUENCE_LENGTH


def _sequence_length(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: max_sequence_length = {json.dumps(value)}: expected an integer >= 0")
    return value


_TOKENIZERS: dict[str, object] = {}  # "class:content digest" -> the tokenizer loaded from those files


def shared_tokenizers(base: Path, index: dict) -> dict[str, object]:
    """The pipeline's CLIP tokenizers, each parsed once per process and content: SD3's `tokenizer` and
    `tokenizer_2` are usually the same files (3.6 MB of tokenizer.json each, about 0.4 s to parse), and a process
    that loads a model folder many times (an experiment, the test suite) would parse them on every load. A
    tokenizer is only read (encoding a prompt never changes it), so one object serves every pipeline."""
    out = {}
    for name in ("tokenizer", "tokenizer_2"):
        library, class_name = (index.get(name) or [None, None])[:2]
        folder = base / name
        if library != "transformers" or not class_name or not folder.is_dir():
            continue
        digest = hashlib.sha256()
        for file in sorted(f for f in folder.iterdir() if f.is_file()):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        key = f"{class_name}:{digest.hexdigest()}"
        if key not in _TOKENIZERS:
            import transformers

            _TOKENIZERS[key] = getattr(transformers, class_name).from_pretrained(folder, local_files_only=True)
        out[name] = _TOKENIZERS[key]
    return out


class SD3Adapter:
    """Loads an SD3-family pipeline folder and exposes text encoding, VAE coding and the velocity model."""

    def __init__(self, pipe, max_sequence_length: int, source: Path, checkpoint: dict | None):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.source = source
        self.checkpoint = checkpoint
        self._null: TextEmbeddings | None = None
        from soarbench.meter import NULL_METER

        self.meter = NULL_METER  # the training loop installs its meter: passes are counted where they happen
        self.net = None  # the module velocity() calls by default (the engine-prepared policy); None: the transformer

    # ---- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, max_sequence_length: int | None = None,
                        load_t5: bool = True) -> "SD3Adapter":
        """max_sequence_length (T5 tokens) None: the length the model was trained with, as recorded in the
        checkpoint or the base folder's soarbench_model.json, else 77. Evaluating with another length than
        training changes the model's context (a defect of the reference code)."""
        from diffusers import StableDiffusion3Pipeline
        from diffusers.utils import logging as dlogging
        from transformers.utils import logging as tlogging

        from soarbench.hub import local_model_path

        path = local_model_path(path)  # a Hub id: its cached snapshot
        base, record = resolve_model_folder(path)
        verify_sha256sums(base)
        if record is not None:
            verify_sha256sums(Path(path))
        if max_sequence_length is None:
            max_sequence_length = recorded_sequence_length(base, record)
        index = json.loads((base / "model_index.json").read_text())
        extra = {}
        if not load_t5 or index.get("text_encoder_3", [None])[0] is None:
            extra = {"text_encoder_3": None, "tokenizer_3": None}
        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        tlogging.set_verbosity_error()
        tlogging.disable_progress_bar()
        extra.update(shared_tokenizers(base, index))
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(base, dtype=dtype, local_files_only=True, **extra)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{base}: could not load the SD3 pipeline ({str(e).splitlines()[0]})") from None
        if record is not None:
            cls._load_components(pipe, Path(path), record["components"], dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
            if module is not None:
                module.requires_grad_(False).eval()
        return cls(pipe, max_sequence_length, Path(path), record)

    @staticmethod
    def _load_components(pipe, folder: Path, components: Sequence[str], dtype: torch.dtype) -> None:
        for name in components:
            if name in EXTRA_COMPONENTS:
                continue
            if name not in TRAINABLE_COMPONENTS:
                raise UserError(f"{folder / CHECKPOINT_FILE}: unknown component '{name}'")
            module = getattr(pipe, name)
            try:
                loaded = type(module).from_pretrained(folder / name, dtype=dtype, local_files_only=True)
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"{folder / name}: could not load the checkpoint's {name} "
                                f"({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from None
            setattr(pipe, name, loaded)
            pipe.register_modules(**{name: loaded})

    def save_components(self, folder: Path, components: Sequence[str], base_model: Path, extra: dict,
                        modules: dict | None = None) -> None:
        """Write a checkpoint: the trained components plus a record naming the base folder.

        `modules` replaces a component's module (e.g. a LoRA model merged into a plain transformer)."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in components:
            module = (modules or {}).get(name) or getattr(self.pipe, name)
            module.save_pretrained(folder / name, safe_serialization=True)
        base = Path(base_model).resolve()
        # relative to the checkpoint (a sibling of `folder` when writing into a temporary folder: same depth)
        record = {"base_model": os.path.relpath(base, Path(folder).resolve()), "base_model_absolute": str(base),
                  "components": list(components),
                  "max_sequence_length": self.max_sequence_length, **extra}
        from soarbench.io import atomic_write_json

        atomic_write_json(folder / CHECKPOINT_FILE, record)

    # ---- parts -----------------------------------------------------------------------------------------
    @property
    def transformer(self):
        return self.pipe.transformer

    @transformer.setter
    def transformer(self, module) -> None:
        self.pipe.transformer = module

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return next(self.pipe.transformer.parameters()).device

    @property
    def latent_channels(self) -> int:
        return self.pipe.transformer.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        return (self.latent_channels, height // f, width // f)

    @property
    def scheduler_config(self) -> dict:
        return dict(self.pipe.scheduler.config)

    # ---- text ------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], grad: bool = False) -> TextEmbeddings:
        """SD3's own prompt encoding (both CLIPs' penultimate layers, T5 or its zeros, pooled CLIP outputs)."""
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            tokens, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device,
                num_images_per_prompt=1, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
        return TextEmbeddings(tokens, pooled)

    def null_embeddings(self) -> TextEmbeddings:
        """The empty prompt's embedding (not zeros), computed once: the unconditional branch of CFG."""
        if self._null is None:
            self._null = self.encode_prompts([""])
        return self._null

    # ---- latents ---------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] -> model latents (fp32 whatever the VAE's dtype), sampling the VAE posterior."""
        cfg = self.pipe.vae.config
        with torch.no_grad():
            dist = self.pipe.vae.encode(pixels.to(self.device, self.pipe.vae.dtype)).latent_dist
            latent = dist.sample(generator=generator).float()
        return (latent - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior, for caching when the pixels never change. fp32 whatever the VAE's
        dtype (a frozen VAE held in bf16): the latents, their noise and the loss's target stay fp32."""
        with torch.no_grad():
            dist = self.pipe.vae.encode(pixels.to(self.device, self.pipe.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def to_model_latents(self, vae_latents: torch.Tensor) -> torch.Tensor:
        cfg = self.pipe.vae.config
        return (vae_latents - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def decode(self, latents: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Model latents -> pixels in [-1, 1]. grad=True keeps the autograd graph from the pixels back to the
        latents (Direct-Align / SRPO backpropagate a reward through the decoder; the VAE's weights stay frozen).
        Counted as one VAE decode per image either way. The pixels come back in the latents' dtype (a VAE held in
        bf16 decodes fp32 latents to fp32 pixels, the reward's input)."""
        cfg = self.pipe.vae.config
        self.meter.add("vae_decodes", latents.shape[0])
        with contextlib.nullcontext() if grad else torch.no_grad():
            z = latents.to(self.pipe.vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            return self.pipe.vae.decode(z).sample.clamp(-1, 1).to(latents.dtype)

    # ---- velocity --------------------------------------------------------------------------------------
    def velocity(self, z: torch.Tensor, sigma: torch.Tensor, text: TextEmbeddings, net=None) -> torch.Tensor:
        """v_theta(z_sigma, sigma * 1000, text). `net` overrides the module (a role's, passed by
        soarbench.models.roles, the one place that chooses weights; samplers take a Velocity instead).

        Counted by the meter: a forward with gradient enabled is a forward+backward pass, one without is a no-grad
        forward, each per sample.

        A frozen copy held in another dtype than the policy (a bf16 reference under bf16 mixed precision) gets its
        inputs in its own dtype, the timestep in the policy's (bf16 would round sigma * 1000 to 8 significant bits
        before the sinusoidal embedding), and returns its velocity in the policy's dtype."""
        module = net if net is not None else (self.net if self.net is not None else self.pipe.transformer)
        self.meter.add("fwd_bwd" if torch.is_grad_enabled() else "no_grad_fwd", z.shape[0])
        dtype = own = self.pipe.transformer.dtype
        if net is not None and isinstance(getattr(net, "dtype", None), torch.dtype):
            own = net.dtype  # a diffusers module (a role's copy); wrappers (DDP, compile) are the policy
        sigma = sigma.reshape(-1).expand(z.shape[0]) if sigma.numel() == 1 else sigma.reshape(-1)
        out = module(hidden_states=z.to(own), timestep=(sigma * 1000).to(dtype),
                  encoder_hidden_states=text.tokens.to(own), pooled_projections=text.pooled.to(own),
                  return_dict=False)[0]
        return out if own == dtype else out.to(dtype)
