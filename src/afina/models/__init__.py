"""Model loading: packaged models, local HF folders, local GGUF files, hub names."""

from afina.models.loader import (
    DEFAULT_MODEL,
    ModelError,
    PackagedModel,
    list_packaged_models,
    load_head_model,
    load_model,
    load_tokenizer,
    recipe_rope_settings,
    resolve_encoder,
    resolve_model,
)
from afina.models.trained import load_adapter_over_base, load_trained, trained_weights

__all__ = [
    "DEFAULT_MODEL",
    "ModelError",
    "PackagedModel",
    "list_packaged_models",
    "load_adapter_over_base",
    "load_head_model",
    "load_model",
    "load_trained",
    "recipe_rope_settings",
    "resolve_encoder",
    "load_tokenizer",
    "resolve_model",
    "trained_weights",
]
