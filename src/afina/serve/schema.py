"""What a request to `afina serve` may say, checked before any work is done.

Every OpenAI option is either honoured or refused with a 400 naming it: a client must never
believe something happened that did not. Supported (chat): model, messages (roles system,
developer, user, assistant; content a string or a list of text parts), max_tokens /
max_completion_tokens, temperature, top_p, n, stop, seed, logprobs + top_logprobs, stream,
stream_options.include_usage, response_format (text, json_object, json_schema). Completions: model,
prompt, max_tokens, temperature, top_p, n, stop, seed, logprobs, stream, stream_options. Accepted
and ignored (they change nothing a client can observe): user, metadata, store, service_tier,
presence_penalty/frequency_penalty of 0, best_of equal to n. Everything else (tools, tool_choice,
functions, logit_bias, echo, suffix, audio, modalities, ...) is refused.

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
            if key in ("tools", "functions") and not value:
                continue
            if key in ("tool_choice", "function_call", "parallel_tool_calls") and value in (None, "none", False):
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # `name` and the like: carried by clients, not used
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @model_validator(mode="after")
    def no_tool_calls(self):
        for key in ("tool_calls", "function_call", "audio"):
            if (self.model_extra or {}).get(key):
                raise ValueError(f"messages with '{key}' are not supported (this server has no tool calling)")
        return self

    def as_turn(self) -> dict[str, str]:
        """The turn as the chat template takes it: developer is the system turn, parts joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


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

    def check(self) -> None:
        super().check()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "'top_logprobs' needs logprobs: true", "invalid_request", param="top_logprobs")

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the answer must follow, or None for free text."""
        from afina.serve.json_output import ANY_OBJECT, SchemaError, check_schema

        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return ANY_OBJECT
        schema = fmt.json_schema.schema_ if fmt.json_schema else {}
        try:
            check_schema(schema, "response_format.json_schema.schema")
        except SchemaError as exc:
            raise ApiError(400, str(exc), "unsupported_schema", param="response_format") from None
        return schema


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
