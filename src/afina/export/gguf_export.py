"""`export.formats: [gguf]`: every asked GGUF type from the merged model, each verified in llama.cpp.

For each file: the tensor types and fallbacks (gguf_convert.tensor_types), the metadata (architecture,
chat template, special tokens, rope scaling), then the checks of afina.export.verify run in llama.cpp
itself (the file's own tokenizer, teacher-forced logits, free-running greedy text), which decide, and,
where transformers reads the architecture, in transformers too, recorded beside them. A file that
fails is removed; the others stay.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from afina.export.gguf_convert import (
    GGUF_TYPES,
    convert_hf_folder,
    convert_lora_adapter,
    gguf_metadata,
    quantize,
    tensor_types,
)
from afina.export.gguf_file import ExportError
from afina.export.verify import Reference, judge, transformers_candidate


def export_gguf_files(
    merged_dir: Path,
    tokenizer,
    out_dir: Path,
    name: str,
    types: list[str],
    reference: Reference,
    max_kl: dict[str, float] | None = None,
    transformers_check: bool = True,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Write and verify `<out_dir>/<name>-<type>.gguf` for each type; return {"gguf_<type>": check}."""
    from transformers import AutoConfig

    from afina.export.gguf_file import rope_settings_of

    rope = rope_settings_of(AutoConfig.from_pretrained(merged_dir))  # raises for scaling llama.cpp lacks
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    f16 = out_dir / f"{name}-f16.gguf"
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        # Everything is quantized from one F16 file, as llama.cpp's own workflow does.
        source = f16 if "f16" in types else Path(scratch) / f"{name}-f16.gguf"
        convert_hf_folder(merged_dir, source, "f16", base_dir)
        for outtype in types:
            if outtype not in GGUF_TYPES:
                raise ExportError(f"export.gguf_types: unknown type '{outtype}' (known: {', '.join(GGUF_TYPES)})")
            path = source if outtype == "f16" else quantize(source, out_dir / f"{name}-{outtype}.gguf", outtype)
            results[f"gguf_{outtype}"] = verify_gguf_file(
                path, outtype, tokenizer, reference, max_kl, transformers_check, rope
            )
    for check in results.values():
        if check.get("ok") is False:
            Path(check["path"]).unlink(missing_ok=True)
            check["removed"] = True
    return results


def verify_gguf_file(
    path: Path,
    outtype: str,
    tokenizer,
    reference: Reference,
    max_kl: dict[str, float] | None,
    transformers_check: bool = True,
    rope: dict | None = None,
) -> dict[str, Any]:
    from afina.export.gguf_file import read_gguf_rope_settings
    from afina.export.llama_cpp_run import llama_cpp_candidate

    meta = gguf_metadata(path)
    check: dict[str, Any] = {
        "path": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 2),
        "architecture": meta["architecture"],
        **tensor_types(path, outtype),
    }
    check["chat_template_equal"] = (meta["chat_template"] or None) == (tokenizer.chat_template or None)
    check["eos_token_id_equal"] = meta["eos_token_id"] == tokenizer.eos_token_id
    # A template that starts with BOS relies on the runtime adding it (the Modelfile TEMPLATE leaves it out).
    from afina.export.ollama import starts_with_bos

    needs_bos = bool(tokenizer.chat_template) and starts_with_bos(tokenizer)
    check["bos_added_by_runtime"] = meta["add_bos_token"]
    check["bos_equal"] = not needs_bos or (
        meta["add_bos_token"] is not False and meta["bos_token_id"] == tokenizer.bos_token_id
    )
    # Short prompts do not reach the scaled positions: check the keys themselves.
    written = read_gguf_rope_settings(path)
    keys = ("rope_type", "factor", "original_length")
    check["rope_scaling_equal"] = ({k: written[k] for k in keys} if written else None) == (
        {k: rope[k] for k in keys} if rope else None
    )
    try:
        check["llama_cpp"] = judge(reference, outtype, llama_cpp_candidate(path, reference, tokenizer), max_kl)
    except ExportError as exc:  # a file llama.cpp does not load: failed, with the reason, like any other check
        check["llama_cpp"] = {"ok": False, "failed": str(exc)}
    hf = _transformers_check(path, outtype, reference, max_kl) if transformers_check else None
    if hf is not None:
        check["transformers"] = hf
    # The verdict is llama.cpp's (the runtime the file is for); transformers' reading is recorded beside it:
    # where its GGUF reader differs (its own tokenizer rebuild, an unsupported quantization), that is said there.
    failed = [f"llama.cpp: {check['llama_cpp']['failed']}"] if not check["llama_cpp"]["ok"] else []
    if not check["chat_template_equal"]:
        failed.append("the chat template in the file differs from the trained tokenizer's")
    if not check["rope_scaling_equal"]:
        failed.append(f"rope scaling in the file {written} differs from the model's {rope}")
    if not check["bos_equal"]:
        failed.append(
            f"the chat template starts with BOS {tokenizer.bos_token!r} (id {tokenizer.bos_token_id}) but the "
            f"file has bos_token_id {meta['bos_token_id']}, add_bos_token {meta['add_bos_token']}"
        )
    if not check["eos_token_id_equal"]:
        failed.append(f"eos_token_id {meta['eos_token_id']} in the file, {tokenizer.eos_token_id} in the tokenizer")
    check["ok"] = not failed
    if failed:
        check["failed"] = "; ".join(failed)
    return check


