"""Training data in the HY-SOAR JSONL format, bucketed batches, disjoint rank shards.

One object per line: {"md5": "<hash>", "caption_en": "A photo of ...", "bw": 512, "bh": 512}; the image is
<image_dir>/<md5>.jpg (or .png). Lines with an empty caption are skipped; a caption that is itself a JSON string
yields its first non-empty long_caption / medium_caption / short_caption / text. Images are resized to cover the
(bw, bh) bucket, randomly cropped, optionally flipped, normalised to [-1, 1]. Every global batch comes from one
bucket; rank r takes its own slice, so shards never overlap.

When nothing random touches the pixels (no flip, every image already at its bucket size) the VAE posterior of
each image is computed once and sampled per step: identical in distribution to encoding every step, and far
cheaper on small worlds. Frozen text encoders likewise encode each caption once.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from soarbench.errors import UserError
from soarbench.rng import key_seed, keyed_rand, keyed_randn
from soarbench.io import read_jsonl
from soarbench.methods.base import Batch
from soarbench.models.sd3 import SD3Adapter, TextEmbeddings

CAPTION_KEYS = ("long_caption", "medium_caption", "short_caption", "text")


@dataclass
class Record:
    image: Path
    caption: str
    bw: int
    bh: int
    where: str  # "file:line", for error messages
    geneval: dict | None = None  # the GenEval row (tag, include, exclude) when the line carries one


def caption_of(raw) -> str:
    """caption_en, or the first non-empty known field when caption_en holds a JSON object as a string."""
    if not isinstance(raw, str):
        return ""
    text = raw.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(obj, dict):
            for key in CAPTION_KEYS:
                value = obj.get(key)
                if isinstance(value, str) and value.strip():
                    return value.strip()
            return ""
    return text


def read_records(jsonl: str | Path, image_dir: str | Path | None = None) -> list[Record]:
    jsonl = Path(jsonl)
    image_dir = Path(image_dir) if image_dir else jsonl.parent / "images"
    records = []
    for lineno, obj in read_jsonl(jsonl, required=("md5", "caption_en")):
        where = f"{jsonl}:{lineno}"
        raw = obj["caption_en"]
        if not isinstance(raw, str):  # a number, list, null or object is a broken line, not an empty caption
            kind = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list",
                    dict: "an object"}.get(type(raw), type(raw).__name__)
            raise UserError(f"{where}: field 'caption_en' = {json.dumps(raw)[:60]} is {kind}: expected a string "
                            f"(the caption, or a JSON caption object written as a string)")
        if raw.strip().startswith("{"):
            try:
                inner = json.loads(raw)
            except json.JSONDecodeError:
                inner = None  # text that merely starts with a brace is a plain caption
            if isinstance(inner, dict) and not any(k in inner for k in CAPTION_KEYS):
                raise UserError(f"{where}: field 'caption_en' holds a JSON object without any of "
                                f"{', '.join(CAPTION_KEYS)}")
        if not isinstance(obj["md5"], str) or not obj["md5"].strip():
            raise UserError(f"{where}: field 'md5' = {json.dumps(obj['md5'])[:60]}: expected the image's file name "
                            f"stem as a non-empty string")
        caption = caption_of(raw)
        if not caption:
            continue
        try:
            bw, bh = int(obj.get("bw", 0)), int(obj.get("bh", 0))
        except (TypeError, ValueError):
            raise UserError(f"{where}: fields 'bw' and 'bh' must be integers") from None
        if bw <= 0 or bh <= 0:
            raise UserError(f"{where}: fields 'bw' and 'bh' must be positive integers (the bucket size)")
        image = next((image_dir / f"{obj['md5']}{ext}" for ext in (".jpg", ".png")
                      if (image_dir / f"{obj['md5']}{ext}").is_file()), None)
        if image is None:
            raise UserError(f"{where}: image '{obj['md5']}' is missing: neither {image_dir / (obj['md5'] + '.jpg')} "
                            f"nor {image_dir / (obj['md5'] + '.png')} exists")
        row = None
        if "tag" in obj and "include" in obj:  # a GenEval-style line: an online method can score it
            row = {"tag": obj["tag"], "include": obj["include"], "prompt": caption}
            if obj.get("exclude"):
                row["exclude"] = obj["exclude"]
        records.append(Record(image, caption, bw, bh, where, row))
    if not records:
        raise UserError(f"{jsonl}: no usable lines (every caption is empty)")
    return records


def load_pixels(rec: Record, rng: random.Random, random_flip: bool) -> torch.Tensor:
    """Resize to cover the bucket, random crop, optional flip; (3, bh, bw) in [-1, 1].

    The file is read by soarbench.images.load_rgb: 16-bit, palette, alpha and CMYK images become the RGB a viewer
    shows (alpha over white); a mode without a faithful RGB reading is refused naming the line and file."""
    from soarbench.images import load_rgb

    im = load_rgb(rec.image, where=rec.where)
    scale = max(rec.bw / im.width, rec.bh / im.height)
    if scale != 1.0 or im.size != (rec.bw, rec.bh):
        size = (max(rec.bw, round(im.width * scale)), max(rec.bh, round(im.height * scale)))
        if size != im.size:
            im = im.resize(size, Image.BICUBIC)
        left = rng.randint(0, im.width - rec.bw)
        top = rng.randint(0, im.height - rec.bh)
        im = im.crop((left, top, left + rec.bw, top + rec.bh))
    if random_flip and rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def image_size(rec: Record) -> tuple[int, int]:
    try:
        with Image.open(rec.image) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{rec.where}: cannot read image {rec.image} ({e.__class__.__name__})") from None


class BucketSampler:
    """Global batches of size batch * world from one bucket at a time; the same order on every rank."""

    def __init__(self, records: list[Record], global_batch: int, seed: int):
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(records):
            self.buckets.setdefault((r.bw, r.bh), []).append(i)
        if all(len(v) < global_batch for v in self.buckets.values()):
            raise UserError(f"data: every bucket holds fewer than one global batch ({global_batch} images)")
        self.global_batch, self.seed = global_batch, seed
        self.epoch, self._queue = 0, []

    def _refill(self) -> None:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        batches = []
        for key in sorted(self.buckets):
            idx = list(self.buckets[key])
            rng.shuffle(idx)
            batches += [idx[i:i + self.global_batch] for i in range(0, len(idx) - self.global_batch + 1,
                                                                    self.global_batch)]
        rng.shuffle(batches)
        self._queue = batches
        self.epoch += 1

    def next(self) -> list[int]:
        if not self._queue:
            self._refill()
        return self._queue.pop()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "queue": self._queue}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._queue = state["epoch"], [list(b) for b in state["queue"]]


class ImageData:
    """Data batches for methods that train on images (source "images"): each optimizer step's global batch.

    The global batch of unit u comes from the bucket sampler (the same on every process); process r takes the
    slots r, W + r, 2W + r, ... (one per accumulation slot), each `batch_size` samples. A sample's crop, flip,
    VAE posterior draw and caption dropout are keyed by (seed, unit, its position in the global batch), so the
    batch a slot sees does not depend on how many processes share the work.
    """

    def __init__(self, records: list[Record], adapter: SD3Adapter, engine, shape, seed: int,
                 random_flip: bool = False, train_text: bool = False, caption_dropout: float = 0.0,
                 text_cache: str = "auto", cache_latents: bool = True):
        self.records, self.adapter, self.engine, self.shape, self.seed = records, adapter, engine, shape, seed
        self.random_flip, self.train_text, self.caption_dropout = random_flip, train_text, float(caption_dropout)
        self.sampler = BucketSampler(records, shape.global_batch, seed)
        self._posterior: tuple[torch.Tensor, torch.Tensor] | None = None
        self._text_cache: dict[str, TextEmbeddings] = {}
        if cache_latents and not random_flip and all(image_size(r) == (r.bw, r.bh) for r in records):
            self._posterior = self._encode_all()
        if not train_text and text_cache != "none":
            self._fill_text_cache(text_cache)

    @property
    def holds_text_cache(self) -> bool:
        """Whether every caption's embedding (and the empty one's) is read from memory, not encoded."""
        return bool(self._text_cache)

    def _encode_all(self, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor] | None:
        sizes = {(r.bw, r.bh) for r in self.records}
        if len(sizes) != 1:
            return None  # mixed buckets: encode per batch
        means, stds = [], []
        for i in range(0, len(self.records), chunk):
            px = torch.stack([load_pixels(r, random.Random(0), False) for r in self.records[i:i + chunk]])
            m, s = self.adapter.posterior(px)
            means.append(m)
            stds.append(s)
        return torch.cat(means), torch.cat(stds)

    def _fill_text_cache(self, mode: str, chunk: int = 64, max_bytes: float = 2e9) -> None:
        """Encode every caption once, in fixed chunks of the sorted captions: the embeddings then depend on the
        data alone, never on which captions shared a batch (so a resumed run is bit-identical)."""
        captions = sorted({r.caption for r in self.records} | {""})
        first = self.adapter.encode_prompts(captions[:1])
        per_caption = first.tokens.numel() * first.tokens.element_size() + first.pooled.numel() * 4
        if mode == "auto" and per_caption * len(captions) > max_bytes:
            return  # too large to hold: encode each micro-batch instead
        for i in range(0, len(captions), chunk):
            part = captions[i:i + chunk]
            enc = self.adapter.encode_prompts(part)
            for j, c in enumerate(part):
                self._text_cache[c] = enc[j:j + 1]

    def _latents(self, idx: list[int], positions: list[int], unit: int) -> torch.Tensor:
        if self._posterior is not None:
            mean, std = self._posterior
            sel = torch.tensor(idx, device=mean.device)
            mean, std = mean[sel], std[sel]
        else:
            px = torch.stack([load_pixels(self.records[i], random.Random(key_seed(self.seed, unit, "pixels", p)),
                                          self.random_flip) for i, p in zip(idx, positions)])
            mean, std = self.adapter.posterior(px)
        noise = keyed_randn(mean.shape[1:], [(self.seed, unit, "posterior", p) for p in positions],
                            device=mean.device, dtype=mean.dtype)
        return self.adapter.to_model_latents(mean + std * noise)

    def _text(self, captions: list[str]) -> TextEmbeddings:
        if self.train_text:
            return self.adapter.encode_prompts(captions, grad=True)
        if self._text_cache:
            return TextEmbeddings.cat([self._text_cache[c] for c in captions])
        return self.adapter.encode_prompts(captions)

    def _dropped(self, captions: list[str], positions: list[int], unit: int) -> list[str]:
        """Caption dropout (train the unconditional branch of CFG): the empty prompt, with probability p."""
        if self.caption_dropout <= 0:
            return captions
        draws = keyed_rand(1, [(self.seed, unit, "caption_dropout", p) for p in positions]).flatten().tolist()
        return ["" if u < self.caption_dropout else c for c, u in zip(captions, draws)]

    def next(self, ctx) -> list[Batch]:
        """This process's micro-batches of the next optimizer step (one per accumulation slot)."""
        unit = ctx.unit
        global_idx = self.sampler.next()
        ctx.meter.add_prompts(self.records[i].caption for i in global_idx)
        b, W, r = self.shape.batch_size, self.shape.world_size, self.engine.rank if self.engine else 0
        batches = []
        for a in range(self.shape.accumulation):
            slot = a * W + r
            positions = list(range(slot * b, (slot + 1) * b))
            idx = [global_idx[p] for p in positions]
            captions = self._dropped([self.records[i].caption for i in idx], positions, unit)
            batches.append(Batch(z0=self._latents(idx, positions, unit), text=self._text(captions),
                                 prompts=captions, ids=positions))
        ctx.meter.add("data_images", b * len(batches))  # this process's share: summed over ranks by the loop
        return batches

    def unit_logs(self, unit: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])


