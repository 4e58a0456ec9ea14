"""Batched greedy generation with the KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from afina.data.format import render_prompt
from afina.device import progress_interval


@dataclass
class Generation:
    """Answers with what they cost: each example's latency (its batch's wall time) and new tokens."""

    answers: list[str]
    latency_s: list[float] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    wall_s: float = 0.0


@torch.no_grad()
def generate_timed(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int,
    batch_size: int,
    autocast,
    desc: str = "generate",
    progress: bool = True,
    tools: list[list[dict[str, Any]]] | None = None,
) -> Generation:
    """Greedy, batched, KV-cached generation, timed per batch; `tools`: each conversation's tools, listed in its
    prompt by the chat template."""
    prompts = [
        render_prompt(tokenizer, messages, tools[i] if tools else None) for i, messages in enumerate(conversations)
    ]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    result = Generation([""] * len(prompts), [0.0] * len(prompts), [0] * len(prompts))
    pad_id = tokenizer.pad_token_id
    started = time.perf_counter()
    for start in tqdm(
        range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, mininterval=progress_interval()
    ):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in idx], device=model.device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx], device=model.device)
        batch_start = time.perf_counter()
        with autocast():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
                use_cache=True,
            )
        batch_time = time.perf_counter() - batch_start
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            # Tokens up to and including the first end-of-sequence; the rest is batch padding.
            ends = [k for k, t in enumerate(new) if t == tokenizer.eos_token_id]
            result.new_tokens[i] = ends[0] + 1 if ends else len(new)
            result.answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
            result.latency_s[i] = batch_time
    result.wall_s = time.perf_counter() - started
    return result


# Where a recipe does not set eval.max_new_tokens, answers may run to the test references' 95th-percentile
# length with a margin: long enough that answers are judged whole, bounded so a model that never stops does
# not make eval crawl. Both bounds are stated in the report beside the value used.
DEFAULT_ANSWER_TOKENS = 64
DERIVED_MARGIN, DERIVED_EXTRA, DERIVED_MIN, DERIVED_MAX = 1.25, 8, 16, 1024
# An answer that used every token of its budget was (most likely) cut short; past this share the report says so.
CUT_WARNING_SHARE = 0.05


@dataclass(frozen=True)
class AnswerBudget:
    """eval.max_new_tokens as used, and where it came from."""

    tokens: int
    source: str  # "recipe" (eval.max_new_tokens) or "references" (derived from the test references)
    reference_p95: int | None = None

    def describe(self) -> str:
        if self.source == "recipe":
            return f"{self.tokens} new tokens (eval.max_new_tokens)"
        return (
            f"{self.tokens} new tokens, from the test references (95th percentile {self.reference_p95} tokens, "
            f"x{DERIVED_MARGIN} + {DERIVED_EXTRA}, within {DERIVED_MIN}..{DERIVED_MAX}; eval.max_new_tokens sets it)"
        )


def answer_budget(set_tokens: int | None, tokenizer, references: list[str], window: int | None = None) -> AnswerBudget:
    """The answer budget: the recipe's eval.max_new_tokens, else derived from the references' token lengths
    (capped at half the model's window, where known)."""
    if set_tokens is not None:
        return AnswerBudget(set_tokens, "recipe")
    lengths = sorted(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references if text)
    if not lengths:
        return AnswerBudget(DEFAULT_ANSWER_TOKENS, "references")
    p95 = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
    tokens = int(p95 * DERIVED_MARGIN) + DERIVED_EXTRA
    upper = min(DERIVED_MAX, window // 2) if window else DERIVED_MAX
    return AnswerBudget(max(DERIVED_MIN, min(tokens, upper)), "references", p95)


def cut_answers(new_tokens: list[int], budget: int) -> dict[str, float]:
    """How many answers used their whole budget (stopped by the cap, not by the model)."""
    cut = sum(1 for n in new_tokens if n >= budget)
    return {"cut": cut, "answers": len(new_tokens), "share": round(cut / max(len(new_tokens), 1), 4)}
