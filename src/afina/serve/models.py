"""What `afina serve` serves: one base model in memory, with any number of LoRA adapters over it.

Each adapter is served under its own name (a run's name by default), the base under its model
name; a request's `model` field picks one. Switching adapters in peft is cheap (no weights move),
so one process serves them all.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afina.models.loader import ModelError


class ServeError(ModelError):
    """A target or adapter that cannot be served; the message says what and what to do."""


@dataclass
class ServedModels:
    model: Any  # the base model, or a PeftModel holding one peft adapter per served fine-tune
    tokenizer: Any
    autocast: Any
    max_context: int
    base_name: str
    default: str
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> peft adapter name
    rope: dict | None = None  # the adapters' rope scaling (afina_rope.json), which a reloaded adapter must share
    # Held by each generation batch and by an adapter switch (afina.serve.reload), so they never overlap.
    lock: threading.RLock = field(default_factory=threading.RLock)
    watcher: Any = None
    gguf: Path | None = None  # the file the llama.cpp engine runs (serve/llamacpp_engine.py); None: transformers

    @property
    def names(self) -> list[str]:
        """The served names, the default first."""
        return [self.default] + [n for n in [*self.adapters, self.base_name] if n != self.default]

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """The model with `name`'s adapter active (or none, for the base). Hold the generation lock."""
        with self.lock:
            if name in self.adapters:
                self.model.set_adapter(self.adapters[name])
                yield self.model
            elif self.adapters:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model


def _adapter_dir(path: Path) -> Path:
    """A run directory's adapter/ (or export/adapter), or an adapter folder itself."""
    for candidate in (path / "adapter", path / "export" / "adapter", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ServeError(
        f"{path}: no LoRA adapter here (looked for adapter_config.json in adapter/, export/adapter/ and the folder)"
    )


def _run_base_model(run_root: Path) -> str | None:
    manifest = run_root / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text(encoding="utf-8"))["recipe"]["model"]["name"]
    return None


def _run_chat_template(run_root: Path) -> str | None:
    """The run's model.chat_template (the template it was trained with); None: the model's own."""
    manifest = run_root / "manifest.json"
    if run_root.is_dir() and manifest.is_file():
        return json.loads(manifest.read_text(encoding="utf-8"))["recipe"]["model"].get("chat_template")
    return None


def load_served(target: str, adapters: dict[str, str] | None = None, watch: str | None = None) -> ServedModels:
    """Load a run directory (its adapter over its base, or its full model) or a model spec, plus adapters;
    `watch`: a serving file whose adapter replaces the default one when it changes (afina.serve.reload)."""
    served = _load_served(target, adapters)
    if watch:
        from afina.serve.reload import AdapterWatcher

        served.watcher = AdapterWatcher(served, watch).start()
    return served


def _load_served(target: str, adapters: dict[str, str] | None = None) -> ServedModels:
    from afina.device import autocast_factory, pick_device, resolve_precision, resolve_weight_dtype
    from afina.models import load_adapter_over_base, load_model, load_tokenizer, load_trained

    adapters = dict(adapters or {})
    device = pick_device()
    precision = resolve_precision("auto", device)
    autocast = autocast_factory(precision, device)
    dtype = resolve_weight_dtype("auto", precision, device)  # bfloat16 on a GPU that has it, float32 on this CPU
    root = Path(target)
    base_spec = _run_base_model(root) if root.is_dir() else None
    template = _run_chat_template(root)
    own: dict[str, Path] = {}
    if base_spec is not None:  # a run directory
        if (root / "model" / "config.json").is_file() and not (root / "adapter").is_dir():
            if adapters:
                raise ServeError(
                    f"{root}: a fully fine-tuned run has no base to put adapters over; serve its base model instead"
                )
            model = load_trained(root, base_spec, device, dtype, full=True)
            return ServedModels(
                model, load_tokenizer(base_spec, template), autocast, _context(model), root.name, root.name
            )
        own[root.resolve().name] = _adapter_dir(root)
    else:
        base_spec = target
    for name, path in adapters.items():
        path_ = Path(path)
        run_base = _run_base_model(path_)
        if run_base is not None and run_base != base_spec:
            raise ServeError(f"adapter '{name}' ({path}) was trained on '{run_base}', not on '{base_spec}'")
        own[name] = _adapter_dir(path_)

    from afina.models.rope import read_rope_settings

    ropes = {name: read_rope_settings(path) for name, path in own.items()}
    if len({json.dumps(r, sort_keys=True) for r in ropes.values()}) > 1:
        raise ServeError(
            "the adapters were trained with different rope scaling (afina_rope.json): they cannot share "
            f"one base model; serve them separately ({', '.join(f'{n}: {r}' for n, r in ropes.items())})"
        )
    base_name = Path(base_spec).name if "/" in base_spec or Path(base_spec).exists() else base_spec
    if not own:
        base = load_model(base_spec, dtype).to(device).eval()
        return ServedModels(base, load_tokenizer(base_spec, template), autocast, _context(base), base_name, base_name)
    peft_names = {name: f"adapter{i}" for i, name in enumerate(own)}
    (first_name, first_path), *others = own.items()
    model = load_adapter_over_base(base_spec, first_path, device, dtype, adapter_name=peft_names[first_name])
    for name, adapter_path in others:  # the same base (same rope settings, checked above) under every adapter
        model.load_adapter(str(adapter_path), adapter_name=peft_names[name])
    return ServedModels(
        model.to(device).eval(),
        load_tokenizer(base_spec, template),
        autocast,
        _context(model.get_base_model()),
        base_name,
        first_name,
        peft_names,
        rope=next(iter(ropes.values())),
    )


def _context(model) -> int:
    from afina.models.rope import context_length

    return context_length(model.config)
