"""Map a user's row onto one of the canonical row shapes.

Canonical rows (written to data/{train,validation,test}.jsonl, each with "id" and "source"):

    chat, prompt_completion, instruction, qa -> {"messages": [{"role", "content"}, ...]}
    chat with tools, glaive                  -> {"messages": [... tool_calls, tool turns], "tools": [...]}
                                                (OpenAI's format; see afina.data.tools for the shapes mapped)
    text                                     -> {"text": str}                       (domain adaptation)
    classification                           -> {"text": str, "label": str}
    tagging                                  -> {"tokens": [str], "tags": [str]}    (BIO/IOBES tags)
    preference (task: preference)            -> {"prompt": [messages], "chosen": str, "rejected": str}
    kto (task: preference, unpaired)         -> {"prompt": [messages], "completion": str, "desirable": bool}

A preference pair comes as two chats (`chosen`, `rejected`: message lists that share everything but
the last answer), as `prompt` + two completions, or as two HH-RLHF transcripts
("\n\nHuman: ... \n\nAssistant: ..."); KTO rows are `prompt`, `completion` and a good/bad `label`.

Extras afina understands are kept: `must_include` (key strings a correct answer contains, used by
evaluation), `question` (qa with a context: the question alone), `group` (the data.group_by value: rows
sharing it never straddle splits; without data.group_by a `group` field is kept as it is), `references`
(all reference answers; for qa, all answers), `tests` (Python assert lines a generated program must pass,
for pass@1) and `test_setup` (code run before them).
"""

from __future__ import annotations

import json
import re
from typing import Any

from afina.data.errors import RowError
from afina.data.tools import glaive_chat, is_tool_row, tool_chat

ROLES = ("system", "user", "assistant")
CHAT_SCHEMAS = ("chat", "glaive", "prompt_completion", "instruction", "qa")
EVAL_EXTRAS = ("tests", "test_setup", "references")  # kept for evaluation when a row has them

# Each schema: the canonical fields it needs, and the user-side names guessed for them, in the order
# they are tried. A row's schema is the first whose needed fields are all present.
SCHEMAS: dict[str, dict[str, tuple[str, ...]]] = {
    "chat": {"messages": ("messages", "conversations")},
    "glaive": {"chat": ("chat",), "system": ("system",)},
    "prompt_completion": {"prompt": ("prompt",), "completion": ("completion",)},
    "instruction": {"instruction": ("instruction",), "output": ("output", "response")},
    "qa": {"question": ("question",), "answer": ("answers", "answer")},
    "tagging": {"tokens": ("tokens", "words"), "tags": ("tags", "ner_tags", "bio_tags")},
    "classification": {"text": ("text", "sentence"), "label": ("label", "intent", "category", "class", "sentiment")},
    "text": {"text": ("text", "content", "document")},
    "preference": {"chosen": ("chosen",), "rejected": ("rejected",)},
    "kto": {"prompt": ("prompt",), "completion": ("completion",), "label": ("label", "desirable")},
}
# Guessed only for the task types that ask for them (a prompt/completion row with a label is not KTO data
# for a chat run).
PREFERENCE_SCHEMAS = ("preference", "kto")
DEFAULT_SCHEMAS = tuple(name for name in SCHEMAS if name not in PREFERENCE_SCHEMAS)
OPTIONAL_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "instruction": {"input": ("input", "context")},
    "qa": {"context": ("context", "passage")},
    "preference": {"prompt": ("prompt",)},
}
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
TAG_PATTERN = re.compile(r"^(O|[BIES]-\S+)$")


def field_present(row: dict[str, Any], canon: str, names: tuple[str, ...], fields: dict[str, str]) -> str | None:
    """The row's name for a canonical field, or None."""
    candidates = (fields[canon],) if canon in fields else names
    return next((name for name in candidates if name in row), None)


