"""`afina export`: write deployable weights and verify each export against the trained model.

Formats: the LoRA adapter (peft layout), the merged model (a plain transformers folder), GGUF files
(f16, q8_0) for llama.cpp and Ollama, and an Ollama Modelfile. Each export is loaded back and must
reproduce the trained model's last-position logits (within a tolerance that fits the format) and
its greedy continuations; the results go into the manifest under `export`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from afina.config import Recipe
from afina.data.format import render_prompt
from afina.device import pick_device
from afina.export.gguf_file import ExportError
from afina.export.verify import ExportCheckError, Reference, failure_message, judge, transformers_candidate
from afina.models.saved import require_saved_weights
from afina.rundir import RunDir, read_jsonl


def export(recipe: Recipe) -> dict[str, Any]:
    """Write every format of `export.formats`, verify each against the trained model, record all in the manifest.

    Raises ExportCheckError (after writing the manifest) naming each export that failed its check; the
    exports that passed are kept.
    """
    from afina.models import load_tokenizer, load_trained

    run = RunDir(recipe.run_dir)
    device = pick_device()
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)
    rows = read_jsonl(run.require(run.split_path("test"), "prepare"))[:3] or read_jsonl(run.split_path("train"))[:3]
    prompts = [probe_prompt(tokenizer, row) for row in rows]

    tuned = load_trained(run.root, recipe.model.name, device, full=recipe.method.type == "full")
    reference = Reference.of(tuned, tokenizer, prompts)
    formats = recipe.export.formats
    results: dict[str, Any] = {}
    if "adapter" in formats:
        results["adapter"] = _export_adapter(recipe, run, device, tokenizer, reference)
    if "gguf_adapter" in formats:
        results["gguf_adapter"] = _guarded(lambda: _export_gguf_adapter(recipe, run, tokenizer, reference))
    # Merging folds the adapter into the base weights in place: every later format starts from it.
    merged = tuned.merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
    if "merged" in formats:
        results["merged"] = _export_merged(merged, run, device, tokenizer, reference)
    if "gguf" in formats:
        results.update(_export_gguf(merged, tokenizer, run, recipe, reference))
    if "ollama" in formats:
        try:
            results["ollama"] = _export_ollama(run, tokenizer, results)
        except ExportError as exc:  # a chat template a Go TEMPLATE cannot express: said, not written wrong
            results["ollama"] = {"skipped": str(exc)}
    run.update_manifest(export=results)
    message = failure_message(results)
    if message:
        raise ExportCheckError(message)
    return results


def probe_prompt(tokenizer, row: dict[str, Any]) -> str:
    """The prompt an export is checked on, from a prepared row: a chat's prompt as served; a preference pair's
    or KTO row's shared prompt; text rows (domain text, context extension): the text's opening."""
    if "messages" in row:
        return render_prompt(tokenizer, row["messages"][:-1])
    if "prompt" in row:
        return render_prompt(tokenizer, row["prompt"])
    return row["text"][:400]


def _guarded(step) -> dict[str, Any]:
    """An export that cannot be made (a tool missing, an architecture llama.cpp's converter does not know):
    recorded as failed with the reason, so the other formats still get written and checked."""
    try:
        return step()
    except ExportError as exc:
        return {"ok": False, "failed": str(exc)}


def _export_adapter(recipe, run, device, tokenizer, reference: Reference) -> dict[str, Any]:
    from afina.models import load_adapter_over_base

    if recipe.method.type != "lora":
        return {"skipped": "full fine-tuning has no adapter; use the merged export"}
    target = run.export / "adapter"
    shutil.copytree(run.adapter, target, dirs_exist_ok=True)
    reloaded = load_adapter_over_base(recipe.model.name, target, device)
    return {"path": str(target), **judge(reference, "adapter", transformers_candidate(reloaded, tokenizer, reference))}


def _export_merged(merged, run, device, tokenizer, reference: Reference) -> dict[str, Any]:
    from afina.models import load_model

    target = run.export / "merged"
    _save_merged(merged, tokenizer, target)
    reloaded = load_model(str(target), "float32").to(device)
    return {"path": str(target), **judge(reference, "merged", transformers_candidate(reloaded, tokenizer, reference))}


def _save_merged(merged, tokenizer, target: Path) -> None:
    merged.save_pretrained(target, safe_serialization=True)
    require_saved_weights(target)
    tokenizer.save_pretrained(target)


def _export_gguf(merged, tokenizer, run, recipe, reference: Reference) -> dict[str, Any]:
    """The GGUF files of export.gguf_types, converted from the merged folder by llama.cpp's tools and verified."""
    from afina.export.gguf_convert import llama_cpp_missing
    from afina.export.gguf_export import export_gguf_files
    from afina.models.loader import resolve_model

    keys = [f"gguf_{t}" for t in recipe.export.gguf_types]
    missing = llama_cpp_missing()
    if missing:  # said beside each file and in the manifest; the other formats are still written
        return {key: {"skipped": missing} for key in keys}
    merged_dir = run.export / "merged"
    try:
        if not (merged_dir / "config.json").is_file():
            merged_dir = Path(tempfile.mkdtemp(prefix="afina-merged-"))
            _save_merged(merged, tokenizer, merged_dir)
        return export_gguf_files(
            merged_dir,
            tokenizer,
            run.export / "gguf",
            recipe.name,
            list(recipe.export.gguf_types),
            reference,
            recipe.export.gguf_max_kl,
            transformers_check=recipe.export.gguf_check_transformers,
            base_dir=Path(resolve_model(recipe.model.name)),
        )
    except ExportError as exc:  # the converter or llama.cpp is missing, or does not know this architecture
        return {key: {"ok": False, "failed": str(exc)} for key in keys}
    finally:
        if merged_dir != run.export / "merged":
            shutil.rmtree(merged_dir, ignore_errors=True)


def _export_gguf_adapter(recipe, run, tokenizer, reference: Reference) -> dict[str, Any]:
    """The LoRA adapter as a GGUF adapter over an F16 GGUF of the base model, verified in llama.cpp together."""
    from afina.export.gguf_convert import llama_cpp_missing
    from afina.export.gguf_export import export_lora_gguf, verify_gguf_adapter
    from afina.models.loader import resolve_model

    if recipe.method.type != "lora":
        return {"skipped": "full fine-tuning has no adapter; use the gguf export of the merged model"}
    missing = llama_cpp_missing()
    if missing:
        return {"skipped": missing}
    out = run.export / "gguf"
    base_dir = Path(resolve_model(recipe.model.name))
    return verify_gguf_adapter(
        export_lora_gguf(run.adapter, base_dir, out / f"{recipe.name}-lora-f16.gguf"),
        base_dir,
        out / f"{recipe.name}-base-f16.gguf",
        tokenizer,
        reference,
        recipe.export.gguf_max_kl,
    )


def _export_ollama(run, tokenizer, results: dict[str, Any]) -> dict[str, Any]:
    from afina.export.gguf_convert import llama_cpp_missing
    from afina.export.ollama import write_modelfile

    # The smallest verified file that users run (Q4_K_M, else Q8_0, else any).
    verified = {
        k.removeprefix("gguf_"): Path(v["path"])
        for k, v in results.items()
        if k.startswith("gguf_") and k != "gguf_adapter" and v.get("ok")
    }
    adapter = results.get("gguf_adapter") or {}
    if not verified and not adapter.get("ok"):
        missing = llama_cpp_missing()
        if missing:
            return {"skipped": f"the Ollama Modelfile needs a verified GGUF file; {missing}"}
        return {
            "skipped": "the Ollama Modelfile needs a verified GGUF file: add gguf (or gguf_adapter) to export.formats"
        }
    check: dict[str, Any] = {}
    if verified:
        path = next(
            (verified[t] for t in ("q4_k_m", "q8_0", "q5_k_m", "q6_k", "f16") if t in verified),
            next(iter(verified.values())),
        )
        check = write_modelfile(path.parent / "Modelfile", path, tokenizer)
    if adapter.get("ok"):
        folder = Path(adapter["path"]).parent
        with_adapter = write_modelfile(
            folder / ("Modelfile.adapter" if verified else "Modelfile"),
            Path(adapter["base_path"]),
            tokenizer,
            adapter=Path(adapter["path"]),
        )
        if not check:
            return with_adapter
        check["adapter_modelfile"] = with_adapter
        check["ok"] = check["ok"] and with_adapter["ok"]
    return check


def format_export(results: dict[str, Any]) -> str:
    """One line per format: where it went and how it was verified, or why it was skipped."""
    from afina.export.verify import describe_export

    return "\n".join(describe_export(fmt, info) for fmt, info in results.items())
