"""soarbench: a benchmark suite and matched-budget harness for post-training rectified-flow text-to-image models.

From a notebook: `soarbench.train(...)`, `soarbench.evaluate(...)` and `soarbench.report(...)` (soarbench/api.py).
"""
import sys as _sys

# torchvision must see soarbench._compat's fallback before it loads. Importing _compat here would import torch,
# seconds that `soarbench --help` and every input check should not pay: a finder on sys.meta_path imports _compat
# just before torchvision's first import instead (or at once, when torchvision is already imported).
if "torchvision" in _sys.modules:
    from soarbench import _compat  # noqa: F401
else:
    from soarbench._site_hook import install as _install_before_torchvision

    _install_before_torchvision()

__version__ = "0.1.0"

_API = ("train", "evaluate", "report", "dry_run")


def __getattr__(name: str):
    # the API's modules import torch: loaded on first use, so `import soarbench` stays cheap
    if name in _API:
        from soarbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'soarbench' has no attribute {name!r}")
