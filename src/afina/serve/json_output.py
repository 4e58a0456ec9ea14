"""JSON output constrained to a schema (`response_format` json_object / json_schema), token by token.

At each decoding step a logits processor lets through only tokens that keep the answer a prefix of
a JSON text that the schema accepts, and the end-of-sequence token only once the value is
complete; so a finished answer always parses and validates, and a cut-off one (max_tokens) is a
valid prefix. The check re-parses the answer so far plus the candidate token with a small
recursive-descent parser that knows where a JSON value may continue. The 64 most likely tokens are
tried; when none fits (an untrained model), the single-character tokens are, so a step costs at
most a few hundred short parses. Sampling therefore draws among the fitting tokens of the top 64.

The schema subset (what structured-output schemas use): `type` (object, array, string, number,
integer, boolean, null, or a list of them), `properties`, `required`, `additionalProperties: false`,
`items`, `minItems`, `maxItems`, `enum`, `const`, `anyOf`/`oneOf`, `minLength`/`maxLength`, and
annotations (title, description, default, examples, $schema). Other keywords (pattern, format,
$ref, minimum, ...) are refused with a message naming them rather than silently ignored. Objects
are generated with declared properties only, each at most once; whitespace between tokens is
limited to short runs (none before the value) so a model cannot spin on blanks.
"""

from __future__ import annotations

import json
from typing import Any

import torch

SUPPORTED = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "minLength",
    "maxLength",
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$comment",
}
TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
MAX_BLANKS = 4  # longest whitespace run allowed between tokens (a newline and a short indent)
ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}


class SchemaError(ValueError):
    """A schema outside the supported subset; the message names the place and keyword."""


def check_schema(schema: Any, where: str = "schema") -> None:
    """Refuse what the constrained decoder does not implement, naming it."""
    if not isinstance(schema, dict):
        raise SchemaError(f"{where} must be a JSON object, got {type(schema).__name__}")
    for key in schema:
        if key not in SUPPORTED:
            raise SchemaError(f"{where}: keyword '{key}' is not supported (supported: {', '.join(sorted(SUPPORTED))})")
    kinds = schema.get("type")
    for kind in kinds if isinstance(kinds, list) else [kinds] if kinds is not None else []:
        if kind not in TYPES:
            raise SchemaError(f"{where}.type: '{kind}' is not a JSON Schema type")
    extra = schema.get("additionalProperties", False)
    if extra not in (False, True) or (extra is True and schema.get("properties")):
        raise SchemaError(f"{where}.additionalProperties: only false is supported with properties")
    for name, sub in (schema.get("properties") or {}).items():
        check_schema(sub, f"{where}.properties.{name}")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items")
    for key in ("anyOf", "oneOf"):
        for i, sub in enumerate(schema.get(key) or []):
            check_schema(sub, f"{where}.{key}[{i}]")
    if "enum" in schema and not schema["enum"]:
        raise SchemaError(f"{where}.enum: needs at least one value")


class _Incomplete(Exception):
    """The text ended inside a value: it is a valid prefix so far."""


class _Invalid(Exception):
    pass


class _Parser:
    def __init__(self, text: str):
        self.text, self.i = text, 0

    def peek(self) -> str:
        if self.i >= len(self.text):
            raise _Incomplete
        return self.text[self.i]

    def blanks(self) -> None:
        start = self.i
        while self.i < len(self.text) and self.text[self.i] in " \t\n\r":
            self.i += 1
        if self.i - start > MAX_BLANKS:
            raise _Invalid

    def literal(self, word: str) -> None:
        for ch in word:
            if self.peek() != ch:
                raise _Invalid
            self.i += 1

    def value(self, schema: dict[str, Any]) -> Any:
        self.blanks()
        if "const" in schema or "enum" in schema:
            return self.choice(schema["enum"] if "enum" in schema else [schema["const"]])
        alternatives = schema.get("anyOf") or schema.get("oneOf")
        if alternatives:
            return self.alternatives(alternatives)
        kinds = schema.get("type")
        kinds = set(kinds if isinstance(kinds, list) else [kinds] if kinds else TYPES)
        ch = self.peek()
        if ch == "{" and "object" in kinds:
            return self.object(schema)
        if ch == "[" and "array" in kinds:
            return self.array(schema)
        if ch == '"' and "string" in kinds:
            return self.string(schema)
        if (ch == "-" or ch.isdigit()) and kinds & {"number", "integer"}:
            return self.number(integer="number" not in kinds)
        if ch == "t" and "boolean" in kinds:
            return self.literal("true")
        if ch == "f" and "boolean" in kinds:
            return self.literal("false")
        if ch == "n" and "null" in kinds:
            return self.literal("null")
        raise _Invalid

    def alternatives(self, options: list[dict[str, Any]]) -> None:
        start, incomplete = self.i, False
        for option in options:
            self.i = start
            try:
                self.value(option)
                return
            except _Incomplete:
                incomplete = True
            except _Invalid:
                continue
        raise _Incomplete if incomplete else _Invalid

    def choice(self, options: list[Any]) -> None:
        texts = [json.dumps(o, ensure_ascii=False) for o in options]
        start, n = self.i, 0
        while True:
            got = self.text[start : start + n + 1]
            if len(got) == n + 1 and any(t.startswith(got) for t in texts):
                n += 1
                continue
            break
        got = self.text[start : start + n]
        if start + n >= len(self.text) and any(t.startswith(got) and t != got for t in texts):
            raise _Incomplete
        if got not in texts:
            raise _Invalid
        self.i = start + n

    def string(self, schema: dict[str, Any] | None = None, keys: list[str] | None = None) -> str:
        self.literal('"')
        out = []
        while True:
            ch = self.peek()
            self.i += 1
            if ch == '"':
                break
            if ch == "\\":
                if keys is not None:  # property names are matched literally
                    raise _Invalid
                esc = self.peek()
                self.i += 1
                if esc == "u":
                    for _ in range(4):
                        if self.peek() not in "0123456789abcdefABCDEF":
                            raise _Invalid
                        self.i += 1
                    out.append("?")
                elif esc in '"\\/bfnrt':
                    out.append(json.loads(f'"\\{esc}"'))
                else:
                    raise _Invalid
            elif ord(ch) < 0x20:
                raise _Invalid
            else:
                out.append(ch)
            if keys is not None and not any(k.startswith("".join(out)) for k in keys):
                raise _Invalid
            if schema and len(out) > schema.get("maxLength", len(out)):
                raise _Invalid
        text = "".join(out)
        if keys is not None and text not in keys:
            raise _Invalid
        if schema and len(text) < schema.get("minLength", 0):
            raise _Invalid
        return text

    def number(self, integer: bool) -> None:
        start = self.i
        if self.peek() == "-":
            self.i += 1
        if self.peek() == "0":
            self.i += 1
        elif self.peek().isdigit():
            while self.i < len(self.text) and self.text[self.i].isdigit():
                self.i += 1
        else:
            raise _Invalid
        if self.i >= len(self.text):
            raise _Incomplete  # may go on with digits, a fraction or an exponent
        if self.text[self.i] == "." and not integer:
            self.i += 1
            if not self.peek().isdigit():
                raise _Invalid
            while self.i < len(self.text) and self.text[self.i].isdigit():
                self.i += 1
        if self.i < len(self.text) and self.text[self.i] in "eE" and not integer:
            self.i += 1
            if self.peek() in "+-":
                self.i += 1
            if not self.peek().isdigit():
                raise _Invalid
            while self.i < len(self.text) and self.text[self.i].isdigit():
                self.i += 1
        if self.i >= len(self.text):
            raise _Incomplete
        if self.i - start > 40:
            raise _Invalid

    def object(self, schema: dict[str, Any]) -> None:
        self.literal("{")
        free = schema.get("properties") is None
        properties: dict[str, Any] = schema.get("properties") or {}
        free = free  # json_object, or an object schema without properties: any keys
        required = set(schema.get("required") or ([] if free else []))
        seen: set[str] = set()
        self.blanks()
        if self.peek() == "}":
            if required:
                raise _Invalid
            self.i += 1
            return
        while True:
            self.blanks()
            keys = None if free else [k for k in properties if k not in seen]
            if keys == []:
                raise _Invalid
            key = self.string(keys=keys)
            seen.add(key)
            self.blanks()
            self.literal(":")
            self.value({} if free else properties[key])
            self.blanks()
            ch = self.peek()
            self.i += 1
            if ch == "}":
                if not required <= seen:
                    raise _Invalid
                return
            if ch != ",":
                raise _Invalid

    def array(self, schema: dict[str, Any]) -> None:
        self.literal("[")
        items, low, high = schema.get("items") or {}, schema.get("minItems", 0), schema.get("maxItems")
        self.blanks()
        count = 0
        if self.peek() == "]":
            if low > 0:
                raise _Invalid
            self.i += 1
            return
        while True:
            if high is not None and count >= high:
                raise _Invalid
            self.value(items)
            count += 1
            self.blanks()
            ch = self.peek()
            self.i += 1
            if ch == "]":
                if count < low:
                    raise _Invalid
                return
            if ch != ",":
                raise _Invalid


def json_prefix_state(text: str, schema: dict[str, Any]) -> str:
    """'complete' (a whole value, nothing around it), 'prefix' (may continue) or 'invalid'."""
    if text[:1] in (" ", "\t", "\n", "\r"):
        return "invalid"  # the value starts at once
    parser = _Parser(text)
    try:
        parser.value(schema)
    except _Incomplete:
        return "prefix"
    except (_Invalid, RecursionError):
        return "invalid"
    return "complete" if parser.i == len(text) else "invalid"


_SINGLE_CHARACTERS: dict[int, list[int]] = {}


class JsonLogitsProcessor:
    """A transformers logits processor for one sequence (batch of 1): only schema-keeping tokens survive."""

    def __init__(self, tokenizer, schema: dict[str, Any], prompt_length: int, eos_token_id: int):
        self.tokenizer, self.schema = tokenizer, schema
        self.prompt_length, self.eos = prompt_length, eos_token_id
        self._texts: dict[int, str | None] = {}

    def token_text(self, token: int) -> str | None:
        """The token's text, or None for a special token or a piece of a multi-byte character."""
        if token not in self._texts:
            text = self.tokenizer.decode([token], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            special = token in self.tokenizer.all_special_ids
            self._texts[token] = None if special or not text or "\ufffd" in text else text
        return self._texts[token]

    def single_characters(self) -> list[int]:
        """Tokens whose text is one character (computed once per tokenizer)."""
        key = id(self.tokenizer)
        if key not in _SINGLE_CHARACTERS:
            vocab = self.tokenizer.get_vocab()
            short = [i for piece, i in vocab.items() if len(piece) <= 2]
            _SINGLE_CHARACTERS[key] = sorted(i for i in short if len(self.token_text(i) or "") == 1)
        return _SINGLE_CHARACTERS[key]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        done = [self.token_text(int(t)) or "" for t in input_ids[0, self.prompt_length :]]
        so_far = "".join(done)
        state = json_prefix_state(so_far, self.schema)
        allowed: list[int] = []
        if state == "complete":
            allowed.append(self.eos)
        # The most likely tokens first; if none of them fits, every single-character token: any valid
        # continuation starts with some character, so this always finds one, at a bounded cost.
        top = torch.topk(scores[0], min(64, scores.shape[-1])).indices.tolist()
        for candidates in (top, self.single_characters()):
            for token in candidates:
                if token == self.eos:
                    continue
                text = self.token_text(token)
                if text is not None and json_prefix_state(so_far + text, self.schema) != "invalid":
                    allowed.append(token)
            if allowed:
                break
        if not allowed:  # nothing can continue (cannot happen for a satisfiable schema): end here
            allowed = [self.eos]
        keep = torch.full_like(scores, float("-inf"))
        index = torch.tensor(allowed, device=scores.device)
        keep[0, index] = scores[0, index]
        return keep
