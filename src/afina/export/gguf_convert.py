"""GGUF files with llama.cpp's own tools: its converter (convert_hf_to_gguf.py) and its quantizer.

Why these and not a writer of afina's own: llama.cpp's converter is maintained with the runtime that
reads its files. It knows every architecture llama.cpp runs (tensor names, q/k layouts, norm offsets,
soft-capping, sliding windows, MoE experts), and its tokenizer handling recognises each model's
pre-tokenizer. A hand-written writer covered one architecture and had to grow with each. The `gguf`
package on PyPI is only the file format (gguf-py), without the converter; the converter is not on PyPI.
It comes with the `llama-cpp-python` source distribution, which afina builds anyway for the
quantizer and for verification (`afina setup llama-cpp` or `make llama-cpp`: it builds the bindings and
copies the converter, its `conversion/` package and the gguf-py of the same llama.cpp version into
`<venv>/share/afina/llama.cpp`).
The converter runs as a subprocess with that gguf-py, so its version always matches the llama.cpp that
loads the files; afina's own `gguf` dependency is untouched.

F16 and Q8_0 come from the converter; the K-quants (Q6_K, Q5_K_M, Q4_K_M) from `llama_model_quantize`
applied to the F16 file, as llama.cpp's own `llama-quantize` does. Where a tensor's row length is not a
multiple of the K-quant block (256), llama.cpp quantizes that tensor with a fallback type: the file's
tensor table says which, and `tensor_types()` records it.

    paths = convert_hf_folder(merged_dir, out_dir / "model-f16.gguf")
    quantize(out_dir / "model-f16.gguf", out_dir / "model-q4_k_m.gguf", "q4_k_m")
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from afina.export.gguf_file import ExportError

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
# The tensor type most 2-D weights get in each file type; others (norms in F32, llama.cpp's choice of a
# higher type for some tensors in the _M mixes) are by design, not fallbacks.
_K_BLOCK = 256
_FAMILY = {
    "f16": {"F16"},
    "q8_0": {"Q8_0"},
    "q6_k": {"Q6_K"},
    "q5_k_m": {"Q5_K", "Q6_K"},
    "q4_k_m": {"Q4_K", "Q5_K", "Q6_K"},
}
_INSTALL_HINT = (
    "run `afina setup llama-cpp` (from a clone: `make llama-cpp`); it builds llama-cpp-python with the settings "
    "that work on CPUs and copies llama.cpp's converter into the virtual environment"
)


def converter_dir() -> Path:
    """The folder with llama.cpp's convert_hf_to_gguf.py: $AFINA_LLAMA_CPP_DIR, else <venv>/share/afina/llama.cpp."""
    configured = os.environ.get("AFINA_LLAMA_CPP_DIR")
    folder = Path(configured) if configured else Path(sysconfig.get_paths()["data"]) / "share" / "afina" / "llama.cpp"
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise ExportError(f"GGUF export needs llama.cpp's converter, not found in {folder}: {_INSTALL_HINT}")
    return folder


def llama_cpp_missing() -> str | None:
    """Why GGUF export cannot run here (the converter or the llama-cpp-python bindings not installed), or None."""
    if not llama_cpp_available():
        return f"GGUF export needs llama.cpp, which is not installed: {_INSTALL_HINT}"
    return None


def llama_cpp_available() -> bool:
    """True when both the converter and the llama-cpp-python bindings are installed."""
    import importlib.util

    try:
        converter_dir()
    except ExportError:
        return False
    return importlib.util.find_spec("llama_cpp") is not None


