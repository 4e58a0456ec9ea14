"""Tool-calling chats: the shapes they come in, mapped onto one canonical row, checked call by call.

The canonical row is OpenAI's chat format:

    {"tools": [{"type": "function", "function": {"name", "description", "parameters" (JSON Schema)}}],
     "messages": [{"role": "system" | "user", "content": str},
                  {"role": "assistant", "content": str, "tool_calls": [{"id", "type": "function",
                                                     "function": {"name", "arguments": JSON text}}]},
                  {"role": "tool", "tool_call_id": str, "content": str}, ...]}

An assistant turn that only calls tools has content "" (OpenAI writes null; an empty string keeps every
message's content a string for the rest of afina). Shapes mapped onto it:

    OpenAI       messages with tool_calls and tool turns, `tools` beside them (also the legacy `function_call`)
    ShareGPT     conversations with from: human / gpt / function_call / observation, `tools` as a list or JSON
                 text (LLaMA-Factory's glaive and xLAM files)
    Hermes       assistant text with <tool_call>{"name", "arguments"}</tool_call> blocks, tool turns wrapped in
                 <tool_response>, tools in `tools` or in the system prompt between <tools></tools>
    glaive       glaive-function-calling-v2's own `system` + `chat` strings (USER: / ASSISTANT: <functioncall> /
                 FUNCTION RESPONSE:)

Each call is checked: its arguments are a JSON object that validates against the named tool's parameters,
the tool is among the row's tools, and every tool result answers a call made before it; a row that fails is
a reject with the reason.
"""

from __future__ import annotations

import json
import re
from typing import Any

from afina.data.errors import RowError

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
TOOL_RESPONSE = re.compile(r"^\s*<tool_response>\s*(.*?)\s*</tool_response>\s*$", re.S)
TOOLS_BLOCK = re.compile(r"<tools>\s*(.*?)\s*</tools>", re.S)
ROLE_NAMES = {
    "human": "user",
    "gpt": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}
GLAIVE_TURN = re.compile(r"(?:^|\n)\s*(USER|ASSISTANT|FUNCTION RESPONSE):\s?")


def is_tool_row(row: dict[str, Any], messages: Any) -> bool:
    """Whether a chat row is about tools: it offers tools, or one of its turns calls or answers one."""
    if row.get("tools") or row.get("functions"):
        return True
    if not isinstance(messages, list):
        return False
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = str(message.get("role", message.get("from")))
        text = message.get("content", message.get("value"))
        if message.get("tool_calls") or message.get("function_call") or ROLE_NAMES.get(role, role) == "tool":
            return True
        if isinstance(text, str) and "<tool_call>" in text:
            return True
    return False


# ---- tools ---------------------------------------------------------------------------------------


