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
    rope_type = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise ExportError(f"GGUF export: rope scaling '{rope_type}' is not supported yet; export the merged HF folder instead")
    return float(theta)


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

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend["model"]["type"] != "BPE" or backend["model"].get("byte_fallback"):
        raise ExportError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2 style, as in SmolLM2, Llama 3, Qwen2); "
            "this tokenizer is not one: export the merged HF folder and convert it with llama.cpp's convert_hf_to_gguf.py"
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


def write_gguf(model, tokenizer, tokenizer_dir: Path, path: Path, outtype: GgufType, base_model_dir: Path | None = None,
               name: str | None = None) -> Path:
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
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
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
