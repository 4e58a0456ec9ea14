"""Typed recipe schema: one YAML file describes a run.

A recipe is validated strictly: an unknown key, a wrong type or a value out of range is an
error that names the key, what was given and what is allowed.

    recipe = load_recipe("recipe.yaml", ["training.epochs=3", "method.r=8"])
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says where and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="A packaged model name (see `afina models`), a local Hugging Face folder, "
        "a local .gguf file, or a hub name where a hub is reachable.",
    )


class SplitConfig(_Section):
    train: float = Field(0.7, ge=0.0, le=1.0)
    validation: float = Field(0.1, ge=0.0, le=1.0)
    test: float = Field(0.2, ge=0.0, le=1.0)


class DataConfig(_Section):
    path: str | None = Field(None, description="A data file (JSONL). Relative paths resolve from the recipe's folder.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical fields to the file's own names, e.g. {prompt: question, completion: answer}.",
    )
    system_prompt: str | None = Field(None, description="Added as the system turn where a row has none.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    max_length: int = Field(512, ge=16, le=1_048_576, description="Longest tokenized example; longer ones are rejected.")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Which tokens carry loss: the assistant turns only, or every token."
    )


class MethodConfig(_Section):
    type: Literal["lora", "full"] = "lora"
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainingConfig(_Section):
    epochs: float = Field(3.0, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    warmup_ratio: float = Field(0.05, ge=0.0, le=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 where the CPU or GPU supports it fast, otherwise fp32."
    )
    log_every: int = Field(5, ge=1, description="Write a metrics line every N optimizer steps.")


class EvalConfig(_Section):
    max_new_tokens: int = Field(64, ge=1, le=8192)
    batch_size: int = Field(16, ge=1, le=4096)
    max_examples: int | None = Field(None, ge=1, description="Evaluate on at most this many test rows.")
    systems: list[Literal["base", "tuned"]] = Field(default_factory=lambda: ["base", "tuned"])


class ExportConfig(_Section):
    formats: list[Literal["adapter", "merged", "gguf", "ollama"]] = Field(
        default_factory=lambda: ["adapter", "merged", "gguf", "ollama"],
        description="adapter (peft), merged (plain transformers folder), gguf (llama.cpp; llama architecture), "
        "ollama (a Modelfile next to the GGUF file).",
    )
    gguf_types: list[Literal["f16", "q8_0"]] = Field(default_factory=lambda: ["f16", "q8_0"], min_length=1)
    gguf_tolerance_f16: float = Field(
        0.1, gt=0, description="Largest absolute difference allowed between the trained model's and the reloaded "
        "f16 GGUF file's last-position logits; greedy text must match, or differ only at near-ties within it.",
    )
    gguf_tolerance_q8_0: float = Field(0.5, gt=0, description="The same for the q8_0 GGUF file.")


class ServeConfig(_Section):
    """`afina serve` settings: a `serve:` recipe section, or flags of the same names."""

    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 serves this machine only.")
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(
        None, description="Require `Authorization: Bearer <key>` on /v1/* (also read from $AFINA_API_KEY)."
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="More LoRA adapters over the same base, served by name: {name: run directory or adapter folder}.",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longer prompts get 400 (default: the model's context).")
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for; more gets 400.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_queue: int = Field(256, ge=1, description="Requests waiting for the model beyond this get 429 (retry later).")
    max_batch: int = Field(8, ge=1, le=256, description="Greedy requests for one model that wait together run as one "
                           "batch of up to this many (1: one at a time).")
    log_dir: str | None = Field(
        None, description="Write requests.jsonl and feedback.jsonl here (needed for POST /v1/feedback)."
    )
    redact_pii: bool = Field(False, description="Mask e-mail addresses, phone and card numbers, IPs in the request log.")


class Recipe(_Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The run's name.")
    output_dir: str = Field("runs", description="Runs are written to <output_dir>/<name>/.")
    seed: int = Field(42, ge=0)
    task: Literal["chat"] = Field("chat", description="The task type.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    # Where the recipe file lives; relative data paths resolve from here. Not part of the schema.
    _base_dir: Path = Path(".")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self._base_dir / path)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _describe_allowed(model_cls: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """The keys allowed at a location, for the unknown-key message."""
    cls = model_cls
    for part in loc[:-1]:
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return ""
        annotation = cls.model_fields[part].annotation
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if cls is None:
        return ""
    keys = list(cls.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f" Allowed keys here: {', '.join(keys)}.{hint}"


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: the recipe is not valid:"]
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"])
        given = item.get("input")
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}'.{_describe_allowed(Recipe, item['loc'])}")
        else:
            lines.append(f"  - '{key}': {item['msg']} (given: {given!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.epochs=3` -> (['training', 'epochs'], 3). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (model:, data:, ...), got {type(data).__name__}")
    return data


def build_recipe(data: dict[str, Any], source: str, base_dir: Path) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source)) from None
    recipe._base_dir = base_dir
    return recipe


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or none: all defaults), apply `key.sub=value` overrides, validate."""
    data = read_recipe_file(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    return build_recipe(data, str(path) if path else "<overrides>", base_dir)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