def guess_schema(
    row: dict[str, Any], fields: dict[str, str], schema: str = "auto", among: tuple[str, ...] | None = None
) -> tuple[str, str]:
    """(schema, how each canonical field maps) for a row; the recipe's mapping and schema win over guesses.
    `among`: the schemas the task type trains on (default: all but the preference ones).

    >>> guess_schema({"text": "hi", "intent": "greet"}, {})
    ('classification', 'text=text, label=intent')
    """
    candidates = (
        {name: SCHEMAS[name] for name in among or DEFAULT_SCHEMAS} if schema == "auto" else {schema: SCHEMAS[schema]}
    )
    for name, needed in candidates.items():
        found = {canon: field_present(row, canon, names, fields) for canon, names in needed.items()}
        if all(found.values()):
            optional = {
                canon: field_present(row, canon, names, fields)
                for canon, names in OPTIONAL_FIELDS.get(name, {}).items()
            }
            mapping = ", ".join(f"{canon}={user}" for canon, user in {**found, **optional}.items() if user)
            return name, mapping
    if schema != "auto":
        needed = SCHEMAS[schema]
        missing = [fields.get(c, " or ".join(n)) for c, n in needed.items() if not field_present(row, c, n, fields)]
        raise RowError(
            f"schema '{schema}' needs field(s) {', '.join(missing)}; the row has {sorted(row)}; "
            f"map your names with data.fields (e.g. data.fields.{next(iter(needed))}=your_name)"
        )
    wanted = "; ".join(f"{s}: {' + '.join('|'.join(n) for n in f.values())}" for s, f in candidates.items())
    raise RowError(
        f"cannot tell the schema from fields {sorted(row)}; expected one of ({wanted}), "
        "or set data.schema and map your field names with data.fields (e.g. data.fields.prompt=question)"
    )


def _field(
    row: dict[str, Any], schema: str, canon: str, fields: dict[str, str], required: bool = True
) -> tuple[Any, str]:
    names = SCHEMAS[schema].get(canon) or OPTIONAL_FIELDS.get(schema, {}).get(canon, ())
    name = field_present(row, canon, names, fields)
    if name is None:
        if required:
            raise RowError(f"missing field '{fields.get(canon, names[0])}'")
        return None, canon
    return row[name], name


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string, got {_type_name(value)}")
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _string_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str) and value.lstrip().startswith("["):  # a list stored as JSON text (CSV, TSV)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"field '{name}' holds text that is not a JSON list") from None
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{name}' must be a non-empty list of strings, got {_type_name(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            hint = " (integer tag ids: map them to names such as B-PER first)" if isinstance(item, int) else ""
            raise RowError(f"{name}[{i}] must be a string, got {_type_name(item)}{hint}")
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
        role = {"human": "user", "gpt": "assistant"}.get(str(role), role)
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


def _label(value: Any, name: str) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string or an integer label, got {_type_name(value)}")
    if not value.strip():
        raise RowError(f"field '{name}' is empty")
    return value.strip()


