"""`afina serve`: an OpenAI-compatible HTTP API over FastAPI, a chat page, metrics and a feedback loop.

    /v1/chat/completions, /v1/completions   (with "stream": true as server-sent events)
    /v1/models                              the base and every adapter, by name (the request's `model`)
    /v1/feedback                            a rating and a corrected answer for a response id
    /health, /metrics (Prometheus), /       (the chat page)

One worker runs the model: requests queue for it in arrival order, up to `max_queue` waiting
(beyond which they get 429), and greedy requests for the same model that wait together run as one
batch (serve/batching.py). Every refusal is a 4xx with a JSON body in
OpenAI's shape ({"error": {"message", "type", "code"}}); the server keeps serving after each.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
import time
import uuid
from importlib import resources
from typing import Any, Literal

import torch
from fastapi import Request  # at module level: FastAPI resolves the string annotations below from here
from pydantic import BaseModel, ConfigDict, Field

from afina import __version__
from afina.config import ServeConfig
from afina.data.format import render_prompt
from afina.serve.batching import Scheduler
from afina.serve.logs import RequestLog
from afina.serve.models import ServedModels, load_served


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (n=1, user, ...)


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False


class CompletionRequest(_Request):
    model: str | None = None
    prompt: str
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False


class FeedbackRequest(_Request):
    id: str = Field(min_length=1, max_length=200, description="The `id` of a chat or completion response.")
    rating: int | None = Field(None, ge=-1, le=1, description="1 good, -1 bad, 0 neutral.")
    correction: str | None = Field(None, description="The answer the model should have given.")
    comment: str | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


def _error_body(message: str, code: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413 before they reach the app (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size, more = [], 0, not too_large
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                too_large = True
                break
        if too_large:
            body = json.dumps(_error_body(f"request body is over this server's limit of {self.limit} bytes",
                                          "body_too_large")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return None
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replayed, send)


class Metrics:
    """Prometheus metrics in a registry of this app's own (several apps may live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("afina_requests", "HTTP requests", ["path", "status"], registry=self.registry)
        self.latency = Histogram("afina_request_latency_seconds", "Time to the response's headers", ["path"],
                                 registry=self.registry)
        self.generation = Histogram("afina_generation_seconds", "Time from the model's turn to the last token",
                                    ["model"], registry=self.registry,
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("afina_tokens", "Tokens processed", ["model", "kind"], registry=self.registry)
        self.queue = Gauge("afina_queue_depth", "Requests waiting for or holding the model", registry=self.registry)
        self.batch = Histogram("afina_batch_size", "Requests per generate() call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))


def create_app(served: ServedModels, settings: ServeConfig | None = None, log: RequestLog | None = None):
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from transformers import TextIteratorStreamer

    settings = settings or ServeConfig()
    api_key = settings.api_key or os.environ.get("AFINA_API_KEY") or None
    if log is None and settings.log_dir:
        log = RequestLog(settings.log_dir, redact_pii=settings.redact_pii)
    max_prompt = min(settings.max_prompt_tokens or served.max_context, served.max_context)
    tok = served.tokenizer
    metrics = Metrics()
    scheduler = Scheduler(served, settings.max_batch, observe=lambda name, seconds, size: (
        metrics.generation.labels(name).observe(seconds), metrics.batch.observe(size)))
    queue_lock = threading.Lock()
    waiting = [0]

    app = FastAPI(title="afina", version=__version__)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "other")
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return JSONResponse(_error_body(exc.message, exc.code, exc.kind), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                             for e in exc.errors())
        return JSONResponse(_error_body(f"invalid request: {problems}", "invalid_request"), status_code=422)

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return JSONResponse(_error_body(str(exc.detail), "http_error"), status_code=exc.status_code)

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key",
                           "authentication_error")

    def admit() -> None:
        with queue_lock:
            if waiting[0] >= settings.max_queue:
                raise ApiError(429, f"the server is busy ({waiting[0]} requests queued); retry shortly", "queue_full",
                               "rate_limit_error")
            waiting[0] += 1
            metrics.queue.set(waiting[0])

    def leave() -> None:
        with queue_lock:
            waiting[0] -= 1
            metrics.queue.set(waiting[0])

    def resolve(request) -> tuple[str, int]:
        name = request.model or served.default
        if name not in served.names:
            raise ApiError(404, f"model '{name}' is not served here; available: {', '.join(served.names)}",
                           "model_not_found")
        asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
        max_new = asked or min(settings.default_max_tokens, settings.max_tokens)
        if max_new > settings.max_tokens:
            raise ApiError(400, f"max_tokens={max_new} is over this server's limit of {settings.max_tokens}",
                           "max_tokens_exceeded")
        return name, max_new

    def encode(prompt: str, max_new: int) -> torch.Tensor:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] > max_prompt:
            raise ApiError(400, f"the prompt is {ids.shape[1]} tokens; this server's limit is {max_prompt}",
                           "prompt_too_long")
        if ids.shape[1] + max_new > served.max_context:
            raise ApiError(400, f"prompt of {ids.shape[1]} tokens plus max_tokens={max_new} exceeds the context "
                           f"of {served.max_context}", "context_length_exceeded")
        return ids

    def gen_kwargs(ids, max_new, request) -> dict[str, Any]:
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                      do_sample=request.temperature > 0, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if request.temperature > 0:
            kwargs.update(temperature=request.temperature, top_p=request.top_p)
        return kwargs

    def run_model(name: str, kwargs: dict[str, Any], batchable: bool) -> torch.Tensor:
        """Queue for the model with `name`'s adapter; the caller has been admitted to the queue."""
        try:
            return scheduler.generate(name, kwargs, batchable)
        finally:
            leave()

    def record(rid, endpoint, name, request_fields, ids, text, n_new, started) -> dict[str, int]:
        usage = {"prompt_tokens": int(ids.shape[1]), "completion_tokens": n_new, "total_tokens": int(ids.shape[1]) + n_new}
        metrics.tokens.labels(name, "prompt").inc(usage["prompt_tokens"])
        metrics.tokens.labels(name, "completion").inc(n_new)
        if log is not None:
            log.log_request(rid, endpoint, name, request_fields, text, usage, time.perf_counter() - started)
        return usage

    def answer(rid, endpoint, name, request_fields, ids, max_new, request, started) -> tuple[str, str, dict[str, int]]:
        admit()
        out = run_model(name, gen_kwargs(ids, max_new, request), batchable=request.temperature == 0)
        new = out[0, ids.shape[1]:].cpu()
        finish = "stop" if len(new) and int(new[-1]) == tok.eos_token_id else "length"
        text = tok.decode(new, skip_special_tokens=True)
        return text, finish, record(rid, endpoint, name, request_fields, ids, text, len(new), started)

    def stream(rid, endpoint, name, request_fields, ids, max_new, request, started, wrap):
        admit()
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        outcome: dict[str, Any] = {}

        def work():
            try:
                outcome["out"] = run_model(name, {**gen_kwargs(ids, max_new, request), "streamer": streamer}, False)
            except Exception as exc:  # reported to the client as an error event, never a hung stream
                outcome["error"] = exc
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()

        def events():
            pieces = []
            for piece in streamer:
                if piece:
                    pieces.append(piece)
                    yield f"data: {json.dumps(wrap(piece, None))}\n\n"
            worker.join()  # the streamer ends inside generate(), a moment before its result is returned
            if "error" in outcome:
                error = _error_body(f"generation failed: {outcome['error']}", "generation_error", "server_error")
                yield f"data: {json.dumps(error)}\n\n"
            else:
                new = outcome["out"][0, ids.shape[1]:]
                finish = "stop" if len(new) and int(new[-1]) == tok.eos_token_id else "length"
                record(rid, endpoint, name, request_fields, ids, "".join(pieces), len(new), started)
                yield f"data: {json.dumps(wrap('', finish))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"x-request-id": rid})

    @app.get("/health")
    def health():
        return {"status": "ok", "models": served.names, "queued": waiting[0]}

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def chat_page():
        return (resources.files("afina.serve") / "static" / "chat.html").read_text(encoding="utf-8")

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "afina", "created": 0,
             "kind": "adapter" if name in served.adapters else "base"} for name in served.names]}

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    def chat(request: ChatRequest):
        started = time.perf_counter()
        name, max_new = resolve(request)
        messages = [m.model_dump() for m in request.messages]
        ids = encode(render_prompt(tok, messages), max_new)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        fields = {"messages": messages, "stream": request.stream}
        if request.stream:
            def wrap(piece, finish):
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}]}
            return stream(rid, "chat", name, fields, ids, max_new, request, started, wrap)
        text, finish, usage = answer(rid, "chat", name, fields, ids, max_new, request, started)
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": usage}

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    def completions(request: CompletionRequest):
        started = time.perf_counter()
        name, max_new = resolve(request)
        ids = encode(request.prompt, max_new)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        fields = {"prompt": request.prompt, "stream": request.stream}
        if request.stream:
            def wrap(piece, finish):
                return {"id": rid, "object": "text_completion", "created": created, "model": name,
                        "choices": [{"index": 0, "text": piece, "finish_reason": finish}]}
            return stream(rid, "completion", name, fields, ids, max_new, request, started, wrap)
        text, finish, usage = answer(rid, "completion", name, fields, ids, max_new, request, started)
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": usage}

    @app.post("/v1/feedback", dependencies=[Depends(require_key)])
    def feedback(request: FeedbackRequest):
        if log is None:
            raise ApiError(409, "feedback needs the request log: start the server with --log-dir", "logging_disabled")
        if not log.knows(request.id):
            raise ApiError(404, f"no logged response with id '{request.id}'", "response_not_found")
        if request.rating is None and not request.correction:
            raise ApiError(400, "give a rating (-1, 0, 1), a correction, or both", "empty_feedback")
        log.log_feedback(request.id, request.rating, request.correction, request.comment)
        return {"id": request.id, "status": "recorded"}

    return app


def serve(target: str, settings: ServeConfig) -> None:
    import uvicorn

    served = load_served(target, settings.adapters, settings.watch)
    app = create_app(served, settings)
    print(f"serving {', '.join(served.names)} at http://{settings.host}:{settings.port}/v1 (OpenAI-compatible); "
          f"chat page at http://{settings.host}:{settings.port}/ ; Ctrl-C to stop")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
