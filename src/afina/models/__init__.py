"""Model loading: packaged models, local HF folders, local GGUF files, hub names."""

from afina.models.loader import (
    DEFAULT_MODEL,
    ModelError,
    PackagedModel,
    list_packaged_models,
    load_model,
    load_tokenizer,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "PackagedModel",
    "list_packaged_models",
    "load_model",
    "load_tokenizer",
    "resolve_model",
]
