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

import torch

from afina.config import Recipe
from afina.data.format import render_prompt
from afina.device import pick_device
from afina.export.gguf_file import ExportError
from afina.rundir import RunDir, read_jsonl

LOGIT_TOLERANCE_FP32 = 1e-3


@torch.no_grad()
def _fingerprint(model, tokenizer, prompts: list[str], new_tokens: int = 16) -> dict[str, Any]:
    """Last-position logits and greedy continuations: what a reloaded export must reproduce."""
    logits, texts, ids_all, sequences = [], [], [], []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        logits.append(model(input_ids=ids).logits[0, -1].float().cpu())
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        ids_all.append(ids[0].tolist())
        sequences.append(out[0].tolist())
    return {"logits": logits, "texts": texts, "input_ids": ids_all, "sequences": sequences}


@torch.no_grad()
def _greedy_margin(model, expected: dict[str, Any]) -> float:
    """How far the trained model's greedy tokens fall below the reloaded model's best token, at worst.

    Quantized weights may flip a near-tie between two tokens; that is within the format's tolerance.
    Teacher-forcing the trained model's greedy sequence through the reloaded model measures it.
    """
    worst = 0.0
    for prompt_ids, sequence in zip(expected["input_ids"], expected["sequences"]):
        if len(sequence) == len(prompt_ids):
            continue
        ids = torch.tensor([sequence], device=model.device)
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        chosen = logits.gather(1, ids[0, len(prompt_ids) :, None])[:, 0]
        worst = max(worst, float((logits.max(-1).values - chosen).max()))
    return worst