def _messages_for(
    row: dict[str, Any], schema: str, fields: dict[str, str]
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    extras: dict[str, Any] = {}
    if schema in ("chat", "glaive"):
        tools_value: Any
        if schema == "glaive":
            system = _field(row, schema, "system", fields)[0]
            messages, tools_value = glaive_chat(system, _field(row, schema, "chat", fields)[0])
        else:
            messages = _field(row, schema, "messages", fields)[0]
            tools_value = row.get(fields.get("tools", "tools"), row.get("functions"))
        if schema == "glaive" or is_tool_row(row, messages):
            messages, tools = tool_chat(messages, tools_value)
            return messages, {"tools": tools}
        return _check_messages(messages), extras
    if schema == "prompt_completion":
        prompt = _text(*_field(row, schema, "prompt", fields))
        completion = _text(*_field(row, schema, "completion", fields))
    elif schema == "instruction":
        instruction = _text(*_field(row, schema, "instruction", fields))
        extra, extra_name = _field(row, schema, "input", fields, required=False)
        completion = _text(*_field(row, schema, "output", fields))
        prompt = (
            instruction if extra is None or not str(extra).strip() else f"{instruction}\n\n{_text(extra, extra_name)}"
        )
    else:  # qa: the answer is the first of a list of references, or a single string
        question = _text(*_field(row, schema, "question", fields))
        context, context_name = _field(row, schema, "context", fields, required=False)
        answers, answer_name = _field(row, schema, "answer", fields)
        answers = [answers] if isinstance(answers, str) else _string_list(answers, answer_name)
        completion = answers[0]
        prompt = (
            question
            if context is None or not str(context).strip()
            else f"{_text(context, context_name)}\n\nQuestion: {question}"
        )
        extras["references"] = answers
        if context is not None and str(context).strip():  # kept apart: dedup compares the question, not the passage
            extras["question"] = question
    messages = _check_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    return messages, extras


def to_canonical(
    row: dict[str, Any], schema: str, fields: dict[str, str], system_prompt: str | None, group_by: str | None = None
) -> dict[str, Any]:
    """Map one row of a known schema onto its canonical row, or raise RowError."""
    canonical: dict[str, Any]
    if schema in CHAT_SCHEMAS:
        messages, canonical = _messages_for(row, schema, fields)
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        canonical = {"messages": messages, **canonical}
    elif schema == "text":
        canonical = {"text": _text(*_field(row, schema, "text", fields))}
    elif schema == "classification":
        canonical = {
            "text": _text(*_field(row, schema, "text", fields)),
            "label": _label(*_field(row, schema, "label", fields)),
        }
    elif schema == "preference":
        canonical = preference_pair(row, fields, system_prompt)
    elif schema == "kto":
        canonical = kto_example(row, fields, system_prompt)
    elif schema == "tagging":
        tokens = _string_list(*_field(row, schema, "tokens", fields))
        tags = _string_list(*_field(row, schema, "tags", fields))
        if len(tokens) != len(tags):
            raise RowError(f"{len(tokens)} tokens but {len(tags)} tags; each token needs one tag")
        bad = next((i for i, tag in enumerate(tags) if not TAG_PATTERN.match(tag)), None)
        if bad is not None:
            raise RowError(f"tags[{bad}] = {tags[bad]!r} is not a BIO tag (O, B-TYPE, I-TYPE)")
        canonical = {"tokens": tokens, "tags": tags}
    else:
        raise RowError(f"unknown schema {schema!r}; known: {', '.join(SCHEMAS)}")
    if "must_include" in row:
        canonical["must_include"] = row["must_include"]
    for key in EVAL_EXTRAS:  # under their own names, or the names data.fields maps them from
        name = fields.get(key, key)
        if name in row and key not in canonical:
            canonical[key] = row[name]
    if group_by is not None:
        group = row.get(group_by)
        if group is None:
            raise RowError(f"missing field '{group_by}' (data.group_by: the key that keeps related rows in one split)")
        if isinstance(group, (dict, list)):
            raise RowError(f"field '{group_by}' (data.group_by) must be a string or number, got {_type_name(group)}")
        canonical["group"] = str(group)
    elif "group" in row:
        canonical["group"] = row["group"]
    if "must_include" in canonical:
        keys = canonical["must_include"]
        if not isinstance(keys, list) or not all(isinstance(k, str) and k.strip() for k in keys):
            raise RowError("field 'must_include' must be a list of non-empty strings")
    for key in ("tests", "references"):
        if key in canonical and not (
            isinstance(canonical[key], list) and all(isinstance(t, str) for t in canonical[key])
        ):
            raise RowError(f"field '{key}' must be a list of strings")
    if "test_setup" in canonical and not isinstance(canonical["test_setup"], str):
        raise RowError("field 'test_setup' must be a string")
    return canonical


def content_text(row: dict[str, Any]) -> str:
    """The text of a canonical row that deduplication and leak checks compare."""
    if "chosen" in row or "completion" in row:  # preference pairs and KTO examples: the prompt and the answers
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in row["prompt"] if m["role"] != "system")
        if "chosen" in row:
            return f"{prompt}\nchosen: {row['chosen']}\nrejected: {row['rejected']}"
        return f"{prompt}\n{'good' if row['desirable'] else 'bad'}: {row['completion']}"
    if "question" in row:  # qa over a passage: many questions share a passage, the question tells them apart
        return f"{row['question']}\n{row['messages'][-1]['content']}"
    if "messages" in row:  # system prompts are shared by design; they would make every row look alike
        return "\n".join(
            f"{m['role']}: {m['content']}"
            + "".join(f" call {c['function']['name']}{c['function']['arguments']}" for c in m.get("tool_calls", ()))
            for m in row["messages"]
            if m["role"] != "system"
        )
    if "tokens" in row:
        return " ".join(row["tokens"])
    return row["text"]


