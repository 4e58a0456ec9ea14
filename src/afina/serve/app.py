"""`afina serve`: an OpenAI-compatible HTTP API over FastAPI, a chat page, metrics and a feedback loop.

    /v1/chat/completions, /v1/completions   (with "stream": true as server-sent events)
    /v1/models                              the base and every adapter, by name (the request's `model`)
    /v1/feedback                            a rating and a corrected answer for a response id
    /health, /metrics (Prometheus), /       (the chat page)

One worker thread runs the model (serve/batching.py): requests queue for it in arrival order, up to
`max_queue` waiting (beyond which they get 429), and greedy requests for the same model that wait
together run as one batch. The handlers are async and never wait on a thread: the key check (401),
admission (429), /health and /metrics answer at once however busy the model is. A request whose
client disconnects is cancelled: dropped from the queue, or stopped at the next decoding step, and
logged as aborted. Every refusal is a 4xx with a JSON body in OpenAI's shape
({"error": {"message", "type", "code", "param"}}); which options are honoured is in serve/schema.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import Request

from afina import __version__
from afina.config import ServeConfig
from afina.rundir import RunDir
from afina.serve.batching import Engine, Generated, Job, Scheduler
from afina.serve.generation import IncrementalText, chat_logprobs, completion_logprobs, cut_at_stop, encode_chat
from afina.serve.logs import RequestLog
from afina.serve.models import ServedModels, ServeError, load_served
from afina.serve.schema import ApiError, ChatRequest, CompletionRequest, FeedbackRequest, error_body, parse_body
from afina.serve.tools import ToolCallStream, check_tool_results, check_tool_template

# Kept importable from here (older code and tests import them from serve.app).
__all__ = ["ApiError", "BodyLimit", "create_app", "serve"]


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
            body = json.dumps(
                error_body(f"request body is over this server's limit of {self.limit} bytes", "body_too_large")
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
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
        self.latency = Histogram(
            "afina_request_latency_seconds", "Time to the response's headers", ["path"], registry=self.registry
        )
        self.generation = Histogram(
            "afina_generation_seconds",
            "Time from the model's turn to the last token",
            ["model"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.tokens = Counter("afina_tokens", "Tokens processed", ["model", "kind"], registry=self.registry)
        self.queue = Gauge("afina_queue_depth", "Requests waiting for or holding the model", registry=self.registry)
        self.batch = Histogram(
            "afina_batch_size", "Requests per generate() call", registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64)
        )
        self.aborted = Counter(
            "afina_aborted_requests", "Requests cancelled because the client went away", registry=self.registry
        )
        self.feedback = Counter(
            "afina_feedback", "Feedback received on /v1/feedback, by kind", ["kind"], registry=self.registry
        )
        # `afina monitor` over the request log (--monitor-every): NaN until it has run on some traffic.
        self.drift_share = Gauge(
            "afina_drift_unlike_share",
            "Share of the recent prompts farther from the train split than its own 95th-percentile distance",
            registry=self.registry,
        )
        self.drift_limit = Gauge(
            "afina_drift_unlike_limit", "The drift share above which retraining is recommended", registry=self.registry
        )
        self.negative_share = Gauge(
            "afina_feedback_negative_share",
            "Share of negative ratings among the recent rated requests",
            registry=self.registry,
        )
        self.retrain = Gauge(
            "afina_retrain_recommended", "1 when the monitor's verdict recommends retraining", registry=self.registry
        )
        self.monitored = Gauge(
            "afina_monitor_requests", "Logged requests the monitor gauges were computed from", registry=self.registry
        )
        self.monitor_time = Gauge(
            "afina_monitor_timestamp_seconds", "When the monitor gauges were last computed", registry=self.registry
        )
        self.monitor_errors = Counter(
            "afina_monitor_errors", "Monitor runs that failed (the reason is in the server log)", registry=self.registry
        )
        for gauge in (self.drift_share, self.negative_share, self.retrain):
            gauge.set(float("nan"))

    def publish_monitor(self, report: dict) -> None:
        """Set the monitor gauges from an `afina monitor` report."""
        drift = report["drift"]
        self.drift_share.set(drift["share_unlike_train"])
        self.drift_limit.set(drift["max_unlike"])
        negative = report["feedback"]["recent"]["negative_share"]
        self.negative_share.set(float("nan") if negative is None else negative)
        self.retrain.set(1.0 if report["retrain"] else 0.0)
        self.monitored.set(report["requests"])
        self.monitor_time.set(time.time())


class MonitorThread(threading.Thread):
    """Runs `afina monitor` over the request log every `every` seconds and publishes it as gauges."""

    def __init__(self, metrics: Metrics, log_dir: str, run_root: str, every: float, max_unlike: float):
        super().__init__(name="afina-monitor", daemon=True)
        self.metrics, self.log_dir, self.run_root = metrics, log_dir, run_root
        self.every, self.max_unlike = every, max_unlike
        self.stopped = threading.Event()

    def refresh(self) -> bool:
        """One monitor run; False when there is no traffic yet (nothing to compare)."""
        from afina.eval.monitor import monitor

        requests = Path(self.log_dir) / "requests.jsonl"
        if not requests.is_file() or requests.stat().st_size == 0:
            return False
        self.metrics.publish_monitor(monitor(self.log_dir, self.run_root, max_unlike=self.max_unlike))
        return True

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.refresh()
            except Exception as exc:  # a bad log line or a missing split must not stop the server
                self.metrics.monitor_errors.inc()
                print(f"afina monitor (--monitor-every): {type(exc).__name__}: {exc}", file=sys.stderr)
            self.stopped.wait(self.every)

    def stop(self) -> None:
        """Stop after the pass in progress (so no torch work is cut off at interpreter exit)."""
        self.stopped.set()
        if self.is_alive():
            self.join()


class CountRequests:
    """Count responses by route and status, and time to the response's headers (plain ASGI: streams pass through)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def counted(message):
            if message["type"] == "http.response.start":
                path = getattr(scope.get("route"), "path", "other")
                self.metrics.requests.labels(path, str(message["status"])).inc()
                self.metrics.latency.labels(path).observe(time.perf_counter() - start)
            await send(message)

        return await self.app(scope, receive, counted)


