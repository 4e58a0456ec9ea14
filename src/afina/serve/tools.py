"""Tool calls in and out of `afina serve`: the template check, and generated text back into OpenAI's shape.

The model writes calls as its chat template does (`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`,
held to that format and to each tool's parameters by serve/grammar.py); a client gets them as OpenAI's
`tool_calls` ({id, type: function, function: {name, arguments: JSON text}}) with finish_reason "tool_calls".
Streamed, as OpenAI streams them: a first delta per call with its index, id, type and name (arguments ""), then
the arguments in pieces, each delta naming the call's index.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from afina.data.format import render_prompt
from afina.serve.grammar import CALL_CLOSE, CALL_OPEN
from afina.serve.schema import ApiError

HEADER = re.compile(r'<tool_call>\n\{"name": ("(?:[^"\\]|\\.)*"), "arguments": ')


def check_tool_template(tokenizer) -> None:
    """400 unless the chat template shows the model its tools and writes calls the way the grammar does."""
    tool: dict[str, Any] = {"type": "function", "function": {"name": "probe_tool", "description": "", "parameters": {}}}
    call = {"id": "c", "type": "function", "function": {"name": "probe_tool", "arguments": {}}}
    question: dict[str, Any] = {"role": "user", "content": "?"}
    prompt = render_prompt(tokenizer, [question], [tool])
    full = tokenizer.apply_chat_template(
        [question, {"role": "assistant", "content": "", "tool_calls": [call]}], tools=[tool], tokenize=False
    )
    written = f'{CALL_OPEN}{{"name": "probe_tool", "arguments": {{}}}}{CALL_CLOSE}'
    if "probe_tool" not in prompt or written not in full[len(prompt) :]:
        raise ApiError(
            400,
            "this model's chat template does not render tools as <tool_call> blocks, so this server cannot hold "
            "calls to their schemas; train and serve it with model.chat_template: chatml-tools (or a template that "
            "writes calls the Hermes / Qwen2.5 way)",
            "tools_unsupported",
            param="tools",
        )


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallStream:
    """Generated text in, OpenAI deltas out: content pieces, or tool calls as they are written.

    Until the text can no longer be the start of a call, nothing is released (the grammar allows text or calls,
    never both). Arguments are released as they grow, holding back the last character (it may be the `}` that
    closes the call's wrapper rather than the arguments).
    """

    expect_calls: bool
    text: str = ""
    mode: str = "undecided"  # "content" or "calls" once known
    calls: list[dict[str, Any]] = field(default_factory=list)
    sent_content: int = 0
    sent_arguments: list[int] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)  # where each call's arguments start in text

    def add(self, piece: str, final: bool = False) -> list[dict[str, Any]]:
        """The deltas (`{"content": ...}` or `{"tool_calls": [...]}`) this piece of text releases."""
        self.text += piece
        if self.mode == "undecided":
            if self.expect_calls and (CALL_OPEN.startswith(self.text) or self.text.startswith(CALL_OPEN)):
                if not self.text.startswith(CALL_OPEN) and not final:
                    return []
                self.mode = "calls" if self.text.startswith(CALL_OPEN) else "content"
            else:
                self.mode = "content"
        if self.mode == "content":
            out = self.text[self.sent_content :]
            self.sent_content = len(self.text)
            return [{"content": out}] if out else []
        return self._call_deltas(final)

    def _call_deltas(self, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:  # a new call whose header is complete
            at = self.text.find(CALL_OPEN, self._starts[-1] if self._starts else 0)
            match = HEADER.match(self.text, at) if at >= 0 else None
            if match is None:
                break
            index = len(self.calls)
            self.calls.append({"id": new_call_id(), "name": json.loads(match.group(1))})
            self._starts.append(match.end())
            self.sent_arguments.append(match.end())
            function = {"name": self.calls[-1]["name"], "arguments": ""}
            deltas.append(
                {"tool_calls": [{"index": index, "id": self.calls[-1]["id"], "type": "function", "function": function}]}
            )
        for index, start in enumerate(self._starts):
            # Compact arguments hold no raw newline: the first one after them starts the wrapper's close, whose
            # `}` comes just before it. Until then the last character may be that `}`.
            end = self.text.find("\n", start)
            stop = end - 1 if end >= 0 else (len(self.text) if final else len(self.text) - 1)
            piece = self.text[self.sent_arguments[index] : stop]
            if piece:
                self.sent_arguments[index] = stop
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        return deltas

    def finish(self) -> list[dict[str, Any]]:
        return self.add("", final=True)

    def message(self) -> dict[str, Any]:
        """The whole answer as OpenAI's assistant message (after finish())."""
        if self.mode != "calls":
            return {"role": "assistant", "content": self.text, "refusal": None}
        calls = []
        for call, start in zip(self.calls, self._starts):
            end = self.text.find(CALL_CLOSE, start)
            arguments = self.text[start : end - 1] if end >= 0 else self.text[start:]
            calls.append(
                {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": arguments}}
            )
        return {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}

    def finished_calls(self) -> bool:
        """Whether the answer is calls, each closed (a call cut off by max_tokens ends with "length")."""
        return self.mode == "calls" and all(self.text.find(CALL_CLOSE, s) >= 0 for s in self._starts)


def check_tool_results(messages: list[dict[str, Any]]) -> None:
    """400 unless every `tool` message answers a call an earlier assistant message made (once)."""
    waiting: set[str] = set()
    for i, message in enumerate(messages):
        waiting |= {call["id"] for call in message.get("tool_calls", ())}
        if message["role"] == "tool":
            if message["tool_call_id"] not in waiting:
                raise ApiError(
                    400,
                    f"messages[{i}] answers tool call '{message['tool_call_id']}', which no earlier assistant "
                    "message made (or which was answered already)",
                    "invalid_request",
                    param=f"messages[{i}].tool_call_id",
                )
            waiting.discard(message["tool_call_id"])