def generation_plan(dcfg: dict) -> tuple[Any, Path, dict] | None:
    """The world data.generate names, where it would write and the draw it would write (None when it is off), or a
    one-line refusal before anything is written: generation writes only into a folder it owns (new, empty, or
    holding its own manifest), never over the user's data."""
    gen = dcfg.get("generate")
    if not gen:
        return None
    world = generating_world(gen)
    target = Path(dcfg["jsonl"])
    if target.name != "train.jsonl":
        raise UserError(f"data.jsonl = {target}: data.generate writes train.jsonl, so data.jsonl must end in "
                        f"/train.jsonl (or pass --set data.generate=false to train on {target.name} as it is)")
    if not world.owns_folder(target.parent):
        raise UserError(f"data.jsonl = {target}: {target.parent} holds data the {world.name} world did not write (no "
                        f"{world.manifest}) and data.generate would write over it; pass --set data.generate=false "
                        f"to train on it, or point data.jsonl into a new folder")
    draw = {"n_images": int(gen.get("n_images", 4000)), "seed": int(gen.get("seed", 1)),
            "size": int(gen.get("image_size", 32))}
    return world, target, draw


def generating_world(gen: dict):
    """The registered world (soarbench/worlds) that data.generate names (the config check's one-line refusal for
    any other name: a probe's generate table is not part of a validated train config)."""
    from soarbench.config import check_world
    from soarbench.worlds import WORLDS

    name = str(gen.get("world"))
    check_world("data.generate.world", name)
    return WORLDS.load(name)


