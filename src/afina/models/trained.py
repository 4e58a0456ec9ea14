"""Load what a training run produced: the one place a trained run becomes a model again.

A run leaves either a full model (`<run>/model/`, config.json with any rope scaling in it) or an
adapter (`<run>/adapter/`, with `afina_rope.json` when the context was extended) that goes over
the base model it was trained on. Evaluation, export, serving and sequential stages all load
through `load_trained`, so the base, the adapter, the rope settings and the dtype always agree.
"""

from __future__ import annotations

from pathlib import Path

from afina.models.loader import load_model
from afina.models.rope import read_rope_settings
from afina.rundir import RunDir


def trained_weights(run_root: Path, full: bool | None = None) -> tuple[str, Path]:
    """("full", <run>/model) or ("adapter", <run>/adapter). `full`: what the recipe says (method.type=full);
    None: whichever training wrote (an adapter when both are there). A clear error when there is none."""
    run = RunDir(run_root)
    if full is None:
        full = not run.adapter.is_dir() and (run.model / "config.json").is_file()
    if full:
        return "full", run.require(run.model, "train")
    return "adapter", run.require(run.adapter, "train")


def load_adapter_over_base(
    base_spec: str, adapter_dir: Path, device="cpu", dtype: str = "float32", adapter_name: str = "default"
):
    """The base model, with the rope settings the adapter was trained with, and the adapter on it (switchable:
    `with model.disable_adapter():` gives the base back)."""
    from peft import PeftModel

    base = load_model(base_spec, dtype, rope=read_rope_settings(adapter_dir))
    return PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=adapter_name).to(device).eval()


def load_trained(
    run_root: Path, base_spec: str, device="cpu", dtype: str = "float32", full: bool | None = None, merge: bool = False
):
    """The trained model of a run: its full model, or its adapter over `base_spec` (with `merge=True`
    folded into the base weights: a plain model with the adapter's rope settings in its config)."""
    kind, folder = trained_weights(run_root, full)
    if kind == "full":
        return load_model(str(folder), dtype).to(device).eval()
    model = load_adapter_over_base(base_spec, folder, device, dtype)
    return model.merge_and_unload().eval() if merge else model
