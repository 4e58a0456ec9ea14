"""Run a GGUF file in llama.cpp (llama-cpp-python) on the reference prompts: the runtime users deploy to.

candidate = llama_cpp_candidate(path, reference)   # tokenization, teacher-forced logits, greedy text
speed = llama_cpp_speed(path, prompt_ids)            # prompt and decode tokens per second
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from afina.export.gguf_file import ExportError
from afina.export.verify import Candidate, Reference


def _load(path: Path, n_ctx: int, lora_path: Path | None = None):
    import llama_cpp

    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=True,
            verbose=False,
            n_threads=os.cpu_count() or 1,
            n_batch=min(n_ctx, 512),
            lora_path=str(lora_path) if lora_path else None,
        )
    except ValueError as exc:  # llama.cpp refused the file (its reason is in its log: llama_cpp.Llama(verbose=True))
        raise ExportError(
            f"llama.cpp could not load {path.name}{' with its adapter' if lora_path else ''}: {exc}"
        ) from None


def _context_for(reference: Reference) -> int:
    longest = max(len(s) for s in reference.sequences) + 8
    return ((longest + 63) // 64) * 64


def llama_cpp_candidate(path: Path, reference: Reference, tokenizer, lora_path: Path | None = None) -> Candidate:
    """Tokenize each prompt with the file's own tokenizer, teacher-force the reference sequence for the logits,
    and decode greedily as many tokens as the reference produced (with a GGUF LoRA adapter over it when given)."""
    llm = _load(path, _context_for(reference), lora_path)
    ids_all, logits, texts = [], [], []
    for index, prompt in enumerate(reference.prompts):
        ids_all.append(llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))
        sequence, start = reference.positions(index)
        llm.reset()
        llm.eval(sequence)
        end = max(len(sequence) - 1, start + 1)
        logits.append(torch.from_numpy(np.array(llm.scores[start:end], dtype=np.float32)))
        new = len(sequence) - len(reference.input_ids[index])
        llm.reset()
        llm.eval(reference.input_ids[index])
        generated = []
        for _ in range(new):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            llm.eval([token])
        texts.append(tokenizer.decode(generated, skip_special_tokens=True))
    llm.close()
    return Candidate(ids_all, logits, texts)


def llama_cpp_speed(path: Path, prompt_ids: list[int], new_tokens: int = 64) -> dict[str, Any]:
    """Prompt processing and greedy decode speed of the file in llama.cpp (tokens/s), on this machine's threads."""
    llm = _load(path, ((len(prompt_ids) + new_tokens + 63) // 64) * 64)
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_ids)
    prompt_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode_s = time.perf_counter() - start
    llm.close()
    return {
        "prompt_tokens_per_s": round(len(prompt_ids) / prompt_s, 1),
        "decode_tokens_per_s": round(new_tokens / decode_s, 1),
        "threads": os.cpu_count(),
    }