def _transformers_check(path: Path, outtype: str, reference: Reference, max_kl) -> dict[str, Any] | None:
    """Load the file with transformers (`gguf_file=`) where it reads the architecture; None where it does not."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from afina.export.gguf_file import read_gguf_rope_settings
    from afina.models.rope import apply_rope_settings

    arch = gguf_metadata(path)["architecture"]
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        return {"skipped": f"transformers does not read GGUF architecture '{arch}'"}
    folder, name = str(path.parent), path.name
    try:
        gguf_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # transformers' GGUF reader ignores the rope-scaling keys: apply what the file says.
        config = apply_rope_settings(AutoConfig.from_pretrained(folder, gguf_file=name), read_gguf_rope_settings(path))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32).eval()
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        return {"skipped": f"transformers could not read it ({type(exc).__name__}: {str(exc)[:200]})"}
    return judge(reference, outtype, transformers_candidate(model, gguf_tokenizer, reference), max_kl)


def export_lora_gguf(adapter_dir: Path, base_dir: Path, target: Path) -> dict[str, Any]:
    """The unmerged LoRA adapter as a GGUF adapter file (for llama.cpp --lora and Ollama's ADAPTER)."""
    convert_lora_adapter(adapter_dir, base_dir, target)
    meta = gguf_metadata(target)
    return {
        "path": str(target),
        "size_mb": round(target.stat().st_size / 2**20, 2),
        "architecture": meta["architecture"],
    }


def verify_gguf_adapter(
    adapter: dict[str, Any],
    base_dir: Path,
    base_gguf: Path,
    tokenizer,
    reference: Reference,
    max_kl: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Convert the base model to F16 GGUF and run it with the GGUF adapter in llama.cpp: it must reproduce the
    trained model as an F16 file of the merged model would."""
    from afina.export.llama_cpp_run import llama_cpp_candidate

    if not base_gguf.is_file():
        convert_hf_folder(base_dir, base_gguf, "f16", base_dir)
    check = judge(reference, "f16", llama_cpp_candidate(base_gguf, reference, tokenizer, Path(adapter["path"])), max_kl)
    return {
        **adapter,
        "base_path": str(base_gguf),
        "base_size_mb": round(base_gguf.stat().st_size / 2**20, 2),
        "llama_cpp": check,
        "ok": check["ok"],
        **({"failed": f"llama.cpp: {check['failed']}"} if not check["ok"] else {}),
    }