@dataclass
class AppState:
    """Everything the handlers share: the models, the limits, the queue count, the log and the metrics."""

    served: ServedModels
    settings: ServeConfig
    api_key: str | None
    log: RequestLog | None
    metrics: Metrics
    scheduler: Engine
    max_prompt: int
    waiting: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, count: int) -> None:
        """Count `count` jobs into the queue, or 429 when that would pass max_queue."""
        with self.lock:
            if self.waiting + count > self.settings.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy ({self.waiting} requests queued); retry shortly",
                    "queue_full",
                    "rate_limit_error",
                )
            self.waiting += count
            self.metrics.queue.set(self.waiting)

    def leave(self) -> None:
        with self.lock:
            self.waiting -= 1
            self.metrics.queue.set(self.waiting)


@dataclass
class Plan:
    """One checked generation request, ready to queue."""

    rid: str
    endpoint: str  # "chat" or "completion"
    name: str
    request: ChatRequest | CompletionRequest
    ids: torch.Tensor
    max_new: int
    fields: dict[str, Any]  # what the log keeps of the request
    started: float
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def calls_expected(self) -> bool:
        """The answer may be tool calls: parsed into `tool_calls`, streamed as their deltas."""
        return isinstance(self.request, ChatRequest) and self.request.calls_expected()

    @property
    def stops(self) -> list[str]:
        stop = self.request.stop  # a list once checked (schema.py)
        return [stop] if isinstance(stop, str) else list(stop or [])

    @property
    def top_logprobs(self) -> int | None:
        if isinstance(self.request, ChatRequest):
            return (self.request.top_logprobs or 0) if self.request.logprobs else None
        return self.request.logprobs


def app_state(request: Request) -> AppState:
    return request.app.state.afina


def authorize(state: AppState, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), state.api_key.encode()):
        raise ApiError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "invalid_api_key",
            "authentication_error",
        )


async def read_request(state: AppState, request: Request, model):
    """The key first, then the body: an unauthenticated client gets 401 whatever it sent."""
    authorize(state, request)
    return parse_body(await request.body(), model)


def resolve(state: AppState, request) -> tuple[str, int]:
    name = request.model or state.served.default
    if name not in state.served.names:
        raise ApiError(
            404,
            f"model '{name}' is not served here; available: {', '.join(state.served.names)}",
            "model_not_found",
            param="model",
        )
    settings = state.settings
    asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
    max_new = asked or min(settings.default_max_tokens, settings.max_tokens)
    if max_new > settings.max_tokens:
        raise ApiError(
            400,
            f"max_tokens={max_new} is over this server's limit of {settings.max_tokens}",
            "max_tokens_exceeded",
            param="max_tokens",
        )
    if request.stream and getattr(request, "logprobs", None) not in (None, False):
        raise ApiError(
            400,
            "'logprobs' with stream: true is not supported; ask without streaming",
            "unsupported_parameter",
            param="logprobs",
        )
    return name, max_new


