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


def load_plugins() -> list[str]:
    """Import the modules that register methods, metrics or benchmarks from outside soarbench.

    Named in $SOARBENCH_PLUGINS (comma-separated module names, importable from sys.path), or declared by installed
    packages under the entry-point group "soarbench.plugins". A module registers with e.g.
    `METHODS.add("my_method", "my_module:MyMethod")`. Returns the modules imported."""
    import os
    from importlib.metadata import entry_points

    from soarbench.errors import UserError

    names = [n.strip() for n in os.environ.get("SOARBENCH_PLUGINS", "").split(",") if n.strip()]
    names += [ep.value.split(":")[0] for ep in entry_points(group="soarbench.plugins")]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"plugin '{name}' (SOARBENCH_PLUGINS or the soarbench.plugins entry point) could not be "
                            f"imported: {e}") from None
        except Exception as e:  # the plugin's own code failed (SyntaxError, a raise at import time): name the line
            raise UserError(f"plugin '{name}' (SOARBENCH_PLUGINS or the soarbench.plugins entry point) failed while "
                            f"being imported: {_where_raised(e)}{type(e).__name__}: {e}; fix the module or remove it "
                            f"from SOARBENCH_PLUGINS") from None
    return names


def _where_raised(error: BaseException) -> str:
    """'file:line: ' of the innermost frame that raised (a SyntaxError names its own line in its message)."""
    if isinstance(error, SyntaxError):
        return ""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}: " if tb is not None else ""
