"""Constrained decoding with llguidance: JSON answers (`response_format`) and tool calls (`tools`).

llguidance (a maintained grammar engine; it runs offline on CPU from a Hugging Face tokenizer) compiles a
grammar once per request and, at every decoding step, computes which tokens of the whole vocabulary keep
the answer inside the grammar; the rest get -inf before sampling. So a finished answer always parses and
validates, a cut-off one (max_tokens) is a valid prefix, and sampling draws from every allowed token, not a
shortlist. JSON Schema support is llguidance's: types, properties, required, additionalProperties, items,
enum, const, anyOf/oneOf/allOf, minimum/maximum, minLength/maxLength, pattern, format, $ref/$defs, ...; a
schema it cannot compile is refused with its message.

A tool call is written the way the chat template writes calls (Hermes / Qwen2.5, afina's `chatml-tools`):

    <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>

one block per call, parallel calls one after another on new lines, the arguments held to that tool's
parameters. `tool_choice` decides the grammar: `auto` (plain text, or calls), `required` (calls), a named
function (calls of that one), `none` (plain text that does not start a call).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

ANY_OBJECT: dict[str, Any] = {"type": "object"}
# Compact JSON as the chat templates' `tojson` writes it (and no room for a model to spin on blanks).
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
# Plain text that is not a tool call (tool_choice none, or the answer branch of auto).
TEXT_RULE = "TEXT: /(.|\\n)+/ & ~/<tool_call>(.|\\n)*/"

_TOKENIZERS: dict[int, Any] = {}
_LOCK = threading.Lock()


class GrammarError(ValueError):
    """A schema or grammar the engine cannot compile; the message says where."""


def engine_tokenizer(tokenizer):
    """llguidance's view of a Hugging Face tokenizer (built once per tokenizer: about a second)."""
    import llguidance.hf

    with _LOCK:
        key = id(tokenizer)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer))
        return _TOKENIZERS[key][1]


def _json_rule(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": {**COMPACT, **schema.get("x-guidance", {})}})


def check_grammar(grammar: str, where: str) -> str:
    """The grammar, or GrammarError with llguidance's reason (no tokenizer needed)."""
    from llguidance import LLMatcher

    if not isinstance(grammar, str):
        raise GrammarError(f"{where} must be a JSON object")
    problem = LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(grammar))
    if problem and not problem.startswith("WARNING"):
        first = problem.strip().splitlines()[0].split(": ", 1)[-1]
        raise GrammarError(f"{where}: the schema cannot be compiled: {first}")
    return grammar


def json_grammar(schema: dict[str, Any], where: str = "schema") -> str:
    """A grammar for one JSON value that follows `schema`."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{where} must be a JSON object, got {type(schema).__name__}")
    return check_grammar(f"start: {_json_rule(schema)}\n", where)


def closed_object(parameters: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters with no properties beyond the declared ones (as OpenAI's strict mode does), unless the
    schema says otherwise; a call with invented argument names would fail in the caller's code."""
    if parameters.get("properties") and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def tool_grammar(tools: list[dict[str, Any]], choice: str | None, parallel: bool = True) -> str:
    """The grammar of an answer given the request's tools and tool_choice ("auto", "required", "none" or a tool's
    name); with `parallel`, one or more calls, otherwise exactly one."""
    if choice == "none":
        return check_grammar(f"start: TEXT\n{TEXT_RULE}\n", "tools")
    offered = [t["function"] for t in tools]
    chosen = [f for f in offered if choice in (None, "auto", "required") or f["name"] == choice]
    lines = []
    for i, function in enumerate(chosen):
        head = json.dumps(f'{CALL_OPEN}{{"name": {json.dumps(function["name"])}, "arguments": ')
        tail = json.dumps(f"}}{CALL_CLOSE}")
        lines.append(f"call_{i}: {head} args_{i} {tail}")
        lines.append(f"args_{i}: {_json_rule(closed_object(function.get('parameters') or ANY_OBJECT))}")
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = f"start: TEXT | calls\n{TEXT_RULE}" if choice in (None, "auto") else "start: calls"
    body = "\n".join([start, f"calls: {calls}", "call: " + " | ".join(f"call_{i}" for i in range(len(chosen))), *lines])
    return check_grammar(body + "\n", "tools")


class GrammarLogitsProcessor:
    """A transformers logits processor for one sequence (batch of 1): tokens the grammar forbids get -inf.

    The matcher is advanced by the tokens generated since the last step (it keeps its own state, so a step
    costs one mask over the vocabulary, not a re-parse). When the grammar is complete only the end-of-sequence
    token is left; if the matcher ever fails (it cannot for a token it allowed), generation is ended there.
    """

    def __init__(self, tokenizer, grammar: str, prompt_length: int):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(engine_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.prompt_length, self.consumed = prompt_length, 0
        self.eos = tokenizer.eos_token_id

    def allowed(self, n_scores: int) -> torch.Tensor:
        """The boolean mask of allowed tokens, padded to the model's logits width."""
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        unpacked = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().bool()
        mask = torch.zeros(n_scores, dtype=torch.bool)
        width = min(n_scores, len(unpacked))
        mask[:width] = unpacked[:width]
        return mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        new = input_ids[0, self.prompt_length + self.consumed :].tolist()
        if new:
            self.matcher.consume_tokens(new)
            self.consumed += len(new)
        if self.matcher.is_error():
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool)
            mask[self.eos] = True
        else:
            mask = self.allowed(scores.shape[-1])
        return scores.masked_fill(~mask.to(scores.device)[None], float("-inf"))
