"""`afina serve`: /v1/chat/completions, /v1/completions and /v1/models over FastAPI.

Requests are served one generation at a time (a lock around the model); others wait their turn.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from afina.data.format import render_prompt
from afina.device import autocast_factory, pick_device, resolve_precision


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any
    autocast: Any
    max_context: int


def load_target(target: str) -> LoadedModel:
    """A run directory (its trained adapter or model) or any model spec."""
    from afina.config import build_recipe
    from afina.models import load_model, load_tokenizer
    from afina.rundir import RunDir

    device = pick_device()
    autocast = autocast_factory(resolve_precision("auto", device), device)
    run = RunDir(target)
    if run.manifest_path.is_file():
        from afina.eval.evaluate import load_tuned

        recipe = build_recipe(run.read_manifest()["recipe"], str(run.manifest_path), Path(target))
        recipe.output_dir, recipe.name = str(run.root.parent), run.root.name
        model, tokenizer, name = load_tuned(recipe, run, device), load_tokenizer(recipe.model.name), run.root.name
    else:
        model, tokenizer, name = load_model(target, "float32").to(device), load_tokenizer(target), Path(target).name
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    return LoadedModel(name, model.eval(), tokenizer, autocast, context)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False


def create_app(loaded: LoadedModel, max_tokens_limit: int = 1024):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers import TextIteratorStreamer

    app = FastAPI(title="afina", version="0.1.0")
    lock = threading.Lock()
    tok = loaded.tokenizer

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException):
        return JSONResponse({"error": {"message": exc.detail, "type": "invalid_request_error"}}, status_code=exc.status_code)

    def check(request) -> tuple[int, bool]:
        if request.model not in (None, loaded.name):
            raise HTTPException(404, f"model '{request.model}' is not served here; available: {loaded.name}")
        max_new = request.max_tokens or 256
        if max_new > max_tokens_limit:
            raise HTTPException(400, f"max_tokens={max_new} is over this server's limit of {max_tokens_limit}")
        return max_new, request.temperature > 0

    def encode(prompt: str, max_new: int) -> torch.Tensor:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] + max_new > loaded.max_context:
            raise HTTPException(400, f"prompt of {ids.shape[1]} tokens plus max_tokens={max_new} exceeds the context of {loaded.max_context}")
        return ids.to(loaded.model.device)

    def gen_kwargs(ids, max_new, sample, request) -> dict[str, Any]:
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                      do_sample=sample, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        if sample:
            kwargs.update(temperature=request.temperature, top_p=request.top_p)
        return kwargs

    def generate(ids, max_new, sample, request) -> tuple[str, int, str]:
        with lock, torch.no_grad(), loaded.autocast():
            out = loaded.model.generate(**gen_kwargs(ids, max_new, sample, request))
        new = out[0, ids.shape[1]:]
        finish = "stop" if len(new) and int(new[-1]) == tok.eos_token_id else "length"
        return tok.decode(new, skip_special_tokens=True), len(new), finish

    def stream(ids, max_new, sample, request, wrap):
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)

        def work():
            with lock, torch.no_grad(), loaded.autocast():
                loaded.model.generate(**gen_kwargs(ids, max_new, sample, request), streamer=streamer)

        threading.Thread(target=work, daemon=True).start()

        def events():
            for piece in streamer:
                if piece:
                    yield f"data: {json.dumps(wrap(piece, None))}\n\n"
            yield f"data: {json.dumps(wrap('', 'stop'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    def health():
        return {"status": "ok", "model": loaded.name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": loaded.name, "object": "model", "owned_by": "afina", "created": 0}]}

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest):
        max_new, sample = check(request)
        messages = [m.model_dump() for m in request.messages]
        ids = encode(render_prompt(tok, messages), max_new)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            def wrap(piece, finish):
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": loaded.name,
                        "choices": [{"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}]}
            return stream(ids, max_new, sample, request, wrap)
        text, n, finish = generate(ids, max_new, sample, request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": loaded.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": n, "total_tokens": ids.shape[1] + n}}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        max_new, sample = check(request)
        ids = encode(request.prompt, max_new)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            def wrap(piece, finish):
                return {"id": rid, "object": "text_completion", "created": created, "model": loaded.name,
                        "choices": [{"index": 0, "text": piece, "finish_reason": finish}]}
            return stream(ids, max_new, sample, request, wrap)
        text, n, finish = generate(ids, max_new, sample, request)
        return {"id": rid, "object": "text_completion", "created": created, "model": loaded.name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": n, "total_tokens": ids.shape[1] + n}}

    return app


def serve(target: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    loaded = load_target(target)
    print(f"serving '{loaded.name}' at http://{host}:{port}/v1 (OpenAI-compatible); Ctrl-C to stop")
    uvicorn.run(create_app(loaded), host=host, port=port, log_level="info")
