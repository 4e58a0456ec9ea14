"""Model loading: packaged models, local HF folders, local GGUF files, hub names."""

from afina.models.loader import (
    DEFAULT_MODEL,
    ModelError,
    PackagedModel,
    list_packaged_models,
    load_head_model,
    load_model,
    load_tokenizer,
    resolve_encoder,
    resolve_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "PackagedModel",
    "list_packaged_models",
    "load_head_model",
    "load_model",
    "resolve_encoder",
    "load_tokenizer",
    "resolve_model",
]