def _run_script(args: list[str], what: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py next to it
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise ExportError(f"{what} failed: {reason}")


def convert_hf_folder(model_dir: Path, outfile: Path, outtype: str = "f16", base_dir: Path | None = None) -> Path:
    """Convert a Hugging Face folder (config, safetensors, tokenizer) with llama.cpp's converter.

    The converter reads a staged view of the folder (links to its files; the folder itself is not
    changed) with what transformers 5's save_pretrained no longer writes and the converter needs,
    taken from the base model folder `base_dir` where the folder lacks it (_stage_folder).
    """
    import tempfile

    script = converter_dir() / "convert_hf_to_gguf.py"
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.with_name(outfile.name + ".tmp")
    with tempfile.TemporaryDirectory(prefix="afina-convert-") as stage:
        staged = _stage_folder(model_dir, Path(stage), base_dir)
        _run_script(
            [str(script), str(staged), "--outfile", str(tmp), "--outtype", outtype],
            f"llama.cpp's convert_hf_to_gguf.py on {model_dir}",
        )
    tmp.replace(outfile)
    return outfile


def _stage_folder(model_dir: Path, stage: Path, base_dir: Path | None = None) -> Path:
    """`stage/<folder name>`: links to model_dir's files, with
    - tokenizer.model where the folder has none (llama.cpp's converter reads a SentencePiece vocabulary, as
      Gemma's and Phi-3's, from it): the base's, or the GGUF file the base came from given back as one
      (vocab_source, write_sentencepiece_model);
    - `added_tokens_decoder` in tokenizer_config.json (from tokenizer.json): without it the converter types
      a SentencePiece vocabulary's added tokens (Gemma's <start_of_turn>) as text, which llama.cpp splits;
    - the base's tokenizer_class where transformers 5 wrote its generic TokenizersBackend: the converter
      picks the vocabulary reader by class (Phi-4's GPT2Tokenizer on the phi3 architecture).
    """
    staged = stage / model_dir.name
    staged.mkdir()
    for entry in model_dir.iterdir():
        (staged / entry.name).symlink_to(entry.resolve())
    source = vocab_source(base_dir) if base_dir is not None else None
    if source is not None and not (staged / "tokenizer.model").exists():
        if source.suffix == ".model":
            shutil.copyfile(source, staged / "tokenizer.model")
        else:
            write_sentencepiece_model(source, staged / "tokenizer.model")
    config_file, tokenizer_file = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if not config_file.is_file():
        return staged
    config = json.loads(config_file.read_text(encoding="utf-8"))
    changed = dict(config)
    if tokenizer_file.is_file() and "added_tokens_decoder" not in config:
        added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens") or []
        if added:
            changed["added_tokens_decoder"] = {
                str(token["id"]): {k: v for k, v in token.items() if k != "id"} for token in added
            }
    base_config = base_dir / "tokenizer_config.json" if base_dir is not None else None
    if config.get("tokenizer_class") == "TokenizersBackend" and base_config is not None and base_config.is_file():
        base_class = json.loads(base_config.read_text(encoding="utf-8")).get("tokenizer_class")
        if base_class and base_class != "TokenizersBackend":
            changed["tokenizer_class"] = base_class
    if changed != config:
        (staged / config_file.name).unlink()
        (staged / config_file.name).write_text(json.dumps(changed, indent=2), encoding="utf-8")
    return staged


def convert_lora_adapter(adapter_dir: Path, base_dir: Path, outfile: Path) -> Path:
    """A peft LoRA adapter as a GGUF adapter (llama.cpp `--lora`, Ollama `ADAPTER`), with llama.cpp's converter."""
    script = converter_dir() / "convert_lora_to_gguf.py"
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.with_name(outfile.name + ".tmp")
    _run_script(
        [str(script), str(adapter_dir), "--base", str(base_dir), "--outfile", str(tmp), "--outtype", "f16"],
        f"llama.cpp's convert_lora_to_gguf.py on {adapter_dir}",
    )
    tmp.replace(outfile)
    return outfile


class CapturedText:
    text = ""


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[CapturedText]:
    """File descriptor 2 redirected to a temporary file while native code runs (its prints bypass sys.stderr)."""
    captured = CapturedText()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", errors="replace")


def quantize(source: Path, target: Path, outtype: str, threads: int | None = None) -> Path:
    """Quantize a GGUF file with llama.cpp's `llama_model_quantize` (what `llama-quantize` runs)."""
    import ctypes

    import llama_cpp

    ftypes = {
        "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
        "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    }
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[outtype]
    params.nthread = threads or os.cpu_count() or 1
    tmp = target.with_name(target.name + ".tmp")
    # llama.cpp writes a line per K-quant fallback straight to stderr; afina records the fallbacks itself
    # (tensor_types), so its log goes to afina's log (`afina -v` shows it) and into the error when it fails.
    with native_stderr_captured() as captured:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
    if captured.text.strip():
        log.info("llama.cpp quantize %s -> %s:\n%s", source.name, outtype, captured.text.rstrip())
    if status != 0:
        tmp.unlink(missing_ok=True)
        tail = "; ".join(captured.text.strip().splitlines()[-3:])
        raise ExportError(
            f"llama.cpp could not quantize {source} to {outtype} (llama_model_quantize returned {status}"
            + (f": {tail}" if tail else "")
            + ")"
        )
    tmp.replace(target)
    return target


def tensor_types(path: Path, outtype: str) -> dict[str, Any]:
    """The file's tensor types (counts) and the fallbacks: 2-D weights stored in a type outside the asked
    type's family, each with its shape and the reason llama.cpp gives (row length not a multiple of 256)."""
    from afina.models.gguf_header import read_gguf_header

    counts: Counter[str] = Counter()
    fallbacks = []
    family = _FAMILY.get(outtype, set())
    for tensor in read_gguf_header(path).tensors:
        kind = tensor.type_name
        counts[kind] += 1
        shape = tensor.shape  # GGUF order: row length first
        if len(shape) < 2 or kind in family or kind in ("F32",) or not family:
            continue
        reason = (
            f"row length {shape[0]} is not a multiple of {_K_BLOCK}"
            if shape[0] % _K_BLOCK
            else "llama.cpp's choice for this tensor"
        )
        fallbacks.append({"tensor": tensor.name, "shape": shape, "type": kind, "reason": reason})
    by_type = Counter(f["type"] for f in fallbacks)
    return {
        "tensor_types": dict(sorted(counts.items())),
        "fallbacks": fallbacks,
        "fallback_summary": {k: v for k, v in sorted(by_type.items())},
    }


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The fields a user checks: architecture, name, chat template, special token ids, tokenizer model."""
    from afina.models.gguf_header import read_gguf_header

    value = read_gguf_header(path).get
    return {
        "architecture": value("general.architecture"),
        "name": value("general.name"),
        "chat_template": value("tokenizer.chat_template"),
        "tokenizer_model": value("tokenizer.ggml.model"),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "add_bos_token": value("tokenizer.ggml.add_bos_token"),
        "file_type": value("general.file_type"),
    }


def vocab_source(model_dir: Path) -> Path | None:
    """Where the base model's SentencePiece vocabulary is, for convert_hf_folder: its tokenizer.model, or the GGUF
    file it was converted from (afina.models.loader.convert_gguf); None when neither."""
    if (model_dir / "tokenizer.model").is_file():
        return model_dir / "tokenizer.model"
    return source_gguf(model_dir)


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file a cached model folder was converted from (afina.models.loader.convert_gguf), if any."""
    record = model_dir / "afina_source.json"
    if not record.is_file():
        return None
    path = Path(json.loads(record.read_text(encoding="utf-8"))["source"])
    return path if path.is_file() else None


def write_sentencepiece_model(gguf_path: Path, target: Path) -> bool:
    """Write the SentencePiece tokenizer.model a GGUF file's llama-type (SentencePiece) vocabulary describes.

    A model that came as a GGUF file (Gemma 3 270M) has no tokenizer.model once transformers reads it,
    and llama.cpp's converter reads Gemma's vocabulary only from one. The GGUF vocabulary holds exactly
    what the converter takes from it (pieces, scores, types; SentencePiece and GGUF number the types
    alike), so the file written here gives the converter the source file's own vocabulary back.
    Returns False (writes nothing) when the GGUF vocabulary is not SentencePiece-style.
    """
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    fields = GGUFReader(str(gguf_path)).fields
    if fields.get("tokenizer.ggml.model") is None or fields["tokenizer.ggml.model"].contents() != "llama":
        return False

    def value(key: str, default=None):
        field = fields.get(key)
        return field.contents() if field is not None else default

    tokens, scores, types = (
        value("tokenizer.ggml.tokens"),
        value("tokenizer.ggml.scores"),
        value("tokenizer.ggml.token_type"),
    )
    proto = sp_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code, no stubs
    for piece, score, kind in zip(tokens, scores, types):
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), int(kind)
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE  # type: ignore[attr-defined]
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = any(int(k) == 6 for k in types)
    trainer.unk_id = int(value("tokenizer.ggml.unknown_token_id", 0))
    trainer.bos_id = int(value("tokenizer.ggml.bos_token_id", -1))
    trainer.eos_id = int(value("tokenizer.ggml.eos_token_id", -1))
    trainer.pad_id = int(value("tokenizer.ggml.padding_token_id", -1))
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(value("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    target.write_bytes(proto.SerializeToString())
    return True