# ---- preference data (task: preference) -------------------------------------------------------------


def hh_transcript(text: str, name: str) -> list[dict[str, str]]:
    """An HH-RLHF transcript ("\\n\\nHuman: ... \\n\\nAssistant: ...") as chat messages.

    >>> hh_transcript("\\n\\nHuman: hi\\n\\nAssistant: hello", "chosen")
    [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
    """
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(
            f"field '{name}' is neither a message list nor an HH-RLHF transcript "
            "('\\n\\nHuman: ...\\n\\nAssistant: ...'); give a prompt field with two plain completions"
        )
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


def _prompt_messages(value: Any, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, name)}]
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{name}' must be a string or a non-empty list of messages, got {_type_name(value)}")
    messages = _check_messages([*value, {"role": "assistant", "content": "-"}])[:-1]
    if messages[-1]["role"] == "assistant":
        raise RowError(f"field '{name}' must end with a user turn (the answers follow it)")
    return messages


def _answer_chat(value: Any, name: str, prompt: list[dict[str, str]] | None) -> list[dict[str, str]]:
    """The whole conversation an answer field stands for: a message list, plain text after `prompt`, or a transcript."""
    if isinstance(value, list):
        messages = _check_messages(value)
        return messages if prompt is None or messages[: len(prompt)] == prompt else _check_messages([*prompt, *value])
    if not isinstance(value, str):
        raise RowError(f"field '{name}' must be a string or a list of messages, got {_type_name(value)}")
    if prompt is not None:
        return _check_messages([*prompt, {"role": "assistant", "content": value}])
    return _check_messages(hh_transcript(value, name))


def _with_system(prompt: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def preference_pair(row: dict[str, Any], fields: dict[str, str], system_prompt: str | None) -> dict[str, Any]:
    """A chosen/rejected pair as {prompt: messages, chosen: answer, rejected: answer}, or RowError."""
    prompt_value, prompt_name = _field(row, "preference", "prompt", fields, required=False)
    prompt = _prompt_messages(prompt_value, prompt_name) if prompt_value is not None else None
    chosen = _answer_chat(*_field(row, "preference", "chosen", fields), prompt)
    rejected = _answer_chat(*_field(row, "preference", "rejected", fields), prompt)
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)) - 1)
        raise RowError(
            f"chosen and rejected must share the conversation before their last answer; they differ at message {at}"
        )
    if not any(m["role"] == "user" for m in chosen[:-1]):
        raise RowError("the pair has no prompt: chosen and rejected need a user turn before the answers")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise RowError("chosen and rejected are the same answer; a pair needs two different answers to learn from")
    return {
        "prompt": _with_system(chosen[:-1], system_prompt),
        "chosen": chosen[-1]["content"],
        "rejected": rejected[-1]["content"],
    }


DESIRABLE = {
    "true": True,
    "1": True,
    "good": True,
    "desirable": True,
    "yes": True,
    "false": False,
    "0": False,
    "bad": False,
    "undesirable": False,
    "no": False,
    "-1": False,
}


def kto_example(row: dict[str, Any], fields: dict[str, str], system_prompt: str | None) -> dict[str, Any]:
    """An unpaired KTO example as {prompt: messages, completion: answer, desirable: bool}, or RowError."""
    prompt = _prompt_messages(*_field(row, "kto", "prompt", fields))
    completion = _answer_chat(*_field(row, "kto", "completion", fields), prompt)[-1]["content"]
    label, label_name = _field(row, "kto", "label", fields)
    desirable = DESIRABLE.get(str(label).strip().lower()) if isinstance(label, (bool, int, str)) else None
    if desirable is None:
        raise RowError(
            f"field '{label_name}' must say whether the completion is desirable: true/false, 1/0 or "
            f"good/bad; got {label!r}"
        )
    return {"prompt": _with_system(prompt, system_prompt), "completion": completion, "desirable": desirable}
