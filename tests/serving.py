"""Helpers for the server tests: tiny LoRA adapters made with peft, and a real uvicorn server in a thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def make_adapter(base_dir: Path, target: Path, seed: int) -> Path:
    """A LoRA adapter with random (not zero) B matrices, so it changes the model's answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(target)
    return target


@contextmanager
def running_server(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def grammar_accepts(tokenizer, grammar: str, text: str) -> bool:
    """Whether `text` is (a prefix of) an answer the grammar allows, checked by the engine itself."""
    from llguidance import LLMatcher

    from afina.serve.grammar import engine_tokenizer

    matcher = LLMatcher(engine_tokenizer(tokenizer), grammar, log_level=0)
    return matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]) and not matcher.is_error()