def check_length(state: AppState, ids: list[int], max_new: int) -> torch.Tensor:
    if len(ids) > state.max_prompt:
        raise ApiError(
            400, f"the prompt is {len(ids)} tokens; this server's limit is {state.max_prompt}", "prompt_too_long"
        )
    if len(ids) + max_new > state.served.max_context:
        raise ApiError(
            400,
            f"prompt of {len(ids)} tokens plus max_tokens={max_new} exceeds the context of {state.served.max_context}",
            "context_length_exceeded",
        )
    return torch.tensor([ids], dtype=torch.long)


def make_jobs(state: AppState, plan: Plan, grammar: str | None = None) -> list[Job]:
    """One job per requested choice (`n`); sampled choices get seeds seed, seed+1, ..."""
    tok, request = state.served.tokenizer, plan.request
    sampling = request.temperature > 0
    kwargs = dict(
        input_ids=plan.ids,
        attention_mask=torch.ones_like(plan.ids),
        max_new_tokens=plan.max_new,
        do_sample=sampling,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if sampling:
        kwargs.update(temperature=request.temperature, top_p=request.top_p)
    jobs = []
    for i in range(request.n):
        processors = []
        if grammar is not None:
            from afina.serve.grammar import GrammarLogitsProcessor

            processors.append(GrammarLogitsProcessor(tok, grammar, plan.ids.shape[1]))
        plain = not (sampling or request.stream or plan.stops or processors or plan.top_logprobs is not None)
        seed = None if request.seed is None else request.seed + i
        jobs.append(Job(plan.name, dict(kwargs), plain, plan.stops, seed, plan.top_logprobs, processors))
    return jobs


def queue_jobs(state: AppState, jobs: list[Job]) -> None:
    state.admit(len(jobs))
    for job in jobs:
        job.future.add_done_callback(lambda _f: state.leave())
        state.scheduler.submit(job)


def finish_reason(tok, result: Generated, stopped: bool) -> str:
    new = result.new_tokens
    return "stop" if stopped or (new and new[-1] == tok.eos_token_id) else "length"


def record(
    state: AppState, plan: Plan, answers: list[str], completion_tokens: int, aborted: bool = False
) -> dict[str, int]:
    prompt_tokens = int(plan.ids.shape[1])
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    state.metrics.tokens.labels(plan.name, "prompt").inc(prompt_tokens)
    state.metrics.tokens.labels(plan.name, "completion").inc(completion_tokens)
    if aborted:
        state.metrics.aborted.inc()
    if state.log is not None:
        fields = {
            **plan.fields,
            **({"answers": answers} if len(answers) > 1 else {}),
            **({"aborted": True} if aborted else {}),
        }
        state.log.log_request(
            plan.rid,
            plan.endpoint,
            plan.name,
            fields,
            answers[0] if answers else "",
            usage,
            time.perf_counter() - plan.started,
        )
    return usage


def record_when_stopped(state: AppState, plan: Plan, jobs: list[Job], texts: list[IncrementalText]) -> None:
    """Log an abandoned request as aborted once its jobs have stopped, with the tokens really generated."""
    remaining, lock = [len(jobs)], threading.Lock()

    def stopped(_future) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        generated = sum(len(j.future.result().new_tokens) for j in jobs if j.future.exception() is None)
        record(state, plan, [t.text() for t in texts], generated, aborted=True)

    for job in jobs:
        job.future.add_done_callback(stopped)


async def wait_for(request: Request, jobs: list[Job]) -> list[Generated]:
    """The jobs' results; if the client disconnects meanwhile, the jobs are cancelled."""
    gathered = asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.25)
            if done:
                return gathered.result()
            if await request.is_disconnected():
                for job in jobs:
                    job.cancel()
    finally:
        for job in jobs:  # cancelled from outside (server shutdown): stop generating too
            if not job.future.done():
                job.cancel()