def canonical_tools(value: Any, where: str = "tools") -> list[dict[str, Any]]:
    """A row's tools in OpenAI's shape; accepts OpenAI tools, bare function objects, or either as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise RowError(f"field '{where}' holds text that is not JSON ({exc.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(f"field '{where}' must be a list of tools, got {type(value).__name__}")
    tools, names = [], set()
    for i, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowError(f"{where}[{i}] must be a function with a 'name' (OpenAI: {{type: function, function}})")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise RowError(f"{where}[{i}] ({function['name']}): 'parameters' must be a JSON Schema object")
        _check_schema(parameters, f"{where}[{i}] ({function['name']}).parameters")
        if function["name"] in names:
            raise RowError(f"{where}[{i}]: two tools are named '{function['name']}'; a call could not tell them apart")
        names.add(function["name"])
        spec = {"name": function["name"], "description": str(function.get("description") or "")}
        tools.append({"type": "function", "function": {**spec, "parameters": parameters}})
    return tools


def _check_schema(schema: dict[str, Any], where: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise RowError(f"{where} is not a valid JSON Schema: {exc.message}") from None


def tools_in_system(text: str) -> tuple[str, list[Any]]:
    """Hermes: the tools listed between <tools></tools> in a system prompt, and the prompt without them."""
    match = TOOLS_BLOCK.search(text)
    if match is None:
        return text, []
    listed = _json_objects(match.group(1), "the system prompt's <tools> block")
    return (text[: match.start()] + text[match.end() :]).strip(), listed


def _json_objects(text: str, where: str) -> list[Any]:
    """Every JSON value in `text`, one after another (a list, or objects one per line)."""
    decoder, at = json.JSONDecoder(), 0
    values: list[Any] = []
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text):
            return [v for value in values for v in (value if isinstance(value, list) else [value])]
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise RowError(f"{where} is not JSON at character {exc.pos}: {exc.msg}") from None
        values.append(value)


# ---- calls ---------------------------------------------------------------------------------------


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"{where}.arguments is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RowError(f"{where}.arguments must be a JSON object, got {type(value).__name__}")
    return value


def parse_call_text(text: str, where: str) -> dict[str, Any]:
    """A call written as JSON text ({"name", "arguments"}; glaive's arguments in single quotes too)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        quoted = re.fullmatch(r"\s*(\{.*\"arguments\"\s*:\s*)'(.*)'(\s*\}\s*)", text, re.S)  # glaive: '{...}'
        if quoted is None:
            raise RowError(f'{where} is not a JSON call {{"name", "arguments"}}: {text[:80]!r}') from None
        try:
            call = json.loads(quoted.group(1) + json.dumps(quoted.group(2)) + quoted.group(3))
        except json.JSONDecodeError as exc:
            raise RowError(f"{where} is not a JSON call ({exc.msg})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise RowError(f"{where} must be a JSON object with a 'name' and 'arguments'")
    return {"name": call["name"], "arguments": call.get("arguments", call.get("parameters", {}))}


def effective_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters a call is checked against: a required parameter that declares a `default` may be left
    out (the default applies; xLAM marks such parameters required)."""
    properties = parameters.get("properties") or {}
    required = [p for p in parameters.get("required") or [] if "default" not in properties.get(p, {})]
    if "required" not in parameters or len(required) == len(parameters["required"]):
        return parameters
    return {**parameters, "required": required}


def check_call(call: dict[str, Any], tools: dict[str, dict[str, Any]], where: str) -> str:
    """The call's arguments as canonical JSON text, or RowError: unknown tool, not an object, or not valid."""
    import jsonschema

    name = call["name"]
    if name not in tools:
        offered = ", ".join(tools) or "none"
        raise RowError(f"{where} calls '{name}', which is not among the row's tools (offered: {offered})")
    arguments = _arguments(call.get("arguments"), where)
    try:
        jsonschema.validate(arguments, effective_parameters(tools[name]["parameters"]))
    except jsonschema.ValidationError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        raise RowError(
            f"{where}: the arguments of '{name}' do not match its parameters at {at}: {exc.message}"
        ) from None
    return json.dumps(arguments, ensure_ascii=False)


def _calls_of(message: dict[str, Any], role: str, text: str) -> tuple[str, list[dict[str, Any]]]:
    """(content, raw calls) of an assistant turn in any of the shapes."""
    if message.get("tool_calls"):
        calls = message["tool_calls"]
        if not isinstance(calls, list):
            raise RowError("tool_calls must be a list")
        raw = []
        for call in calls:
            function = call.get("function", call) if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise RowError("a tool call needs function.name")
            raw.append({"id": call.get("id"), "name": function["name"], "arguments": function.get("arguments")})
        return text, raw
    if isinstance(message.get("function_call"), dict):  # OpenAI's legacy single call
        legacy = message["function_call"]
        return text, [{"id": None, "name": legacy.get("name"), "arguments": legacy.get("arguments")}]
    if role == "function_call":  # ShareGPT: the value is the call (or a list of calls) as JSON
        return "", [parse_call_text(json.dumps(c), "the call") for c in _json_objects(text, "the function_call")]
    blocks = TOOL_CALL.findall(text)
    if not blocks:
        return text, []
    return TOOL_CALL.sub("", text).strip(), [parse_call_text(b, "a <tool_call> block") for b in blocks]


def tool_chat(messages: Any, tools_value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(canonical messages, canonical tools) of a tool-calling chat, or RowError naming the message."""
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of messages")
    listed: list[Any] = []
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # ids of calls not answered yet, in order
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"messages[{i}] must be an object, got {type(message).__name__}")
        role = str(message.get("role", message.get("from")))
        text = message.get("content", message.get("value"))
        text = "" if text is None else text
        if not isinstance(text, str):
            raise RowError(f"messages[{i}].content must be a string, got {type(text).__name__}")
        canon = ROLE_NAMES.get(role, role)
        if canon == "system" and "<tools>" in text:
            text, listed = tools_in_system(text)
            if not text:  # the system prompt only listed the tools: the template lists them now
                continue
        if canon in ("system", "user"):
            out.append({"role": canon, "content": text})
        elif canon == "assistant":
            out.append(_assistant(message, role, text, i, len(out)))
        elif canon == "tool":
            out.append(_tool_result(message, text, pending, i))
            continue
        else:
            raise RowError(f"messages[{i}].role must be system, user, assistant or tool, got {role!r}")
        pending = [c["id"] for c in out[-1].get("tool_calls", [])] if canon == "assistant" else pending
    tools = canonical_tools(tools_value if tools_value not in (None, "", []) else listed)
    _check_turns(out, {t["function"]["name"]: t["function"] for t in tools})
    return out, tools


def _assistant(message: dict[str, Any], role: str, text: str, i: int, turn: int) -> dict[str, Any]:
    try:
        content, raw = _calls_of(message, role, text)
    except RowError as exc:
        raise RowError(f"messages[{i}]: {exc}") from None
    if not raw:
        return {"role": "assistant", "content": content}
    calls = [
        {
            "id": str(call.get("id") or f"call_{turn}_{k}"),
            "type": "function",
            "function": {"name": call["name"], "arguments": call.get("arguments")},
        }
        for k, call in enumerate(raw)
    ]
    return {"role": "assistant", "content": content, "tool_calls": calls}


def _tool_result(message: dict[str, Any], text: str, pending: list[str], i: int) -> dict[str, Any]:
    """A tool result, matched to the call it answers (by id, or the next unanswered call when it names none)."""
    wrapped = TOOL_RESPONSE.match(text)
    text = wrapped.group(1) if wrapped else text
    call_id = message.get("tool_call_id")
    if call_id is None:
        if not pending:
            raise RowError(f"messages[{i}] is a tool result, but no call before it is waiting for one")
        call_id = pending[0]
    if call_id not in pending:
        raise RowError(f"messages[{i}] answers tool call '{call_id}', which no earlier call is waiting on")
    pending.remove(call_id)
    if not text.strip():
        raise RowError(f"messages[{i}]: the tool result is empty")
    return {"role": "tool", "tool_call_id": str(call_id), "content": text}


def _check_turns(messages: list[dict[str, Any]], tools: dict[str, dict[str, Any]]) -> None:
    """Every call valid; the chat ends with the assistant; ids unique; a system turn only first."""
    ids: set[str] = set()
    for i, message in enumerate(messages):
        if message["role"] == "system" and i > 0:
            raise RowError("a system message may only come first")
        if message["role"] in ("system", "user") and not message["content"].strip():
            raise RowError(f"messages[{i}].content is empty")
        for k, call in enumerate(message.get("tool_calls", [])):
            where = f"messages[{i}].tool_calls[{k}]"
            call["function"]["arguments"] = check_call(call["function"], tools, where)
            if call["id"] in ids:
                raise RowError(f"{where}: the id '{call['id']}' is used twice")
            ids.add(call["id"])
        if message["role"] == "assistant" and not message.get("tool_calls") and not message["content"].strip():
            raise RowError(f"messages[{i}].content is empty")
    if messages[-1]["role"] != "assistant":
        raise RowError("the last message must be the assistant's (a call or an answer)")


# ---- glaive's own format -------------------------------------------------------------------------


def glaive_chat(system: Any, chat: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """glaive-function-calling-v2's `system` and `chat` strings as messages (ShareGPT-shaped) and its tools."""
    if not isinstance(system, str) or not isinstance(chat, str):
        raise RowError("glaive rows need 'system' and 'chat' strings")
    prompt, _, listing = system.partition("-\n") if "{" in system else (system, "", "")
    tools = _json_objects(listing, "the system prompt's functions") if listing.strip() else []
    prompt = re.sub(r"^\s*SYSTEM:\s*", "", prompt).strip()
    parts = GLAIVE_TURN.split(chat)
    if len(parts) < 3:
        raise RowError("field 'chat' holds no 'USER:' / 'ASSISTANT:' turns")
    # The prompt introduces the listed functions ("... access to the following functions"); the chat template
    # lists the tools itself, so it is kept only when no functions follow it.
    messages: list[dict[str, Any]] = [{"role": "system", "content": prompt}] if prompt and not tools else []
    for speaker, text in zip(parts[1::2], parts[2::2]):
        text = text.replace("<|endoftext|>", "").strip()
        if speaker == "USER":
            messages.append({"role": "user", "content": text})
        elif speaker == "FUNCTION RESPONSE":
            messages.append({"role": "tool", "content": text})
        elif text.startswith("<functioncall>"):
            call = parse_call_text(text[len("<functioncall>") :].strip(), "a <functioncall>")
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"function": call}]})
        else:
            messages.append({"role": "assistant", "content": text})
    return messages, tools


def calls_in_text(text: str) -> tuple[str, list[dict[str, Any] | None]]:
    """A generated answer read back: its text outside <tool_call> blocks, and each block as {name, arguments}
    (None for a block that is not a JSON call with an object of arguments). An unclosed block at the end (an
    answer cut off) counts as a call that did not parse."""
    calls: list[dict[str, Any] | None] = []
    for block in TOOL_CALL.findall(text):
        try:
            call = parse_call_text(block, "a <tool_call> block")
            calls.append({"name": call["name"], "arguments": _arguments(call["arguments"], "the call")})
        except RowError:
            calls.append(None)
    rest = TOOL_CALL.sub("", text)
    if "<tool_call>" in rest:
        calls.append(None)
        rest = rest[: rest.index("<tool_call>")]
    return rest.strip(), calls
