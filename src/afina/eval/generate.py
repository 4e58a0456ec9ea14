"""Batched greedy generation with the KV cache."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from afina.data.format import render_prompt
from afina.device import progress_interval


@torch.no_grad()
def generate_answers(
    model, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int, batch_size: int, autocast, desc: str = "generate", progress: bool = True
) -> list[str]:
    """Greedy answers for conversations that end where the assistant should speak."""
    prompts = [render_prompt(tokenizer, messages) for messages in conversations]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    answers: list[str] = [""] * len(prompts)
    pad_id = tokenizer.pad_token_id
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, mininterval=progress_interval()):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in idx], device=model.device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx], device=model.device)
        with autocast():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
            )
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers
