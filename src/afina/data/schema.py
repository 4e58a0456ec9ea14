"""Map a user's row onto the canonical chat row.

Canonical row: {"id": str, "messages": [{"role", "content"}, ...], ...extras}
where extras that afina understands are kept: `must_include` (key strings a correct answer
contains, used by evaluation), `group`, `tests` (Python assert lines a generated program must
pass, for pass@1), `test_setup` (code run before them) and `references` (more reference answers).
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant")
KEPT_EXTRAS = ("must_include", "group", "tests", "test_setup", "references")

# Each schema: the canonical fields it needs, and the user-side names guessed for them.
SCHEMAS: dict[str, dict[str, tuple[str, ...]]] = {
    "chat": {"messages": ("messages", "conversations")},
    "prompt_completion": {"prompt": ("prompt",), "completion": ("completion",)},
    "instruction": {"instruction": ("instruction",), "output": ("output", "response")},
}
OPTIONAL_FIELDS = {"instruction": {"input": ("input", "context")}}


class RowError(ValueError):
    """Why one row cannot be used (it goes to the rejects file)."""


def guess_schema(row: dict[str, Any], fields: dict[str, str]) -> str:
    """Pick the schema whose fields the row has, counting the recipe's field mapping."""
    for schema, needed in SCHEMAS.items():
        if all(fields.get(canon) in row or any(n in row for n in names) for canon, names in needed.items()):
            return schema
    wanted = "; ".join(f"{s}: {' + '.join(n)}" for s, n in SCHEMAS.items())
    raise RowError(
        f"cannot tell the schema from fields {sorted(row)}; expected one of ({wanted}), "
        "or map your field names with data.fields (e.g. data.fields.prompt=question)"
    )


def _field(row: dict[str, Any], canon: str, names: tuple[str, ...], fields: dict[str, str], required: bool = True) -> Any:
    candidates = (fields[canon],) if canon in fields else names
    for name in candidates:
        if name in row:
            return row[name]
    if required:
        raise RowError(f"missing field '{candidates[0]}'")
    return None


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"messages[{i}] must be an object, got {type(message).__name__}")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role not in ROLES:
            raise RowError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RowError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise RowError(f"messages[{i}].content is empty")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise RowError("the last message must be the assistant's answer")
    if sum(m["role"] == "system" for m in out) > 1 or any(m["role"] == "system" for m in out[1:]):
        raise RowError("a system message may only come first")
    return out


def to_canonical(row: dict[str, Any], schema: str, fields: dict[str, str], system_prompt: str | None) -> dict[str, Any]:
    """Map one row of a known schema onto the canonical chat row, or raise RowError."""
    if schema == "chat":
        messages = _check_messages(_field(row, "messages", SCHEMAS["chat"]["messages"], fields))
    elif schema == "prompt_completion":
        prompt = _text(_field(row, "prompt", ("prompt",), fields), fields.get("prompt", "prompt"))
        completion = _text(_field(row, "completion", ("completion",), fields), fields.get("completion", "completion"))
        messages = _check_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    elif schema == "instruction":
        names = SCHEMAS["instruction"]
        instruction = _text(_field(row, "instruction", names["instruction"], fields), "instruction")
        extra = _field(row, "input", OPTIONAL_FIELDS["instruction"]["input"], fields, required=False) or ""
        output = _text(_field(row, "output", names["output"], fields), "output")
        prompt = instruction if not str(extra).strip() else f"{instruction}\n\n{_text(extra, 'input')}"
        messages = _check_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": output}])
    else:  # pragma: no cover - schema names come from SCHEMAS
        raise RowError(f"unknown schema {schema!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    canonical: dict[str, Any] = {"messages": messages}
    for key in KEPT_EXTRAS:
        if key in row:
            canonical[key] = row[key]
    if "must_include" in canonical:
        keys = canonical["must_include"]
        if not isinstance(keys, list) or not all(isinstance(k, str) and k.strip() for k in keys):
            raise RowError("field 'must_include' must be a list of non-empty strings")
    for key in ("tests", "references"):
        if key in canonical and not (isinstance(canonical[key], list) and all(isinstance(t, str) for t in canonical[key])):
            raise RowError(f"field '{key}' must be a list of strings")
    if "test_setup" in canonical and not isinstance(canonical["test_setup"], str):
        raise RowError("field 'test_setup' must be a string")
    return canonical
