"""`afina export`: write deployable weights and verify each export against the trained model."""

from __future__ import annotations

import shutil
from typing import Any

import torch

from afina.config import Recipe
from afina.data.format import render_prompt
from afina.device import pick_device
from afina.rundir import RunDir, read_jsonl

LOGIT_TOLERANCE_FP32 = 1e-3


@torch.no_grad()
def _fingerprint(model, tokenizer, prompts: list[str], new_tokens: int = 16) -> dict[str, Any]:
    """Last-position logits and greedy continuations: what a reloaded export must reproduce."""
    logits, texts = [], []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        logits.append(model(input_ids=ids).logits[0, -1].float().cpu())
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return {"logits": logits, "texts": texts}


def _compare(expected: dict[str, Any], actual: dict[str, Any]) -> dict[str, Any]:
    diff = max(float((a - b).abs().max()) for a, b in zip(expected["logits"], actual["logits"]))
    same_text = expected["texts"] == actual["texts"]
    return {"max_logit_diff": diff, "greedy_text_equal": same_text, "ok": diff <= LOGIT_TOLERANCE_FP32 and same_text}


def export(recipe: Recipe) -> dict[str, Any]:
    from afina.eval.evaluate import load_tuned
    from afina.models import load_model, load_tokenizer

    run = RunDir(recipe.run_dir)
    device = pick_device()
    tokenizer = load_tokenizer(recipe.model.name)
    rows = read_jsonl(run.require(run.split_path("test"), "prepare"))[:3] or read_jsonl(run.split_path("train"))[:3]
    prompts = [render_prompt(tokenizer, row["messages"][:-1]) for row in rows]

    tuned = load_tuned(recipe, run, device)
    expected = _fingerprint(tuned, tokenizer, prompts)
    results: dict[str, Any] = {}
    for fmt in recipe.export.formats:
        if fmt == "adapter":
            if recipe.method.type != "lora":
                results["adapter"] = {"skipped": "full fine-tuning has no adapter; use the merged export"}
                continue
            target = run.export / "adapter"
            shutil.copytree(run.adapter, target, dirs_exist_ok=True)
            from peft import PeftModel

            reloaded = PeftModel.from_pretrained(load_model(recipe.model.name, "float32"), str(target)).to(device).eval()
        else:  # merged
            target = run.export / "merged"
            merged = tuned.merge_and_unload() if hasattr(tuned, "merge_and_unload") else tuned
            merged.save_pretrained(target, safe_serialization=True)
            tokenizer.save_pretrained(target)
            reloaded = load_model(str(target), "float32").to(device)
        check = _compare(expected, _fingerprint(reloaded, tokenizer, prompts))
        results[fmt] = {"path": str(target), **check}
        if not check["ok"]:
            raise RuntimeError(f"export {fmt} at {target} does not reproduce the trained model: {check}")
    run.update_manifest(export=results)
    return results