def ensure_generated(dcfg: dict, engine=None) -> None:
    """Worlds that make their own data (the shapes world) write it where data.jsonl points, once per draw: data
    written by another version of the world's split (its manifest differs) is written again. A folder the world
    did not write is refused (generation_plan); `data.generate = false` turns generation off."""
    plan = generation_plan(dcfg)
    if plan is None:
        return
    world, target, draw = plan
    current = world.is_current(target.parent, **draw)
    if engine is not None:
        engine.barrier()  # every process has checked the folder before the main one writes into it
    if not current and (engine is None or engine.is_main):
        world.write(target.parent, **draw)
    if engine is not None:
        engine.barrier()


PROMPT_SAMPLING = ("unique", "records")


class PromptData:
    """Prompts for methods that generate their own samples (source "prompts").

    Unit u draws m prompts (the same on every process, keyed by (seed, u)), each repeated k times (a group): m x k
    samples with global indices 0 .. m k - 1, group g = index // k. Process r generates the contiguous block
    [r n / W, (r + 1) n / W) of them.

    `sampling` says what is drawn. "unique": m distinct captions, uniformly (a caption with many training records
    counts once, as the Flow-GRPO reference draws from its prompt file). "records": every record once per pass
    over the data, so each prompt comes up in proportion to its records; the pass's order is shuffled within each
    GenEval task and the tasks interleaved in proportion to their records (a stratified shuffle), so that any
    stretch of the run, however short, sees every task within one prompt of its share. On data whose records
    cycle the GenEval tasks evenly (the shapes world) the rollouts are then task-balanced, as GenEval's overall
    (the mean of the task means) weighs them; independent draws of 88 prompts strayed up to 0.13 from 1/6.
    """

    holds_text_cache = False  # rollouts encode their prompts

    def __init__(self, records: list[Record], prompts_per_unit: int, group_size: int, engine, seed: int,
                 sampling: str = "unique"):
        if sampling not in PROMPT_SAMPLING:
            from soarbench.errors import did_you_mean

            raise did_you_mean("data.prompt_sampling", sampling, list(PROMPT_SAMPLING))
        if sampling == "records":
            self.prompts = [r.caption for r in records]
            self.metadata = [r.geneval for r in records]
        else:
            unique: dict[str, dict | None] = {}
            for r in records:
                unique.setdefault(r.caption, r.geneval)
            self.prompts = sorted(unique)
            self.metadata = [unique[p] for p in self.prompts]
        world = engine.world_size if engine else 1
        if prompts_per_unit > len(self.prompts):
            what = "records" if sampling == "records" else "distinct prompts"
            raise UserError(f"data: {prompts_per_unit} prompts per epoch but the data has only "
                            f"{len(self.prompts)} {what}")
        if (prompts_per_unit * group_size) % world:
            raise UserError(f"method: {prompts_per_unit} prompts x group size {group_size} = "
                            f"{prompts_per_unit * group_size} samples do not divide over {world} processes")
        self.m, self.k, self.engine, self.seed = prompts_per_unit, group_size, engine, seed
        self.sampling = sampling
        self._last_deck: tuple[int, list[int]] | None = None  # (pass, its order): units walk one pass at a time

    @property
    def n(self) -> int:
        return self.m * self.k

    def unit_prompts(self, unit: int) -> list[int]:
        """The prompt index of every global sample of the unit."""
        if self.sampling == "records":
            total = len(self.prompts)
            chosen = [self._deck(q // total)[q % total] for q in range(unit * self.m, (unit + 1) * self.m)]
        else:
            rng = random.Random(key_seed(self.seed, unit, "prompts"))
            chosen = rng.sample(range(len(self.prompts)), self.m)
        return [g for g in chosen for _ in range(self.k)]

    def _deck(self, epoch: int) -> list[int]:
        """Pass `epoch` over the records: a stratified shuffle by GenEval task, keyed by (seed, pass)."""
        if self._last_deck is None or self._last_deck[0] != epoch:
            rng = random.Random(key_seed(self.seed, epoch, "prompt deck"))
            strata: dict[str, list[int]] = {}
            for i, row in enumerate(self.metadata):
                strata.setdefault(str((row or {}).get("tag")), []).append(i)
            keyed = []
            for _, members in sorted(strata.items()):
                rng.shuffle(members)
                offset = rng.random()  # member j of n sits at (j + offset) / n: its share of every prefix, +-1
                keyed += [((j + offset) / len(members), i) for j, i in enumerate(members)]
            self._last_deck = (epoch, [i for _, i in sorted(keyed)])
        return self._last_deck[1]

    def unit_logs(self, unit: int) -> dict[str, float]:
        """How many of the unit's rollout prompts (groups) carry each GenEval tag: `prompts_<tag>`, for the train
        log (the same on every process: the draw is keyed by the unit alone)."""
        counts: dict[str, float] = {}
        for p in self.unit_prompts(unit)[::self.k]:
            tag = (self.metadata[p] or {}).get("tag")
            if tag:
                counts[f"prompts_{tag}"] = counts.get(f"prompts_{tag}", 0.0) + 1.0
        return counts

    def next(self, ctx) -> "PromptShare":
        prompts = self.unit_prompts(ctx.unit)
        ctx.meter.add_prompts(self.prompts[p] for p in prompts)
        W, r = (self.engine.world_size, self.engine.rank) if self.engine else (1, 0)
        share = self.n // W
        ids = list(range(r * share, (r + 1) * share))
        return PromptShare(ids=ids, groups=[i // self.k for i in ids], prompts=[self.prompts[prompts[i]] for i in ids],
                           metadata=[self.metadata[prompts[i]] for i in ids])

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class PromptShare:
    ids: list[int]  # global sample indices within the unit
    groups: list[int]  # group (prompt occurrence) of each sample
    prompts: list[str]
    metadata: list[dict | None]
