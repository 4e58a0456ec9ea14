"""What a request to `afina serve` may say, checked before any work is done.

Every OpenAI option is either honoured or refused with a 400 naming it: a client must never
believe something happened that did not. Supported (chat): model, messages (roles system,
developer, user, assistant; content a string or a list of text parts), max_tokens /
max_completion_tokens, temperature, top_p, n, stop, seed, logprobs + top_logprobs, stream,
stream_options.include_usage, response_format (text, json_object, json_schema), tools (functions),
tool_choice (none, auto, required, a named function), parallel_tool_calls, assistant messages with
tool_calls and `tool` messages. Completions: model, prompt, max_tokens, temperature, top_p, n, stop,
seed, logprobs, stream, stream_options. Accepted and ignored (they change nothing a client can
observe): user, metadata, store, service_tier, presence_penalty/frequency_penalty of 0, best_of equal
to n. Everything else (the legacy functions/function_call, logit_bias, echo, suffix, audio,
modalities, ...) is refused.

A body is read as JSON here (not by FastAPI) so that the API key is checked first, a malformed
body is a 400 with the JSON error's position, and a lone surrogate ("\\ud800", valid JSON, not
valid text) is a 400 naming the field instead of a 500 deep in the tokenizer.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IGNORED = {"user", "metadata", "store", "service_tier"}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, code: str, kind: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param


def error_body(message: str, code: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def unsupported(option: str, why: str = "") -> ApiError:
    return ApiError(
        400,
        f"'{option}' is not supported by this server{': ' + why if why else ''}",
        "unsupported_parameter",
        param=option,
    )


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    def refuse_unknown(self) -> None:
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED:
                continue
            if key in ("presence_penalty", "frequency_penalty") and value in (0, 0.0, None):
                continue
            if key == "functions" and not value:
                continue
            if key == "function_call" and value in (None, "none"):
                continue
            raise unsupported(key)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def only_text(self):
        if self.type != "text":
            raise ValueError(f"content part type '{self.type}' is not supported; this server takes text parts only")
        if self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    arguments: str

    @field_validator("arguments")
    @classmethod
    def json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"arguments must be JSON text ({exc.msg})") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object")
        return value or "{}"


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # `name` and the like: carried by clients, not used
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def consistent(self):
        for key in ("function_call", "audio"):
            if (self.model_extra or {}).get(key):
                raise ValueError(f"messages with '{key}' are not supported (send tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only for an assistant message with tool_calls)")
        return self

    def as_turn(self) -> dict[str, Any]:
        """The turn as the chat template takes it: developer is the system turn, parts joined; calls and the
        id a tool result answers kept in OpenAI's shape."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text or "" for p in content)
        turn: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            turn["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.role == "tool":
            turn["tool_call_id"] = self.tool_call_id
        return turn


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a 'json_schema' object with 'name' and 'schema'")
        return self


class _Generation(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give up to 4 non-empty stop strings")
        return stops

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def null_is_default(cls, value, info):
        return (0.0 if info.field_name == "temperature" else 1.0) if value is None else value

    def check(self) -> None:
        self.refuse_unknown()
        if self.stream_options is not None and not self.stream:
            raise ApiError(
                400, "'stream_options' is only allowed with stream: true", "invalid_request", param="stream_options"
            )


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs logprobs: true", "invalid_request", param="top_logprobs")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ApiError(400, "two tools share a name; give each function its own", "invalid_request", param="tools")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise ApiError(
                400, "'tool_choice' asks for a call, but no 'tools' are given", "invalid_request", "tool_choice"
            )
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ApiError(
                400,
                f"tool_choice names '{choice.function.name}', which is not among the tools ({', '.join(names)})",
                "invalid_request",
                param="tool_choice",
            )
        if self.tools and self.response_format is not None and self.response_format.type != "text":
            raise ApiError(
                400, "give 'tools' or a JSON 'response_format', not both", "invalid_request", param="response_format"
            )

    def tool_list(self) -> list[dict[str, Any]] | None:
        """The tools in OpenAI's shape (as chat templates take them), or None."""
        if not self.tools:
            return None
        return [{"type": "function", "function": tool.function.model_dump(exclude_none=True)} for tool in self.tools]

    def calls_expected(self) -> bool:
        """Whether the answer may be tool calls (tools given and tool_choice is not none)."""
        return bool(self.tools) and self.tool_choice != "none"

    def grammar(self) -> str | None:
        """The grammar the answer must follow (a JSON schema, or the tools and tool_choice), or None for free text."""
        from afina.serve.grammar import ANY_OBJECT, GrammarError, json_grammar, tool_grammar

        try:
            tools = self.tool_list()
            if tools:
                choice = self.tool_choice
                name = choice.function.name if isinstance(choice, NamedToolChoice) else choice
                return tool_grammar(tools, name, self.parallel_tool_calls)
            fmt = self.response_format
            if fmt is None or fmt.type == "text":
                return None
            if fmt.type == "json_object":
                return json_grammar(ANY_OBJECT)
            return json_grammar(
                fmt.json_schema.schema_ if fmt.json_schema else {}, "response_format.json_schema.schema"
            )
        except GrammarError as exc:
            param = "tools" if self.tools else "response_format"
            raise ApiError(400, str(exc), "unsupported_schema", param=param) from None


class CompletionRequest(_Generation):
    prompt: str
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise unsupported("echo")
        if self.suffix:
            raise unsupported("suffix", "fill-in-the-middle needs a model trained for it")
        if self.best_of not in (None, self.n):
            raise unsupported("best_of", "only best_of equal to n")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=200, description="The `id` of a chat or completion response.")
    rating: int | None = Field(None, ge=-1, le=1, description="1 good, -1 bad, 0 neutral.")
    correction: str | None = Field(None, description="The answer the model should have given.")
    comment: str | None = Field(None, max_length=2000)


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """Where a string holds a lone surrogate (valid JSON escape, not valid Unicode text), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _surrogate_path(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def parse_body(raw: bytes, model: type[BaseModel]):
    """The request body as `model`, or ApiError(400) saying what is wrong and where."""
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text", "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", "invalid_request")
    where = _surrogate_path(data)
    if where:
        raise ApiError(
            400,
            f"{where}: contains a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not "
            "text; send valid UTF-16 pairs or UTF-8",
            "invalid_text",
            param=where,
        )
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        first = ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else None
        raise ApiError(400, f"invalid request: {problems}", "invalid_request", param=first) from None
    if hasattr(request, "check"):
        request.check()
    return request
