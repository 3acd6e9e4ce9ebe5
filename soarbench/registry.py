"""Registries with lazy entries: a name maps to "module:attribute", imported only when used."""
from __future__ import annotations

import importlib
from typing import Any

from soarbench.errors import did_you_mean


class LazyRegistry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[str, dict[str, Any]]] = {}

    def add(self, name: str, target: str, **meta: Any) -> None:
        self._entries[name] = (target, meta)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def meta(self, name: str) -> dict[str, Any]:
        self.check(name)
        return dict(self._entries[name][1])

    def check(self, name: str) -> None:
        if name not in self._entries:
            raise did_you_mean(self.kind, name, self._entries)

    def load(self, name: str) -> Any:
        self.check(name)
        module, _, attr = self._entries[name][0].partition(":")
        return getattr(importlib.import_module(module), attr)
