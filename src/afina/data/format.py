"""Render chats with the model's template and build loss masks.

The training text is the template's own rendering of the whole conversation, tokenized once;
a token carries loss when it starts inside an assistant turn (its content and the end-of-turn
marker). The prompt used at inference (`render_prompt`) is checked to be an exact prefix of
that training text, so the model is trained on what it will see when served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The tokenizer's chat template cannot render training text consistent with inference."""


def chat_template_hash(tokenizer) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode("utf-8")).hexdigest()


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: a call's arguments as an object (Qwen, Llama and Hermes templates
    write them with `tojson`), where OpenAI's format and afina's rows keep them as JSON text."""
    if not any("tool_calls" in m for m in messages):
        return messages
    out = []
    for message in messages:
        if "tool_calls" in message:
            calls = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"] or "{}")}}
                for c in message["tool_calls"]
            ]
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


def _render(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        template_messages(messages), tools=tools or None, tokenize=False, add_generation_prompt=prompt
    )


def render_prompt(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The text the model sees at inference, ending where the assistant starts to answer (the tools, when
    given, rendered by the template as it declares them)."""
    return _render(tokenizer, messages, tools, True)


def check_tool_template(tokenizer, tools: list[dict[str, Any]]) -> None:
    """The chat template must show the model its tools and its calls, or training would teach calls to tools
    it never sees. TemplateError with the fix otherwise."""
    name = tools[0]["function"]["name"]
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": "{}"}}
    probe: list[dict[str, Any]] = [
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    prompt = render_prompt(tokenizer, probe[:1], tools)
    full = _render(tokenizer, probe, tools, False)
    if name not in prompt or name not in full[len(prompt) :]:
        raise TemplateError(
            "the model's chat template does not render tools or tool calls (it has no `tools` support); set "
            "model.chat_template: chatml-tools (Hermes-style <tool_call> blocks in ChatML) or a Jinja file that does"
        )


def assistant_spans(
    tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of each assistant turn in it (tool results and the
    tool list are context, never inside a span)."""
    if not tokenizer.chat_template:
        raise TemplateError("the tokenizer has no chat template; use a chat model or set one on the tokenizer")
    if tools:
        check_tool_template(tokenizer, tools)
    full = _render(tokenizer, messages, tools, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_prompt(tokenizer, messages[:i], tools)
        upto = _render(tokenizer, messages[: i + 1], tools, False)
        if not full.startswith(prefix) or not full.startswith(upto) or not upto.startswith(prefix):
            raise TemplateError(
                "the chat template renders a conversation differently from its prefix with add_generation_prompt; "
                "training text would not match inference. Use a template that renders turns independently."
            )
        end = len(upto.rstrip())  # the end-of-turn marker is learned, the trailing newline is not
        spans.append((len(prefix), end))
    return full, spans


def encode_chat(
    tokenizer, messages: list[dict[str, Any]], train_on: str = "assistant", tools: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Token ids and labels (IGNORE_INDEX where no loss) for one conversation (with `tools`: the tools it
    may call, as the template renders them)."""
    text, spans = assistant_spans(tokenizer, messages, tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    if train_on == "all":
        labels = list(input_ids)
    else:
        labels = [IGNORE_INDEX] * len(input_ids)
        for index, (start, _end) in enumerate(encoded["offset_mapping"]):
            if any(s <= start < e for s, e in spans):
                labels[index] = input_ids[index]
    return {"input_ids": input_ids, "labels": labels}


def encode_answer(tokenizer, prompt: list[dict[str, str]], answer: str) -> dict[str, Any]:
    """A prompt and one answer to it (a preference pair's side, a KTO example): token ids, labels on the
    answer alone (its content and end-of-turn marker, not earlier assistant turns), and `prompt_tokens`,
    how many tokens come before the answer."""
    text, spans = assistant_spans(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
    start, end = spans[-1]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    offsets = [s for s, _ in encoded["offset_mapping"]]
    labels = [token if start <= s < end else IGNORE_INDEX for token, s in zip(input_ids, offsets)]
    prompt_tokens = next((i for i, s in enumerate(offsets) if s >= start), len(input_ids))
    return {"input_ids": input_ids, "labels": labels, "prompt_tokens": prompt_tokens}


def count_tokens(tokenizer, row: dict[str, Any], train_on: str = "assistant") -> int:
    """Tokens a canonical row takes when trained on: the rendered chat, or the text (tags: the words);
    a preference pair: its longer side."""
    if "chosen" in row:
        return max(
            len(encode_answer(tokenizer, row["prompt"], row[side])["input_ids"]) for side in ("chosen", "rejected")
        )
    if "completion" in row:
        return len(encode_answer(tokenizer, row["prompt"], row["completion"])["input_ids"])
    if "messages" in row:
        return len(encode_chat(tokenizer, row["messages"], train_on, row.get("tools"))["input_ids"])
    text = " ".join(row["tokens"]) if "tokens" in row else row["text"]
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_token_ids(tokenizer, text: str, add_eos: bool = True) -> list[int]:
    """A document's tokens, ended by the end-of-text token (domain adaptation: documents are learned whole)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def chunk_starts(n_tokens: int, length: int, overlap: int = 0) -> list[tuple[int, int]]:
    """(start, first new token) of each chunk of a document of n_tokens, `length` tokens at most per chunk.

    A chunk after the first begins `overlap` tokens before its new tokens: they are context only.

    >>> chunk_starts(10, 4, 1)
    [(0, 0), (3, 4), (6, 7)]
    """
    if length <= overlap:
        raise ValueError(f"the chunk length ({length}) must be larger than the overlap ({overlap})")
    chunks, new = [], 0
    while new < n_tokens:
        start = max(0, new - overlap)
        chunks.append((start, new))
        new = start + length
    return chunks


def count_chunks(n_tokens: int, length: int, overlap: int = 0) -> int:
    """How many chunks encode_text_chunks makes of a document of n_tokens (eos included)."""
    return sum(1 for start, _ in chunk_starts(n_tokens, length, overlap) if min(n_tokens - start, length) >= 2)


def encode_text_chunks(
    tokenizer, text: str, length: int, overlap: int = 0, add_eos: bool = True
) -> list[dict[str, Any]]:
    """A document as chunks of at most `length` tokens, each token labelled once (overlap tokens are context).

    Every token is a label (continued pre-training); the first token of a document has nothing before
    it, so it is never predicted, as in any causal LM loss.
    """
    ids = text_token_ids(tokenizer, text, add_eos)
    chunks = []
    for start, new in chunk_starts(len(ids), length, overlap):
        piece = ids[start : start + length]
        if len(piece) < 2:  # a lone token predicts nothing
            continue
        labels = [IGNORE_INDEX] * (new - start) + piece[new - start :]
        chunks.append({"input_ids": piece, "labels": labels})
    return chunks


@dataclass(frozen=True)
class Chunking:
    """Documents cut into chunks of `length` tokens (domain adaptation); `overlap` tokens of context each."""

    length: int
    overlap: int = 0
    add_eos: bool = True


def encode_text(tokenizer, text: str) -> dict[str, list[int]]:
    """A plain text row: every token is a label, ended by the end-of-text token."""
    ids = text_token_ids(tokenizer, text)
    return {"input_ids": ids, "labels": list(ids)}


def encode_split(
    tokenizer, rows: list[dict[str, Any]], train_on: str, chunking: Chunking | None = None
) -> list[dict[str, list[int]]]:
    """Canonical rows -> examples (`input_ids`, `labels`): chats with loss where `train_on` says, or text
    rows with loss on every token; with `chunking`, each text row is cut into chunks of tokens."""
    if chunking is not None:
        return [
            chunk
            for row in rows
            for chunk in encode_text_chunks(tokenizer, row["text"], chunking.length, chunking.overlap, chunking.add_eos)
        ]
    return [
        encode_chat(tokenizer, row["messages"], train_on, row.get("tools"))
        if "messages" in row
        else encode_text(tokenizer, row["text"])
        for row in rows
    ]
