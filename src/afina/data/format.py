"""Render chats with the model's template and build loss masks.

The training text is the template's own rendering of the whole conversation, tokenized once;
a token carries loss when it starts inside an assistant turn (its content and the end-of-turn
marker). The prompt used at inference (`render_prompt`) is checked to be an exact prefix of
that training text, so the model is trained on what it will see when served.
"""

from __future__ import annotations

import hashlib
from typing import Any

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The tokenizer's chat template cannot render training text consistent with inference."""


def chat_template_hash(tokenizer) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode("utf-8")).hexdigest()


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text the model sees at inference, ending where the assistant starts to answer."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of each assistant turn in it."""
    if not tokenizer.chat_template:
        raise TemplateError("the tokenizer has no chat template; use a chat model or set one on the tokenizer")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_prompt(tokenizer, messages[:i])
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(prefix) or not full.startswith(upto) or not upto.startswith(prefix):
            raise TemplateError(
                "the chat template renders a conversation differently from its prefix with add_generation_prompt; "
                "training text would not match inference. Use a template that renders turns independently."
            )
        end = len(upto.rstrip())  # the end-of-turn marker is learned, the trailing newline is not
        spans.append((len(prefix), end))
    return full, spans


def encode_chat(tokenizer, messages: list[dict[str, str]], train_on: str = "assistant") -> dict[str, Any]:
    """Token ids and labels (IGNORE_INDEX where no loss) for one conversation."""
    text, spans = assistant_spans(tokenizer, messages)
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


def count_tokens(tokenizer, row: dict[str, Any], train_on: str = "assistant") -> int:
    """Tokens a canonical row takes when trained on: the rendered chat, or the text (tags: the words)."""
    if "messages" in row:
        return len(encode_chat(tokenizer, row["messages"], train_on)["input_ids"])
    text = " ".join(row["tokens"]) if "tokens" in row else row["text"]
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
