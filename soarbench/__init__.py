"""soarbench: a benchmark suite and matched-budget harness for post-training rectified-flow text-to-image models."""
from soarbench import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
