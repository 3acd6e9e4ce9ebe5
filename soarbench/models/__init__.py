"""Model adapters. Full scale (SD3.5 from a local folder) and the tiny shapes model share SD3Adapter."""
from soarbench.models.sd3 import SD3Adapter, TextEmbeddings, resolve_model_folder

__all__ = ["SD3Adapter", "TextEmbeddings", "resolve_model_folder"]
