"""Shared fixtures: the default model's tokenizer and a tiny random Llama built in code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from afina.config import load_recipe

SYSTEM = "You are the support assistant for Tiny Test Co. Answer briefly."


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker gets its share of the cores.

    Without this every worker's torch (and every `afina` subprocess a test starts) would use all cores,
    and OpenMP threads of two workers spinning on the same cores slow both down.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


# The longest test files (minutes each on 2 cores), run first: with two workers the long ones then overlap the rest
# instead of one of them running alone at the end (pytest-xdist hands out files in collection order when run with
# --no-loadscope-reorder, as `make test` does; by default it reorders them by their number of tests).
LONG_FIRST = (
    "integration/",
    "test_export_gguf.py",
    "test_cli.py",
    "test_architectures.py",
    "test_studio.py",
    "test_studio_browser.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, name in enumerate(LONG_FIRST) if name in path), len(LONG_FIRST))

    items.sort(key=rank)  # stable: the order within a file and among the rest is kept


def _llama_cpp_missing() -> str | None:
    from afina.export.gguf_convert import llama_cpp_missing

    return llama_cpp_missing()


# GGUF conversion, quantization and checks run llama.cpp's own tools, which `make test` does not build.
LLAMA_CPP_MISSING = _llama_cpp_missing()
needs_llama_cpp = pytest.mark.skipif(
    LLAMA_CPP_MISSING is not None,
    reason=f"llama.cpp not installed (`afina setup llama-cpp` or `make llama-cpp`): {LLAMA_CPP_MISSING}",
)


@pytest.fixture(scope="session")
def tokenizer():
    from afina.models import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and the default model's tokenizer, as a local HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def support_rows(n_facts: int = 6, per_fact: int = 4) -> list[dict]:
    """Small synthetic support chats: each fact asked several ways, always the same answer."""
    rows = []
    for f in range(n_facts):
        answer = f"Code {f} means the filter needs {f + 3} minutes of rinsing."
        for q in range(per_fact):
            rows.append(
                {
                    "id": f"f{f}-q{q}",
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"Question variant {q}: what does code {f} mean?"},
                        {"role": "assistant", "content": answer},
                    ],
                    "must_include": [f"{f + 3} minutes"],
                }
            )
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir):
    """A recipe factory on the tiny model and synthetic support data in a temporary run folder."""

    def make(*overrides: str, rows: list | None = None):
        data = write_jsonl(tmp_path / "support.jsonl", rows if rows is not None else support_rows())
        return load_recipe(
            None,
            [
                "name=tiny",
                f"output_dir={tmp_path / 'runs'}",
                f"model.name={tiny_model_dir}",
                f"data.path={data}",
                "training.batch_size=4",
                "training.max_steps=4",
                "training.learning_rate=0.01",
                "training.precision=fp32",
                "eval.max_new_tokens=8",
                "eval.forgetting.max_questions=10",  # the probe's scoring is tested; 40 questions only add time
                *overrides,
            ],
        )

    return make
