"""GGUF helpers shared by the export steps: the export error, and the rope scaling a model or a file carries.

The files themselves are written by llama.cpp's converter and quantizer (afina.export.gguf_convert).
"""

from __future__ import annotations

from pathlib import Path


class ExportError(RuntimeError):
    """A model that cannot be exported in the asked format; the message says why and what to do."""


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    if theta is None:
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def rope_settings_of(config) -> dict | None:
    """The rope scaling a transformers config carries, as afina.models.rope settings (None: plain rotary)."""
    from afina.models.rope import context_length

    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type in (None, "default") or rope_type not in ("linear", "dynamic", "yarn"):
        return None  # plain rotary, or a model's own scheme (llama3, longrope, ...) that llama.cpp's converter writes
    if rope_type == "dynamic":
        raise ExportError(
            "GGUF export: llama.cpp has no dynamic NTK rope scaling (its rope.scaling.type is none, "
            "linear or yarn); use context.rope_scaling=linear or yarn for GGUF, or export the merged HF folder"
        )
    factor = float(params["factor"])
    target = context_length(config)
    original = params.get("original_max_position_embeddings") or round(target / factor)
    return {
        "rope_type": rope_type,
        "factor": factor,
        "original_length": int(original),
        "target_length": int(target),
        "rope_theta": _rope_theta(config),
    }


def read_gguf_rope_settings(path: Path) -> dict | None:
    """The rope scaling written in a GGUF file's metadata, as afina.models.rope settings (None: none)."""
    from afina.models.gguf_header import read_gguf_header

    header = read_gguf_header(path)
    arch = header.get("general.architecture")

    def value(key: str):
        return header.get(f"{arch}.{key}")

    rope_type = value("rope.scaling.type")
    if rope_type in (None, "none"):
        return None
    return {
        "rope_type": rope_type,
        "factor": float(value("rope.scaling.factor")),
        "original_length": int(value("rope.scaling.original_context_length")),
        "target_length": int(value("context_length")),
        "rope_theta": float(value("rope.freq_base")),
    }