async def answer(state: AppState, request: Request, plan: Plan, jobs: list[Job]) -> dict[str, Any]:
    queue_jobs(state, jobs)
    results = await wait_for(request, jobs)
    tok = state.served.tokenizer
    choices, texts = [], []
    for i, result in enumerate(results):
        text, stopped = cut_at_stop(tok.decode(result.new_tokens, skip_special_tokens=True), plan.stops)
        texts.append(text)
        reason = finish_reason(tok, result, stopped)
        logprobs = None
        if result.logprobs is not None:
            shaped = chat_logprobs if plan.endpoint == "chat" else completion_logprobs
            logprobs = shaped(tok, result.new_tokens, result.logprobs)
        if plan.endpoint == "chat":
            message = {"role": "assistant", "content": text, "refusal": None}
            if plan.calls_expected:
                calls = ToolCallStream(expect_calls=True)
                calls.add(text, final=True)
                message = calls.message()
                reason = "tool_calls" if calls.finished_calls() else reason
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason})
        else:
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason})
    aborted = any(r.aborted for r in results)
    usage = record(state, plan, texts, sum(len(r.new_tokens) for r in results), aborted)
    kind = "chat.completion" if plan.endpoint == "chat" else "text_completion"
    return {
        "id": plan.rid,
        "object": kind,
        "created": plan.created,
        "model": plan.name,
        "choices": choices,
        "usage": usage,
    }


def stream_chunk(
    plan: Plan,
    i: int,
    piece: str | None,
    finish: str | None,
    role: bool,
    include_usage: bool,
    delta: dict[str, Any] | None = None,
) -> str:
    """One server-sent event of choice i: a piece of text (or a chat `delta`: tool calls), its end (finish), or
    (chat) the role first."""
    body: dict[str, Any] = {"id": plan.rid, "created": plan.created, "model": plan.name}
    if plan.endpoint == "chat":
        if delta is None:
            delta = {"role": "assistant", "content": ""} if role else {"content": piece} if piece else {}
        body["object"] = "chat.completion.chunk"
        body["choices"] = [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        body["object"] = "text_completion"
        body["choices"] = [{"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}]
    if include_usage:
        body["usage"] = None
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def stream(state: AppState, plan: Plan, jobs: list[Job]):
    """Server-sent events; a client that goes away cancels the jobs (starlette cancels this generator)."""
    from fastapi.responses import StreamingResponse

    tok = state.served.tokenizer
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def on_token(i: int, token: int | None) -> None:  # from the worker thread; None: choice i is finished
        loop.call_soon_threadsafe(events.put_nowait, (i, token))

    for i, job in enumerate(jobs):
        job.on_token = functools.partial(on_token, i)
    queue_jobs(state, jobs)
    for i, job in enumerate(jobs):  # after the tokens, in the worker's order
        job.future.add_done_callback(functools.partial(lambda i, _future: on_token(i, None), i))
    chat = plan.endpoint == "chat"
    include_usage = bool(plan.request.stream_options and plan.request.stream_options.include_usage)

    def chunk(i: int, piece: str | None, finish: str | None, role: bool = False, delta=None) -> str:
        return stream_chunk(plan, i, piece, finish, role, include_usage, delta)

    calls = [ToolCallStream(expect_calls=plan.calls_expected) for _ in jobs]

    def pieces(i: int, piece: str, final: bool = False):
        """Chunks for a piece of choice i's text: content as it comes, or tool-call deltas once they show."""
        if not plan.calls_expected:
            if piece:
                yield chunk(i, piece, None)
            return
        for delta in calls[i].add(piece, final):
            yield chunk(i, None, None, delta=delta)

    async def produce():
        texts = [IncrementalText(tok, plan.stops) for _ in jobs]
        open_choices, completed = set(range(len(jobs))), False
        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, None, None, role=True)
            while open_choices:
                i, token = await events.get()
                if token is not None:
                    for event in pieces(i, texts[i].add(token)):
                        yield event
                    continue
                open_choices.discard(i)
                error = jobs[i].future.exception()
                if error is not None:
                    failure = error_body(f"generation failed: {error}", "generation_error", "server_error")
                    yield f"data: {json.dumps(failure)}\n\n"
                    continue
                for event in pieces(i, texts[i].finish(), final=True):
                    yield event
                result = jobs[i].future.result()
                reason = finish_reason(tok, result, texts[i].stopped)
                yield chunk(i, None, "tool_calls" if calls[i].finished_calls() else reason)
            completed = True
            usage = record(state, plan, [t.text() for t in texts], sum(len(t.tokens) for t in texts))
            if include_usage:
                body = {
                    "id": plan.rid,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": plan.created,
                    "model": plan.name,
                    "choices": [],
                    "usage": usage,
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not completed:  # the client went away (or the server is stopping): stop generating
                for job in jobs:
                    job.cancel()
                record_when_stopped(state, plan, jobs, texts)

    return StreamingResponse(produce(), media_type="text/event-stream", headers={"x-request-id": plan.rid})


async def generate(state: AppState, request: Request, plan: Plan, grammar: str | None = None):
    jobs = make_jobs(state, plan, grammar)
    if plan.request.stream:
        return stream(state, plan, jobs)
    return await answer(state, request, plan, jobs)


async def chat_completions(request: Request):
    state = app_state(request)
    body: ChatRequest = await read_request(state, request, ChatRequest)
    started = time.perf_counter()
    name, max_new = resolve(state, body)
    grammar = body.grammar()
    tools = body.tool_list()
    if tools:
        check_tool_template(state.served.tokenizer)
    messages = [m.as_turn() for m in body.messages]
    check_tool_results(messages)
    ids = check_length(state, encode_chat(state.served.tokenizer, messages, tools), max_new)
    fields = {"messages": messages, "stream": body.stream, **({"tools": tools} if tools else {})}
    plan = Plan(f"chatcmpl-{uuid.uuid4().hex}", "chat", name, body, ids, max_new, fields, started)
    return await generate(state, request, plan, grammar)


async def completions(request: Request):
    state = app_state(request)
    body: CompletionRequest = await read_request(state, request, CompletionRequest)
    started = time.perf_counter()
    name, max_new = resolve(state, body)
    ids = check_length(state, state.served.tokenizer(body.prompt, add_special_tokens=False)["input_ids"], max_new)
    plan = Plan(
        f"cmpl-{uuid.uuid4().hex}",
        "completion",
        name,
        body,
        ids,
        max_new,
        {"prompt": body.prompt, "stream": body.stream},
        started,
    )
    return await generate(state, request, plan)


async def feedback(request: Request):
    state = app_state(request)
    body: FeedbackRequest = await read_request(state, request, FeedbackRequest)
    log = state.log
    if log is None:
        raise ApiError(409, "feedback needs the request log: start the server with --log-dir", "logging_disabled")
    if not log.knows(body.id):
        raise ApiError(404, f"no logged response with id '{body.id}'", "response_not_found")
    if body.rating is None and not body.correction:
        raise ApiError(400, "give a rating (-1, 0, 1), a correction, or both", "empty_feedback")
    limit = state.settings.max_correction_chars
    if body.correction and len(body.correction) > limit:
        raise ApiError(
            400,
            f"the correction is {len(body.correction)} characters; this server's limit is {limit}",
            "correction_too_long",
            param="correction",
        )
    await asyncio.to_thread(log.log_feedback, body.id, body.rating, body.correction, body.comment)
    if body.rating is not None:
        state.metrics.feedback.labels({1: "positive", 0: "neutral", -1: "negative"}[body.rating]).inc()
    if body.correction:
        state.metrics.feedback.labels("correction").inc()
    return {"id": body.id, "status": "recorded"}


async def list_models(request: Request):
    state = app_state(request)
    authorize(state, request)
    served = state.served
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "owned_by": "afina",
                "created": 0,
                "kind": "adapter" if name in served.adapters else "base",
            }
            for name in served.names
        ],
    }