def _compare(expected: dict[str, Any], actual: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Max absolute logit difference, top-1 agreement and greedy text equality."""
    diff = max(float((a - b).abs().max()) for a, b in zip(expected["logits"], actual["logits"]))
    top1 = all(int(a.argmax()) == int(b.argmax()) for a, b in zip(expected["logits"], actual["logits"]))
    same_text = expected["texts"] == actual["texts"]
    same_ids = expected["input_ids"] == actual["input_ids"]
    ok = diff <= tolerance and same_text and same_ids
    return {
        "max_logit_diff": diff,
        "logit_tolerance": tolerance,
        "top1_equal": top1,
        "greedy_text_equal": same_text,
        "tokenization_equal": same_ids,
        "ok": ok,
    }


def export(recipe: Recipe) -> dict[str, Any]:
    from afina.models import load_tokenizer, load_trained, resolve_model

    run = RunDir(recipe.run_dir)
    device = pick_device()
    tokenizer = load_tokenizer(recipe.model.name)
    rows = read_jsonl(run.require(run.split_path("test"), "prepare"))[:3] or read_jsonl(run.split_path("train"))[:3]
    # Chat rows: the prompt as served; text rows (domain text, context extension): the text's opening.
    prompts = [
        render_prompt(tokenizer, row["messages"][:-1]) if "messages" in row else row["text"][:400] for row in rows
    ]

    tuned = load_trained(run.root, recipe.model.name, device, full=recipe.method.type == "full")
    expected = _fingerprint(tuned, tokenizer, prompts)
    formats = recipe.export.formats
    results: dict[str, Any] = {}
    if "adapter" in formats:
        results["adapter"] = _export_adapter(recipe, run, device, tokenizer, prompts, expected)
    # Merging folds the adapter into the base weights in place: every later format starts from it.
    merged = tuned.merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
    if "merged" in formats:
        results["merged"] = _export_merged(merged, run, device, tokenizer, prompts, expected)
    gguf_paths: dict[str, Path] = {}
    if "gguf" in formats:
        base_dir = Path(resolve_model(recipe.model.name))
        for outtype in recipe.export.gguf_types:
            key = f"gguf_{outtype}"
            try:
                results[key] = _export_gguf(merged, tokenizer, run, outtype, recipe, base_dir, prompts, expected)
                gguf_paths[outtype] = Path(results[key]["path"])
            except ExportError as exc:  # an architecture or tokenizer GGUF export does not cover: say so, go on
                results[key] = {"skipped": str(exc)}
    if "ollama" in formats:
        try:
            results["ollama"] = _export_ollama(run, tokenizer, gguf_paths)
        except ExportError as exc:
            results["ollama"] = {"skipped": str(exc)}
    run.update_manifest(export=results)
    failed = {k: v for k, v in results.items() if v.get("ok") is False}
    if failed:
        raise RuntimeError(f"exports do not reproduce the trained model: {failed}")
    return results


def _export_adapter(recipe, run, device, tokenizer, prompts, expected) -> dict[str, Any]:
    from afina.models import load_adapter_over_base

    if recipe.method.type != "lora":
        return {"skipped": "full fine-tuning has no adapter; use the merged export"}
    target = run.export / "adapter"
    shutil.copytree(run.adapter, target, dirs_exist_ok=True)
    reloaded = load_adapter_over_base(recipe.model.name, target, device)
    return {"path": str(target), **_compare(expected, _fingerprint(reloaded, tokenizer, prompts), LOGIT_TOLERANCE_FP32)}


def _export_merged(merged, run, device, tokenizer, prompts, expected) -> dict[str, Any]:
    from afina.models import load_model

    target = run.export / "merged"
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    reloaded = load_model(str(target), "float32").to(device)
    return {"path": str(target), **_compare(expected, _fingerprint(reloaded, tokenizer, prompts), LOGIT_TOLERANCE_FP32)}


def _export_gguf(merged, tokenizer, run, outtype, recipe, base_dir, prompts, expected) -> dict[str, Any]:
    """Write the GGUF file, then load it back with transformers (weights and tokenizer from the file)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from afina.export.gguf_file import write_gguf

    target = run.export / "gguf" / f"{recipe.name}-{outtype}.gguf"
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        write_gguf(merged, tokenizer, Path(tok_dir), target, outtype, base_dir, name=recipe.name)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(target.parent), gguf_file=target.name)
    from afina.export.gguf_file import read_gguf_rope_settings
    from afina.models.rope import apply_rope_settings

    # transformers' GGUF reader ignores the rope-scaling keys: apply what the file says, so that the
    # check below verifies the keys written (a wrong or missing key shows as a logit mismatch).
    config = AutoConfig.from_pretrained(str(target.parent), gguf_file=target.name)
    config = apply_rope_settings(config, read_gguf_rope_settings(target))
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(target.parent), gguf_file=target.name, config=config, dtype=torch.float32
    ).eval()
    tolerance = getattr(recipe.export, f"gguf_tolerance_{outtype}")
    check = _compare(expected, _fingerprint(reloaded, gguf_tokenizer, prompts), tolerance)
    check["chat_template_equal"] = gguf_tokenizer.chat_template == tokenizer.chat_template
    # Greedy text may differ only where the trained model's choice is a near-tie in the reloaded file.
    check["greedy_margin"] = _greedy_margin(reloaded, expected)
    greedy_ok = check["greedy_text_equal"] or check["greedy_margin"] <= tolerance
    check["ok"] = (
        check["max_logit_diff"] <= tolerance
        and greedy_ok
        and check["tokenization_equal"]
        and check["chat_template_equal"]
    )
    return {"path": str(target), "size_mb": round(target.stat().st_size / 2**20, 1), **check}


def _export_ollama(run, tokenizer, gguf_paths: dict[str, Path]) -> dict[str, Any]:
    from afina.export.ollama import write_modelfile

    if not gguf_paths:
        return {"skipped": "the Ollama Modelfile needs a GGUF file: add gguf to export.formats"}
    # The smallest verified file: what Ollama users run.
    gguf_path = gguf_paths.get("q8_0") or next(iter(gguf_paths.values()))
    return write_modelfile(gguf_path.parent / "Modelfile", gguf_path, tokenizer)


def format_export(results: dict[str, Any]) -> str:
    """One line per format: where it went and how it was verified, or why it was skipped."""
    lines = []
    for fmt, info in results.items():
        if "skipped" in info:
            lines.append(f"{fmt}: skipped ({info['skipped']})")
        elif "max_logit_diff" in info:
            lines.append(
                f"{fmt}: {info['path']} (verified: max logit diff {info['max_logit_diff']:.2e}, "
                f"greedy text equal: {info['greedy_text_equal']})"
            )
        else:
            lines.append(
                f"{fmt}: {info['path']} (verified: template reproduces the chat template: "
                f"{info['template_matches_chat_template']}; stop {', '.join(info['stop'])})"
            )
    return "\n".join(lines)
