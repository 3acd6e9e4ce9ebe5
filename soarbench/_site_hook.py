"""Let `from diffusers import StableDiffusion3Pipeline` work in soarbench's environment without `import soarbench`.

torchvision 0.28.0's wheel cannot load its compiled ops beside the CPU torch 2.13.0 (see soarbench/_compat.py), and
transformers/diffusers import torchvision. soarbench/__init__.py installs the fallback, but a user's own script may
import diffusers first. `make install` therefore runs

    python -m soarbench._site_hook          # writes into this interpreter's site-packages:
        _soarbench_torchvision_hook.py      #   a copy of this file
        soarbench-torchvision.pth           #   "import _soarbench_torchvision_hook; ...install()"

At interpreter start-up the .pth only puts a tiny finder at the front of sys.meta_path (no torch import, no
soarbench import, so start-up stays fast and a checkout's own soarbench on sys.path still wins). The first time
anything imports torchvision, the finder removes itself and imports soarbench._compat, which registers the
fallback exactly when the real ops cannot load, then torchvision imports normally.

This file must not import soarbench at module level: it runs as a top-level module copied into site-packages.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HOOK_MODULE = "_soarbench_torchvision_hook"
PTH_FILE = "soarbench-torchvision.pth"
_MARK = "_soarbench_before_torchvision"


class BeforeTorchvision:
    """A meta-path finder that imports soarbench._compat just before torchvision's first import, then steps aside."""

    _soarbench_before_torchvision = True

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once, and no recursion when _compat itself looks torchvision up
        try:
            import soarbench._compat  # noqa: F401
        except ModuleNotFoundError as e:
            if e.name != "soarbench":  # soarbench uninstalled, the .pth left behind: torchvision as it is
                raise
        return None  # the normal finders import torchvision itself


def install() -> None:
    """Put the finder first on sys.meta_path (idempotent; nothing to do once torchvision is imported)."""
    if "torchvision" in sys.modules or any(getattr(f, _MARK, False) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, BeforeTorchvision())


def install_files(site_packages: str | os.PathLike) -> list[Path]:
    """Write the hook module and its .pth into `site_packages` (each written to a temporary name, then renamed)."""
    site = Path(site_packages)
    files = {site / f"{HOOK_MODULE}.py": Path(__file__).read_text(encoding="utf-8"),
             site / PTH_FILE: f"import {HOOK_MODULE}; {HOOK_MODULE}.install()\n"}
    for path, text in files.items():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return list(files)


def main() -> None:
    import sysconfig

    for path in install_files(sysconfig.get_paths()["purelib"]):
        print(path)


if __name__ == "__main__":
    main()