async def health(request: Request):
    state = app_state(request)
    engine = "transformers" if state.served.gguf is None else "llama.cpp"
    return {"status": "ok", "models": state.served.names, "queued": state.waiting, "engine": engine}


async def prometheus_metrics(request: Request):
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(app_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def chat_page():
    from fastapi.responses import HTMLResponse

    return HTMLResponse((resources.files("afina.serve") / "static" / "chat.html").read_text(encoding="utf-8"))


async def api_error(_request, exc: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(exc.message, exc.code, exc.kind, exc.param), status_code=exc.status)


async def invalid_request(_request, exc):
    from fastapi.responses import JSONResponse

    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
    )
    return JSONResponse(error_body(f"invalid request: {problems}", "invalid_request"), status_code=400)


async def http_error(_request, exc):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(str(exc.detail), "http_error"), status_code=exc.status_code)


async def server_error(_request, exc: Exception):
    from fastapi.responses import JSONResponse

    return JSONResponse(
        error_body(f"internal error: {type(exc).__name__}", "internal_error", "server_error"), status_code=500
    )


def monitor_thread(metrics: Metrics, settings: ServeConfig, run_root: str | None) -> MonitorThread:
    """The --monitor-every thread, after checking it has what it compares: the log and the run's train split."""
    if not settings.log_dir:
        raise ServeError("--monitor-every reads the request log: start the server with --log-dir too")
    if run_root is None or not RunDir(Path(run_root)).split_path("train").is_file():
        raise ServeError(
            "--monitor-every compares the traffic with a run's train split: serve a run directory (runs/NAME) "
            f"that `afina prepare` has written{'' if run_root is None else f' ({run_root} has no train split)'}"
        )
    return MonitorThread(
        metrics, settings.log_dir, run_root, settings.monitor_every or 0.0, settings.monitor_max_unlike
    )


