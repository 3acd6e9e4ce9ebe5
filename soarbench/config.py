"""TOML configs: `extends`, `--set key=value` overrides, and one typed reading of every section.

Loading:

    cfg = load_config("benchmarks/shapes/sft.toml")      # follows `extends = "common.toml"` (relative to the file)
    cfg = apply_overrides(cfg, ["train.lr=1e-4"])         # --set values are TOML literals, else plain strings
    cfg = validate_train_config(cfg)                      # defaults filled in; bad input -> one UserError line

A file may start with `extends = "other.toml"`: the other file is loaded first (it may extend a third one; a
cycle is refused) and this file's tables are deep-merged over it, so the extending file wins key by key.
Experiment files ([common], [runs.NAME], [experiment]) may use `extends` the same way.

Paths in a file (model.path, data.jsonl, data.image_dir, in an experiment also inside [common] and [runs.NAME],
[experiment.probe] jsonl and [experiment] report) are relative to that file's folder and may use `${VAR}` or
`${VAR:-default}` from the environment (resolve_file_paths); a path given with --set is relative to the working
directory.

`validate_train_config` knows every section and key the trainer reads (TRAIN_SCHEMA below) and refuses unknown
keys with a did-you-mean, values of the wrong type ("config: train.lr = 'abc': expected a number"), values out
of range and unknown names (benchmarks, metrics, methods, budget units). The method's own options are checked
against the constructor of the registered class by `validate_method_options`.
"""
from __future__ import annotations

import dataclasses
import copy
import difflib
import inspect
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from soarbench.errors import UserError

EXTENDS = "extends"


# ------------------------------------------------------------------------------------------------ loading
def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e})") from None


def load_config(path: str | Path, _chain: tuple[Path, ...] = (), *, file_paths: bool = True) -> dict[str, Any]:
    """A TOML file with its `extends` chain resolved (the extending file wins); the `extends` key removed.

    An experiment file's [common] table may extend a training config too (`[common]` `extends = "common.toml"`):
    that file's tables, its own `extends` chain resolved, are the common settings under the experiment's own
    [common.*] values, so the shared settings of a world are written once.

    With `file_paths` (the default) the path-valued fields (PATH_FIELDS) of each file in the chain have
    `${VAR}` / `${VAR:-default}` expanded from the environment and, when relative, are read against that file's
    folder (see resolve_file_paths). A run folder's recorded config.toml holds paths already resolved: read it
    with file_paths=False."""
    path = Path(path)
    key = path.resolve()
    if key in _chain:
        cycle = " -> ".join(p.name for p in (*_chain[_chain.index(key):], key))
        raise UserError(f"{path}: extends forms a cycle ({cycle})")
    cfg = _read_toml(path)
    parent = cfg.pop(EXTENDS, None)
    common = cfg.get("common")
    common_parent = common.pop(EXTENDS, None) if isinstance(common, dict) else None
    if file_paths:
        cfg = resolve_file_paths(cfg, path)
    if common_parent is not None:
        shared = load_config(_extended_file(path, common_parent, "[common] extends"), (*_chain, key),
                             file_paths=file_paths)
        cfg["common"] = deep_merge(shared, cfg["common"])
    if parent is None:
        return cfg
    return deep_merge(load_config(_extended_file(path, parent, "extends"), (*_chain, key), file_paths=file_paths),
                      cfg)


def _extended_file(path: Path, parent: Any, where: str) -> Path:
    """The file an `extends` names, relative to the extending file's folder; one line when it is not one."""
    if not isinstance(parent, str) or not parent.strip():
        raise UserError(f"{path}: {where} = {_show(parent)}: expected the path of another TOML file")
    target = path.parent / parent
    if not target.is_file():
        raise UserError(f"{path}: {where} = '{parent}': no such file {target}")
    return target


def load_toml(path: str | Path, *, file_paths: bool = True) -> dict[str, Any]:
    """Kept for callers of the old name: the same as load_config (extends resolved)."""
    return load_config(path, file_paths=file_paths)


# Fields holding a file or folder: in a config file they are relative to that file's folder. The same fields
# inside an experiment's [common] and [runs.NAME] tables, and the experiment's probe data and report folder.
PATH_FIELDS = (("model", "path"), ("data", "jsonl"), ("data", "image_dir"))
EXPERIMENT_PATH_FIELDS = (("experiment", "probe", "jsonl"), ("experiment", "report"))
_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def resolve_file_paths(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """`cfg` (one file's tables, as read from `path`) with its path fields made usable from any working directory:
    `${VAR}` and `${VAR:-default}` replaced from the environment (an unset VAR without a default is one line),
    `~` expanded, and a relative path joined to the file's folder. The result is relative to the working directory
    when it lies under it (so configs read from the repository root record the paths they always did), else
    absolute. A model.path that names no local file and reads as a Hub id (owner/name[@revision]) stays as
    written. Values given with --set are applied after loading and stay relative to the working directory."""
    cfg = copy.deepcopy(cfg)
    fields = list(PATH_FIELDS)
    for table in ("common", *(f"runs.{name}" for name in cfg.get("runs", {}) if isinstance(cfg.get("runs"), dict))):
        fields += [(*table.split(".", 1), *f) for f in PATH_FIELDS]
    fields += EXPERIMENT_PATH_FIELDS
    for keys in fields:
        node = cfg
        for part in keys[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(keys[-1]), str):
            continue
        node[keys[-1]] = _resolve_path(node[keys[-1]], path, ".".join(keys))
    return cfg


def _resolve_path(value: str, path: Path, where: str) -> str:
    import os

    def env(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        got = os.environ.get(name)
        if got:
            return got
        if default is not None:
            return default
        raise UserError(f"{path}: {where} = {_show(value)}: the environment variable {name} is not set; "
                        f"export {name}=... or pass --set {where}=PATH")

    text = os.path.expanduser(_ENV_VAR.sub(env, value))
    if not text or os.path.isabs(text):
        return text
    joined = path.parent / text
    if where.endswith("model.path") and not joined.exists():
        from soarbench.hub import parse_hub_id

        if parse_hub_id(text) is not None:
            return text  # a Hub id (README: "Models and weights from the Hugging Face Hub")
    full = Path(os.path.normpath(joined.absolute()))
    cwd = Path.cwd()
    return os.path.relpath(full, cwd) if full.is_relative_to(cwd) else str(full)


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set '{item}': expected key=value, e.g. train.lr=1e-4")
        node = cfg
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set '{item}': '{part}' is a value, not a table")
            node = child
        node[parts[-1]] = parse_value(value.strip())
    return cfg


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def dumps_toml(cfg: dict[str, Any]) -> str:
    """A small TOML writer for resolved configs (tables, scalars, arrays of scalars)."""
    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if v is None:
            return '""'
        s = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{s}"'

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        flat = {k: v for k, v in d.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (flat or not subs):
            lines.append(f"[{prefix}]")
        for k, v in flat.items():
            lines.append(f"{k} = {scalar(v)}")
        if flat:
            lines.append("")
        for k, v in subs.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", cfg)
    return "\n".join(lines).rstrip() + "\n"


def section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    value = cfg.get(name, {})
    if not isinstance(value, dict):
        raise UserError(f"config: [{name}] must be a table")
    return value


def require(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"config: missing required field '{dotted}'")
        node = node[part]
    return node


# ------------------------------------------------------------------------------------------------ typed reading
REQUIRED = object()  # a key without a default that must be given
OPTIONAL = object()  # a key without a default that may be left out (absent from the validated config)


def _show(value: Any) -> str:
    """A value as the user wrote it in TOML: strings quoted, booleans lower-case."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _bad(where: str, value: Any, expected: str) -> UserError:
    return UserError(f"config: {where} = {_show(value)}: expected {expected}")


def _did_you_mean(name: str, valid, prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the nearest valid name, or nothing when none is near."""
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _unknown_key(prefix: str, key: str, valid, what: str = "") -> UserError:
    hint = _did_you_mean(key, valid, prefix) or f" (valid: {', '.join(prefix + k for k in valid)})"
    return UserError(f"config: unknown key '{prefix}{key}'{what}{hint}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Field:
    """One config key: its kind, default, allowed range or names, and an extra check run on the value."""

    kind: str  # number | int | bool | str | table | numbers | ints | strings
    default: Any = OPTIONAL
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | Callable[[], Any] | None = None
    check: Callable[[str, Any], None] | None = None
    length: int | None = None  # arrays: exact length

    def read(self, where: str, value: Any) -> Any:
        raw, value = value, self._typed(where, value)  # messages show the value as the user wrote it
        if self.kind in ("number", "int"):
            self._range(where, raw, value)
        elif self.kind in ("numbers", "ints"):
            for v in value:
                self._range(where, raw, v)
        if self.choices is not None:
            valid = list(self.choices() if callable(self.choices) else self.choices)
            for v in value if isinstance(value, list) else [value]:
                if v not in valid:
                    raise UserError(f"config: {where} = {_show(value)}: expected one of {', '.join(valid)}"
                                    + _did_you_mean(v, valid))
        if self.check is not None:
            self.check(where, value)
        return value

    def _typed(self, where: str, value: Any) -> Any:
        kind = self.kind
        if kind == "number":
            if not _is_number(value) or not math.isfinite(value):
                raise _bad(where, value, "a number" if not _is_number(value) else "a finite number")
            return float(value)  # `lr = 1` is the number 1.0: the reader never sees an int where floats go
        if kind == "int":
            if not _is_int(value):
                raise _bad(where, value, "an integer")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise _bad(where, value, "true or false")
            return value
        if kind == "str":
            if not isinstance(value, str):
                raise _bad(where, value, "a string")
            return value
        if kind == "table":
            if not isinstance(value, dict):
                raise _bad(where, value, "a table, e.g. { key = value }")
            return copy.deepcopy(value)
        if kind in ("numbers", "ints", "strings"):
            each = {"numbers": _is_number, "ints": _is_int, "strings": lambda v: isinstance(v, str)}[kind]
            what = {"numbers": "numbers", "ints": "integers", "strings": "strings"}[kind]
            if not isinstance(value, list) or not all(each(v) for v in value):
                raise _bad(where, value, f"an array of {what}" + (f" (length {self.length})" if self.length else ""))
            if self.length is not None and len(value) != self.length:
                raise _bad(where, value, f"an array of {self.length} {what}")
            return [float(v) for v in value] if kind == "numbers" else list(value)
        raise AssertionError(kind)

    def _range(self, where: str, shown: Any, v: float) -> None:
        too_low = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        too_high = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if not (too_low or too_high):
            return
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        noun = "a number" if self.kind in ("number", "numbers") else "an integer"  # int, ints
        raise _bad(where, shown, f"{noun} {' and '.join(parts)}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# names checked against registries (imported lazily: the registries import little, but only when asked)
def _benchmark_names() -> list[str]:
    from soarbench.benchmarks import BENCHMARKS

    return BENCHMARKS.names()


def _metric_names() -> list[str]:
    from soarbench.metrics.registry import METRICS

    return METRICS.names()


NEW_BUDGET_UNITS = ("reward_fwd_bwd", "vae_decodes", "device_s")


def budget_units() -> list[str]:
    from soarbench.cost import UNITS

    return list(UNITS) + [u for u in NEW_BUDGET_UNITS if u not in UNITS]


def _component_names() -> tuple[str, ...]:
    return ("transformer", "text_encoder", "text_encoder_2")  # models.sd3.TRAINABLE_COMPONENTS, without torch


def _check_components(where: str, value: list[str]) -> None:
    if not value:
        raise _bad(where, value, "at least one of " + ", ".join(_component_names()))
    if len(set(value)) != len(value):
        raise _bad(where, value, "each component once")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def device_problem(value: str) -> str | None:
    """Why `value` is not a usable device here (auto | cpu | cuda | cuda:N, CUDA present), or None."""
    if not DEVICE_PATTERN.match(value):
        return "expected auto, cpu, cuda or cuda:N"
    if not value.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return "this machine has no CUDA device (use auto or cpu)"
    if ":" in value and int(value.split(":")[1]) >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0"
    return None


def check_device(where: str, value: str) -> None:
    problem = device_problem(value)
    if problem is not None:
        raise UserError(f"config: {where} = {_show(value)}: {problem}")


def check_world(where: str, value: str) -> None:
    """A world name (data.generate.world, a probe's generate table) that no world registers: one line, did-you-mean."""
    from soarbench.worlds import WORLDS

    if value not in WORLDS.names():
        raise UserError(f"config: {where} = {_show(value)}: expected {' or '.join(WORLDS.names())}"
                        + _did_you_mean(value, WORLDS.names()))


GENERATE_SCHEMA: dict[str, Field] = {
    "world": Field("str", REQUIRED, check=check_world),
    "n_images": Field("int", 4000, low=1),
    "seed": Field("int", 1, low=0),
    "image_size": Field("int", 32, low=8),
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

TRAIN_SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "path": Field("str", REQUIRED),
        "max_sequence_length": Field("int", OPTIONAL, low=0),
        "load_t5": Field("bool", True),
        "text_encoder_precision": Field("str", "auto", choices=PRECISIONS),
    },
    "data": {
        "jsonl": Field("str", REQUIRED),
        "image_dir": Field("str", OPTIONAL),
        "random_flip": Field("bool", False),
        "generate": Field("table", OPTIONAL),  # its keys: GENERATE_SCHEMA
        "caption_dropout": Field("number", 0.0, low=0, high=1, high_open=True),
        "text_cache": Field("str", "auto", choices=("auto", "all", "none")),
        # online methods: draw prompts uniformly over distinct captions ("unique") or in proportion to their
        # training records ("records": task-balanced on data that cycles GenEval's tasks evenly)
        "prompt_sampling": Field("str", "unique", choices=("unique", "records")),
    },
    "train": {
        "seed": Field("int", 0, low=0),
        "batch_size": Field("int", 8, low=1),
        "gradient_accumulation_steps": Field("int", 1, low=1),
        "global_batch_size": Field("int", 0, low=0),
        "lr": Field("number", 2e-5, low=0),
        "weight_decay": Field("number", 1e-2, low=0),
        "betas": Field("numbers", [0.9, 0.999], low=0, high=1, high_open=True, length=2),
        "eps": Field("number", 1e-8, low=0, low_open=True),
        "grad_clip": Field("number", 1.0, low=0),
        "warmup_steps": Field("int", 0, low=0),
        "decay_steps": Field("int", 0, low=0),  # linear decay to 0 over the budget's last N steps (WSD); 0: none
        "decay_fraction": Field("number", 0.0, low=0, high=1),  # the same, over this fraction of the run's steps
        "mixed_precision": Field("str", "no", choices=("no", "bf16", "fp16")),
        # the never-trained modules (VAE, frozen text encoders, a full fine-tuning's reference copy): "auto" holds
        # them in bf16 under bf16 mixed precision, else fp32; "fp32" keeps them in fp32 (harness/train.py)
        "frozen_dtype": Field("str", "auto", choices=("auto", "bf16", "fp32")),
        "gradient_checkpointing": Field("bool", False),
        "allow_tf32": Field("bool", True),
        "components": Field("strings", ["transformer"], choices=_component_names, check=_check_components),
        "device": Field("str", "auto", check=check_device),
        "threads": Field("int", 0, low=0),
        "checkpoint_every": Field("int", 0, low=0),
        "nonfinite": Field("str", "stop", choices=("stop", "skip")),
        "check_replicas": Field("bool", False),
        "compile": Field("bool", False),
    },
    "budget": {
        "unit": Field("str", "fwd_bwd", choices=budget_units),
        "amount": Field("number", REQUIRED, low=0, low_open=True),
        "no_grad_fraction": Field("number", 1 / 3, low=0, high=1),
    },
    "eval": {
        "benchmark": Field("str", OPTIONAL, choices=_benchmark_names),
        "benchmark_options": Field("table", {}),
        # more benchmarks evaluated at the same points, name -> options (e.g. shapes_train = { n_per_tag = 64 })
        "extra_benchmarks": Field("table", {}),
        "points": Field("int", 4, low=0),
        "num_steps": Field("int", OPTIONAL, low=1),
        # few-step endpoints: every benchmark again at each of these step counts, as "<name>@<k>" (shapes@8)
        "extra_num_steps": Field("ints", [], low=1),
        "guidance": Field("number", OPTIONAL),
        "seed": Field("int", 0, low=0),
        "batch_size": Field("int", 64, low=1),
        "include_base": Field("bool", False),
        "precision": Field("str", "auto", choices=PRECISIONS),
        "metrics": Field("strings", [], choices=_metric_names),
    },
    "log": {
        "tensorboard": Field("bool", True),
        "wandb": Field("bool", False),
        "wandb_project": Field("str", "soarbench"),
        "every": Field("int", 10, low=1),
    },
    "run": {
        "name": Field("str", OPTIONAL),
        "group": Field("str", OPTIONAL),
    },
}
METHOD_SECTION = "method"


def _read_table(prefix: str, table: Any, schema: dict[str, Field]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise _bad(prefix, table, "a table")
    for key in table:
        if key not in schema:
            raise _unknown_key(f"{prefix}.", key, schema)
    out: dict[str, Any] = {}
    for key, field in schema.items():
        where = f"{prefix}.{key}"
        if key in table:
            out[key] = field.read(where, table[key])
        elif field.default is REQUIRED:
            raise UserError(f"config: missing required field '{where}'")
        elif field.default is not OPTIONAL:
            out[key] = copy.deepcopy(field.default)
    return out


def validate_train_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every section read once, typed, defaults filled in; a UserError (one line) for anything wrong.

    Sections: model, data, train, budget, eval, log, run and method (its options checked against the registered
    method's constructor). The result is a new dict; `cfg` is not changed."""
    if not isinstance(cfg, dict):
        raise UserError("config: expected a table of sections")
    known = [*TRAIN_SCHEMA, METHOD_SECTION]
    for name in cfg:
        if name not in known:
            hint = _did_you_mean(name, known) or f" (valid: {', '.join(known)})"
            raise UserError(f"config: unknown section '{name}'{hint}")
    cfg = _generation_switch(cfg)
    out = {name: _read_table(name, cfg.get(name, {}), schema) for name, schema in TRAIN_SCHEMA.items()}
    if "benchmark" in out["eval"]:
        out["eval"]["benchmark_options"] = validate_benchmark_options(out["eval"]["benchmark"],
                                                                      out["eval"]["benchmark_options"])
    out["eval"]["extra_benchmarks"] = _extra_benchmarks(out["eval"])
    if "generate" in out["data"]:
        out["data"]["generate"] = _read_table("data.generate", out["data"]["generate"], GENERATE_SCHEMA)
    method = cfg.get(METHOD_SECTION)
    if method is None or (isinstance(method, dict) and "name" not in method):
        raise UserError("config: missing required field 'method.name'")
    if not isinstance(method, dict):
        raise _bad(METHOD_SECTION, method, "a table")
    options = dict(method)
    name = options.pop("name")
    if not isinstance(name, str):
        raise _bad("method.name", name, "a string")
    out[METHOD_SECTION] = {"name": name, **validate_method_options(name, options)}
    _check_batches(out["train"])
    return out


def _generation_switch(cfg: dict[str, Any]) -> dict[str, Any]:
    """`data.generate = false` (e.g. `--set data.generate=false` over a shipped config) turns generation off: the
    key is dropped and data.jsonl is read as it is. Anything else but a generate table is refused."""
    data = cfg.get("data")
    if not isinstance(data, dict) or "generate" not in data:
        return cfg
    gen = data["generate"]
    if gen is False:
        return {**cfg, "data": {k: v for k, v in data.items() if k != "generate"}}
    if not isinstance(gen, dict) or not gen:
        raise UserError(f"config: data.generate = {_show(gen)}: expected {{ world = \"shapes\", n_images = N, ... }} "
                        f"to write the data, or false to train on data.jsonl as it is")
    return cfg


def _check_batches(train: dict[str, Any]) -> None:
    """global_batch_size, when given, must be a whole number of micro-batches (per process it is checked later,
    when the number of processes is known)."""
    g, b = train["global_batch_size"], train["batch_size"]
    if g and g % b:
        raise UserError(f"config: train.global_batch_size = {g}: expected a multiple of train.batch_size = {b}")


# ------------------------------------------------------------------------------------------------ method options
def _constructor_parameters(cls: type) -> dict[str, tuple[inspect.Parameter, Any]]:
    """name -> (parameter, type hint) of cls.__init__, following **kwargs into the base classes' __init__; a class
    that takes its options as a dataclass (`Options`, the group-rollout methods) is read from that dataclass."""
    params: dict[str, tuple[inspect.Parameter, Any]] = {}
    options = getattr(cls, "Options", None)
    if options is not None and dataclasses.is_dataclass(options):
        hints = typing.get_type_hints(options)
        return {p.name: (p, hints.get(p.name)) for p in inspect.signature(options).parameters.values()}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not evaluate: fall back to the defaults' types
            hints = {}
        passes_on = False
        for p in list(inspect.signature(init).parameters.values())[1:]:
            if p.kind is p.VAR_KEYWORD:
                passes_on = True
            elif p.kind is not p.VAR_POSITIONAL:
                params.setdefault(p.name, (p, hints.get(p.name)))
        if not passes_on:
            break
    return params


def _matches(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a type hint (int, float, bool, str, list[...], dict[...], unions, Any)."""
    if hint is None or hint is Any or hint is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, args[0] if args else Any) for v in value)
    if origin is dict or hint is dict:
        args = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _matches(k, args[0] if args else Any) and _matches(v, args[1] if args else Any) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_describe(h) for h in typing.get_args(hint) if h is not type(None)]
        return " or ".join(parts)
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin in (list, tuple):
        return "an array" + (f" of {_plural(args[0])}" if args else "")
    if origin is dict:
        return "a table" + (f" of {_plural(args[1])}" if len(args) == 2 and args[1] is not Any else "")
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(hint, "tables"
                                                                                    if typing.get_origin(hint) is dict
                                                                                    or hint is dict else "values")


def _hint_of(param: inspect.Parameter, hint: Any) -> Any:
    """The type a value must have: the annotation, else the default's type (an int default accepts only ints)."""
    if hint is not None:
        return hint
    default = param.default
    if default is inspect.Parameter.empty or default is None:
        return None
    return float if isinstance(default, float) else type(default)


def validate_method_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of method `name` (without `name`), checked against its class's constructor and completed with
    the constructor's defaults: an unknown option gets a did-you-mean, a value of another type than the
    parameter's (its annotation, else its default's) one line."""
    from soarbench.methods import METHODS

    if not isinstance(name, str):
        raise _bad("method.name", name, "a string")
    try:
        METHODS.check(name)
    except UserError as e:
        raise UserError(f"config: method.name = {_show(name)}: {e}") from None
    return _check_options("method", _constructor_parameters(METHODS.load(name)), options, f"method '{name}'")


def _check_options(prefix: str, params: dict[str, tuple[inspect.Parameter, Any]], options: dict[str, Any],
                   owner: str, fill_defaults: bool = True) -> dict[str, Any]:
    """Options checked against a signature's parameters: names (did-you-mean), types, required ones present."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in params:
            raise _unknown_key(f"{prefix}.", key, sorted(params), f" for {owner}")
        hint = _hint_of(*params[key])
        if not _matches(value, hint):
            raise _bad(f"{prefix}.{key}", value, _describe(hint))
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(f"{prefix}.{key}", value, "a finite number")
        out[key] = float(value) if hint is float and _is_int(value) else copy.deepcopy(value)
    for key, (param, _) in params.items():
        if key in out or not fill_defaults:
            continue
        if param.default is inspect.Parameter.empty:
            raise UserError(f"config: missing required field '{prefix}.{key}' ({owner})")
        out[key] = copy.deepcopy(param.default)
    return out


def _extra_benchmarks(ecfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """eval.extra_benchmarks: each name a benchmark, each value its options (checked like benchmark_options)."""
    extras = ecfg["extra_benchmarks"]
    if extras and "benchmark" not in ecfg:
        raise UserError("config: eval.extra_benchmarks needs eval.benchmark (the main benchmark) too")
    out = {}
    for name, options in extras.items():
        where = f"eval.extra_benchmarks.{name}"
        if name not in _benchmark_names():
            raise UserError(f"config: {where}: unknown benchmark" + _did_you_mean(name, _benchmark_names()))
        if name == ecfg["benchmark"]:
            raise UserError(f"config: {where}: already the main benchmark (eval.benchmark)")
        if not isinstance(options, dict):
            raise _bad(where, options, "a table of benchmark options ({} for none)")
        out[name] = validate_benchmark_options(name, options, prefix=where)
    return out


def validate_benchmark_options(name: str, options: dict[str, Any],
                               prefix: str = "eval.benchmark_options") -> dict[str, Any]:
    """eval.benchmark_options checked against the benchmark factory's signature (only the given keys kept)."""
    from soarbench.benchmarks import BENCHMARKS

    factory = BENCHMARKS.load(name)
    try:
        hints = typing.get_type_hints(factory)
    except Exception:
        hints = {}
    params = {p.name: (p, hints.get(p.name)) for p in inspect.signature(factory).parameters.values()
              if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return _check_options(prefix, params, options, f"benchmark '{name}'", fill_defaults=False)
