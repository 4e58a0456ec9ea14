"""RoPE scaling: extend a rotary-position model's context window, through transformers' own support.

A recipe's `context:` section becomes a settings dict; applied to a model config before the
model is built, it sets transformers' `rope_parameters` (this transformers version's spelling; older
versions called it `rope_scaling`) and `max_position_embeddings`:

    linear   positions are divided by the factor (position interpolation, Chen et al. 2023);
             max_position_embeddings = original x factor
    dynamic  NTK-aware: the rotary base grows with the input length beyond the original window, so
             inputs within it are unchanged; transformers reads the original window from
             max_position_embeddings, so that stays the original and the extended window is kept
             in `afina_context_length`
    yarn     NTK-by-parts interpolation plus an attention temperature (Peng et al. 2023);
             max_position_embeddings = original x factor, original_max_position_embeddings = original

The settings are saved beside a trained adapter (`afina_rope.json`; a full model's config.json
holds them anyway), so eval, export and serve load the base with the same positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROPE_FILE = "afina_rope.json"
CONTEXT_KEY = "afina_context_length"  # the extended window, kept in the config (dynamic NTK needs it)


class RopeError(ValueError):
    """A model or setting that rope scaling cannot apply to; the message says what to do."""


def original_window(hf_config) -> int:
    """The window a model was trained for: YaRN's original length if already scaled, else max_position_embeddings."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return int(params.get("original_max_position_embeddings") or hf_config.max_position_embeddings)


def rope_settings(context, hf_config) -> dict[str, Any] | None:
    """The recipe's `context:` section as settings for this model config; None when no scaling is asked."""
    if context.rope_scaling == "none":
        return None
    params = getattr(hf_config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise RopeError(
            f"context.rope_scaling: model type '{hf_config.model_type}' has no rotary position settings "
            "(rope_parameters) in its config; rope scaling needs a RoPE model such as Llama, Mistral or Qwen2"
        )
    if params.get("rope_type", "default") != "default":
        raise RopeError(
            f"context.rope_scaling: the model already uses '{params['rope_type']}' rope scaling; "
            "extend from a model with plain rotary positions"
        )
    original = context.original_length or hf_config.max_position_embeddings
    factor = float(context.factor) if context.factor is not None else context.target_length / original
    if factor < 1.0:
        raise RopeError(f"context.target_length {context.target_length} is shorter than the original window {original}")
    return {
        "rope_type": context.rope_scaling,
        "factor": factor,
        "original_length": int(original),
        "target_length": int(round(original * factor)),
        "rope_theta": float(params["rope_theta"]),
    }


def apply_rope_settings(hf_config, settings: dict[str, Any] | None):
    """Set the scaled rotary positions on a (not yet instantiated) transformers config; returns it."""
    if not settings:
        return hf_config
    params = {"rope_type": settings["rope_type"], "rope_theta": settings["rope_theta"], "factor": settings["factor"]}
    if settings["rope_type"] == "dynamic":
        hf_config.max_position_embeddings = settings["original_length"]
    else:
        hf_config.max_position_embeddings = settings["target_length"]
    if settings["rope_type"] == "yarn":
        params["original_max_position_embeddings"] = settings["original_length"]
    hf_config.rope_parameters = params
    setattr(hf_config, CONTEXT_KEY, settings["target_length"])
    return hf_config


def context_length(hf_config) -> int:
    """The window a model config handles: the extended length where rope scaling is set."""
    return int(getattr(hf_config, CONTEXT_KEY, None) or getattr(hf_config, "max_position_embeddings", None) or 2048)


def save_rope_settings(folder: Path, settings: dict[str, Any] | None) -> None:
    if settings:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / ROPE_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def read_rope_settings(folder: Path) -> dict[str, Any] | None:
    """The rope settings saved beside an adapter, or None."""
    path = Path(folder) / ROPE_FILE
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RopeError(f"{path}: not valid JSON ({exc.msg}); delete it or retrain") from None
    missing = {"rope_type", "factor", "original_length", "target_length", "rope_theta"} - set(settings)
    if missing:
        raise RopeError(f"{path}: missing {', '.join(sorted(missing))}")
    return settings


def gguf_rope_metadata(settings: dict[str, Any] | None) -> dict[str, Any]:
    """llama.cpp's rope-scaling keys for these settings (see write_gguf); dynamic NTK has none in llama.cpp."""
    if not settings:
        return {}
    if settings["rope_type"] == "dynamic":
        raise RopeError(
            "GGUF export: llama.cpp has no dynamic NTK rope scaling (its rope.scaling.type is none, linear "
            "or yarn); use context.rope_scaling=linear or yarn for GGUF, or export the merged HF folder"
        )
    return {
        "type": settings["rope_type"],
        "factor": settings["factor"],
        "original_context_length": settings["original_length"],
        "context_length": settings["target_length"],
    }