def create_app(
    served: ServedModels,
    settings: ServeConfig | None = None,
    log: RequestLog | None = None,
    run_root: str | None = None,
):
    """The app; `run_root` (the served run directory) is what --monitor-every compares the traffic with."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeConfig()
    if log is None and settings.log_dir:
        log = RequestLog(settings.log_dir, redact_pii=settings.redact_pii)
    metrics = Metrics()
    monitor = monitor_thread(metrics, settings, run_root) if settings.monitor_every else None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        """The monitor thread runs while the server does; the engine's resources go with the server."""
        if monitor is not None:
            monitor.start()
        try:
            yield
        finally:
            if monitor is not None:
                await asyncio.to_thread(monitor.stop)
            await asyncio.to_thread(scheduler.close)

    def observe(name: str, seconds: float, size: int) -> None:
        metrics.generation.labels(name).observe(seconds)
        metrics.batch.observe(size)

    scheduler: Engine
    if served.gguf is not None:  # afina serve --engine llama.cpp
        from afina.serve.llamacpp_engine import LlamaCppEngine

        # Each sequence slot holds a KV cache of its own, allocated up front: as long as the longest request
        # this server takes (max_prompt_tokens, 1024 unless set, plus max_tokens), not the model's whole context.
        served.max_context = min(served.max_context, (settings.max_prompt_tokens or 1024) + settings.max_tokens)
        scheduler = LlamaCppEngine(
            served.gguf, served.tokenizer, settings.max_batch, served.max_context, observe, threads=settings.threads
        )
    else:
        scheduler = Scheduler(served, settings.max_batch, observe=observe)
    app = FastAPI(title="afina", version=__version__, lifespan=lifespan)
    app.state.afina = AppState(
        served,
        settings,
        settings.api_key or os.environ.get("AFINA_API_KEY") or None,
        log,
        metrics,
        scheduler,
        min(settings.max_prompt_tokens or served.max_context, served.max_context),
    )
    app.state.monitor = monitor
    app.add_middleware(CountRequests, metrics=metrics)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_exception_handler(ApiError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"])
    app.add_api_route("/", chat_page, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/feedback", feedback, methods=["POST"])
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: ServeConfig) -> None:
    """Serving beyond this machine without an API key needs --insecure: anyone who can reach it could use it."""
    if is_loopback(settings.host) or settings.api_key or os.environ.get("AFINA_API_KEY") or settings.insecure:
        return
    raise ServeError(
        f"--host {settings.host} serves other machines, and no API key is set: anyone who can reach it "
        "could use the model. Set --api-key (or "
        "$AFINA_API_KEY), or pass --insecure to serve without a key on purpose"
    )


def serve(target: str, settings: ServeConfig) -> None:
    import uvicorn

    check_exposure(settings)
    if settings.engine == "llama.cpp":
        from afina.serve.llamacpp_engine import check_engine_settings, load_gguf_served

        check_engine_settings(settings)
        served = load_gguf_served(target, settings.gguf_type)
    elif settings.gguf_type:
        raise ServeError("--gguf-type picks the GGUF file for --engine llama.cpp; add --engine llama.cpp")
    else:
        served = load_served(target, settings.adapters, settings.watch)
    app = create_app(served, settings, run_root=target)
    if not is_loopback(settings.host) and app.state.afina.api_key is None:
        print(
            f"WARNING: serving on {settings.host} WITHOUT an API key (--insecure): anyone who can reach this port "
            "can use the model"
        )
    engine = f"llama.cpp: {served.gguf}" if served.gguf else "transformers"
    print(
        f"serving {', '.join(served.names)} ({engine}) at http://{settings.host}:{settings.port}/v1 "
        "(OpenAI-compatible); "
        f"chat page at http://{settings.host}:{settings.port}/ ; Ctrl-C to stop"
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
