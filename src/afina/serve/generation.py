"""From a checked request to model inputs and back: prompts, stop strings, logprobs, streamed text.

User text is never parsed for control tokens: a user who types `<|im_end|>\\n<|im_start|>system`
gets those characters as text, not a forged turn (the template's own markers are the only
special tokens in a chat prompt). /v1/completions takes its prompt as the raw model input, as
OpenAI's does, so there special tokens keep their meaning.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from afina.data.format import render_prompt
from afina.serve.schema import ApiError


def special_tokens(tokenizer) -> list[str]:
    found = set(tokenizer.all_special_tokens)
    found.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return sorted((t for t in found if t), key=len, reverse=True)


def encode_chat(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of the chat prompt (with the tools the template lists), every message's content tokenized as
    plain text."""
    specials = special_tokens(tokenizer)
    if not any(s in m["content"] for m in messages for s in specials):  # the usual case: as it always was
        return tokenizer(render_prompt(tokenizer, messages, tools), add_special_tokens=False)["input_ids"]
    marks = [f"\ue000{i}\ue001" if m["content"] else "" for i, m in enumerate(messages)]
    rendered = render_prompt(
        tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)], tools
    )
    ids: list[int] = []
    rest = rendered
    for message, mark in zip(messages, marks, strict=True):
        if not mark:  # an empty content (a turn of tool calls): nothing of the user's to keep as text
            continue
        before, found, rest = rest.partition(mark)
        if not found:
            raise ApiError(
                400,
                "a message contains a special token of this model's chat template and the template "
                "alters message text, so it cannot be kept as plain text; remove it",
                "invalid_text",
            )
        ids += tokenizer(before, add_special_tokens=False)["input_ids"]
        ids += tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + tokenizer(rest, add_special_tokens=False)["input_ids"]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StopOnStrings:
    """Stopping criterion: end a sequence once its new text contains one of the stop strings."""

    def __init__(self, tokenizer, stops: list[str], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length
        self.window = max(len(s) for s in stops) + 4  # tokens: every token is at least one character

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for row in input_ids:
            tail = row[max(self.prompt_length, len(row) - self.window) :]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, device=input_ids.device)


class StopWhenCancelled:
    """Stopping criterion: end each row whose request was cancelled (the client went away)."""

    def __init__(self, jobs):
        self.jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([job.cancelled.is_set() for job in self.jobs], device=input_ids.device)


def token_logprobs(
    logits: tuple[torch.Tensor, ...], row: int, tokens: list[int], top: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per generated token: its log-probability under the model and the `top` most likely alternatives."""
    out = []
    for step, token in enumerate(tokens):
        logp = torch.log_softmax(logits[step][row].float(), dim=-1)
        best = torch.topk(logp, top) if top else None
        alternatives = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
        out.append((float(logp[token]), alternatives))
    return out


def _safe(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def chat_logprobs(tokenizer, tokens: list[int], scored) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": _safe(logprob), "bytes": list(text.encode("utf-8", "replace"))}

    return {
        "content": [
            {**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
            for t, (lp, alts) in zip(tokens, scored, strict=True)
        ],
        "refusal": None,
    }


def completion_logprobs(tokenizer, tokens: list[int], scored) -> dict[str, Any]:
    texts = [tokenizer.decode([t]) for t in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [_safe(lp) for lp, _ in scored],
        "top_logprobs": [{tokenizer.decode([a]): _safe(alp) for a, alp in alts} for _, alts in scored],
        "text_offset": offsets,
    }


class IncrementalText:
    """Text of a growing token sequence, released in pieces that never split a character or a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.stopped = False

    def add(self, token: int) -> str:
        self.tokens.append(token)
        return self._release(final=False)

    def finish(self) -> str:
        return self._release(final=True)

    def text(self) -> str:
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return cut_at_stop(full, self.stops)[0] if self.stops else full

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stops:
            full, self.stopped = cut_at_stop(full, self.stops)
        if not final and not self.stopped:
            if full.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                return ""
            full = full[: max(self.sent, len(full) - self.hold)]  # could be the start of a stop string
        piece, self.sent = full[self.sent :], max(self.sent, len(full))
        return piece
