"""TOML configs with `--set key=value` overrides; the resolved config is written into every run folder.

Values given to --set are parsed as TOML literals (numbers, booleans, strings, arrays), falling back to a plain
string, so `--set train.lr=1e-4 --set method.name=soar --set data.random_flip=false` all do what they say.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from soarbench.errors import UserError


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e})") from None


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
