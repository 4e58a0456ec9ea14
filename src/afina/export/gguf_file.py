"""Write a Llama-architecture Hugging Face model as a GGUF file (f16 or q8_0) with the `gguf` package.

The file carries the tokenizer (GPT-2 style byte-level BPE: tokens, types, merges, special ids)
and the chat template, so llama.cpp, Ollama and transformers (`gguf_file=`) read it on their own.

    write_gguf(model, tokenizer, merged_dir, Path("export/gguf/model-q8_0.gguf"), "q8_0")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

GgufType = Literal["f16", "q8_0"]


class ExportError(RuntimeError):
    """A model that cannot be exported in the asked format; the message says why and what to do."""


def _permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's rotary layout (halves) to GGUF's (interleaved pairs).

    llama.cpp applies rotary embeddings to adjacent pairs; transformers rotates the two halves of
    each head. Readers (llama.cpp, transformers) expect the reordered rows and undo it on load.
    """
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


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
    if rope_type in (None, "default"):
        return None
    if rope_type not in ("linear", "dynamic", "yarn"):
        raise ExportError(
            f"GGUF export: rope scaling '{rope_type}' is not supported; export the merged HF folder instead"
        )
    factor = float(params["factor"])
    target = context_length(config)
    original = params.get("original_max_position_embeddings") or (
        config.max_position_embeddings if rope_type == "dynamic" else round(target / factor)
    )
    return {
        "rope_type": rope_type,
        "factor": factor,
        "original_length": int(original),
        "target_length": int(target),
        "rope_theta": _rope_theta(config),
    }


def _add_rope_scaling(writer, settings: dict | None) -> None:
    """llama.cpp's keys: {arch}.rope.scaling.type / .factor / .original_context_length / .finetuned."""
    import gguf

    from afina.models.rope import RopeError, gguf_rope_metadata

    try:
        meta = gguf_rope_metadata(settings)
    except RopeError as exc:
        raise ExportError(str(exc)) from None
    if not meta:
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType(meta["type"]))
    writer.add_rope_scaling_factor(meta["factor"])
    writer.add_rope_scaling_orig_ctx_len(meta["original_context_length"])
    writer.add_rope_scaling_finetuned(True)


def read_gguf_rope_settings(path: Path) -> dict | None:
    """The rope scaling written in a GGUF file's metadata, as afina.models.rope settings (None: none)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    arch = fields["general.architecture"].contents()

    def value(key: str):
        field = fields.get(f"{arch}.{key}")
        return field.contents() if field is not None else None

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


def _source_gguf_pre(model_dir: Path) -> str:
    """The tokenizer pre-tokenizer name of the GGUF file the base model came from, if it came from one.

    llama.cpp picks its pre-tokenizer regex by this name; carrying it over keeps tokenization identical.
    """
    source = model_dir / "afina_source.json"
    if not source.is_file():
        return "default"
    from gguf import GGUFReader

    path = Path(json.loads(source.read_text())["source"])
    if not path.is_file():
        return "default"
    field = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else "default"


def _add_tokenizer(writer, tokenizer, tokenizer_dir: Path, base_model_dir: Path | None) -> None:
    import gguf

    # The Rust tokenizer's own description; `is_fast` is not set by every transformers 5.x release
    # (5.17 left it False for this backend), so ask for the backend itself.
    rust = getattr(tokenizer, "backend_tokenizer", None)
    backend = json.loads(rust.to_str()) if rust is not None else None
    if backend is None or backend["model"]["type"] != "BPE" or backend["model"].get("byte_fallback"):
        raise ExportError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style, as in SmolLM2, Llama 3, Qwen2); "
            "this tokenizer is not one: export the merged HF folder and convert it with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, index in vocab.items():
        tokens[index] = text
    types = [gguf.TokenType.NORMAL] * size
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_source_gguf_pre(base_model_dir) if base_model_dir else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, bos/eos/pad/unk ids, add_bos and the chat template, read from the saved tokenizer files.
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=size)
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def write_gguf(
    model,
    tokenizer,
    tokenizer_dir: Path,
    path: Path,
    outtype: GgufType,
    base_model_dir: Path | None = None,
    name: str | None = None,
) -> Path:
    """Write `model` (a plain, merged transformers Llama model) to `path`; return the path."""
    import gguf

    config = model.config
    if config.model_type != "llama":
        raise ExportError(
            f"GGUF export supports the llama architecture (the default model's); this model is '{config.model_type}'. "
            "Export the merged HF folder and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    n_layers, n_head = config.num_hidden_layers, config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    if head_dim * n_head != config.hidden_size:
        raise ExportError("GGUF export: head_dim * num_attention_heads != hidden_size is not supported")
    quant = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name or str(getattr(config, "name_or_path", "") or "afina-export").split("/")[-1])
    rope = rope_settings_of(config)
    # The extended window where rope scaling is set (llama.cpp sizes its default context from this).
    writer.add_context_length(rope["target_length"] if rope else config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    _add_rope_scaling(writer, rope)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, tokenizer_dir, base_model_dir)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # readers tie output to token_embd when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor '{hf_name}'")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute_for_gguf(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_for_gguf(data, n_kv)
        if data.ndim == 1 or data.shape[-1] % 32:
            writer.add_tensor(name, data.astype(np.float32))  # norms stay f32, as llama.cpp expects
        elif quant == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
