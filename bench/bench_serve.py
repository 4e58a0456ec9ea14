"""Serving throughput and latency at 1 and 16 concurrent clients: afina's two engines and llama.cpp's own server.

Every row answers the same chat prompts (questions from the bundled quickstart data) greedily with
the same number of new tokens, in one run on one machine, one table:

- `model.generate`: this process loads the model and calls model.generate on each prompt in turn;
- `transformers c=N`: `afina serve --max-batch B` runs as a subprocess, N client threads send the
  prompts over HTTP (non-streaming /v1/chat/completions) until all are answered;
- `llama.cpp c=N`: the same with `afina serve --engine llama.cpp --gguf-type T` (the run's verified GGUF
  export of type T, or `--gguf FILE`);
- `peer c=N`: llama-cpp-python's own OpenAI server (`python -m llama_cpp.server`, its `server` extra) on
  the same GGUF file with the same threads, over HTTP as above. Where that extra is not installed, the
  peer is `Llama.create_chat_completion` called in this process, N threads taking turns on the one
  Llama object (it is not thread-safe; its server serializes requests the same way), without HTTP.

`vs peer` is tokens/s over the peer's at the same number of clients (issue 17: at least 0.8 at 1
client, above 1 at 16). Answers that differ from the same system's 1-client answers are counted (a
batch may flip a near-tie). Run under the shared lock, on a quiet machine:

    flock /tmp/afina-bench.lock python bench/bench_serve.py --target runs/quickstart --gguf-type q8_0
    python bench/bench_serve.py --target runs/quickstart --prompts 2 --max-new-tokens 8   # a smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import httpx


def quickstart_prompts(n: int) -> list[list[dict[str, str]]]:
    path = resources.files("afina") / "recipes" / "data" / "quickstart_support.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["messages"][:-1] for row in rows[:: max(1, len(rows) // n)][:n]]


def run_generate(target: str, prompts, max_new: int) -> dict:
    import torch

    from afina.data.format import render_prompt
    from afina.serve.models import load_served

    served = load_served(target)
    tok = served.tokenizer
    latencies, tokens, texts = [], 0, []
    with served.use(served.default) as model:
        warm = tok(render_prompt(tok, prompts[0]), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad(), served.autocast():  # warm-up, as the server gets one
            model.generate(
                input_ids=warm,
                attention_mask=torch.ones_like(warm),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        start = time.perf_counter()
        for messages in prompts:
            ids = tok(render_prompt(tok, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
            t0 = time.perf_counter()
            with torch.no_grad(), served.autocast():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                )
            latencies.append(time.perf_counter() - t0)
            tokens += out.shape[1] - ids.shape[1]
            texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return {"wall_s": time.perf_counter() - start, "tokens": tokens, "latencies": latencies, "texts": texts}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(target: str, max_new: int, max_batch: int, extra: list[str] | None = None):
    """`afina serve TARGET` (with `extra` flags) as a subprocess; (process, base URL) once it answers /health."""
    port = free_port()
    command = [sys.executable, "-m", "afina", "serve", target, "--port", str(port), "--max-tokens", str(max_new)]
    command += ["--max-batch", str(max_batch), *(extra or [])]
    return wait_until_up(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), port, "/health")


def start_peer_server(gguf: Path, threads: int, context: int):
    """llama-cpp-python's own server (`python -m llama_cpp.server`) on the file; (process, base URL)."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_threads", str(threads), "--n_ctx", str(context), "--verbose", "false"]
    return wait_until_up(
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), port, "/v1/models"
    )


def wait_until_up(proc: subprocess.Popen, port: int, probe: str):
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2:4]} exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}{probe}", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"{proc.args[2:4]} did not start in 5 minutes")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def run_clients(base: str, prompts, max_new: int, clients: int) -> dict:
    def ask(messages):
        t0 = time.perf_counter()
        body = {"messages": messages, "max_tokens": max_new, "temperature": 0}
        response = http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        body = response.json()
        return time.perf_counter() - t0, body["usage"]["completion_tokens"], body["choices"][0]["message"]["content"]

    with httpx.Client(base_url=base, timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(ask, prompts))
        wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "tokens": sum(r[1] for r in results),
        "latencies": [r[0] for r in results],
        "texts": [r[2] for r in results],
    }


def run_peer_in_process(gguf: Path, threads: int, context: int, prompts, max_new: int, levels: list[int]):
    """llama-cpp-python's Llama.create_chat_completion on the file, N threads taking turns; {clients: result}."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, verbose=False)
    lock = threading.Lock()

    def ask(messages):
        t0 = time.perf_counter()
        with lock:  # one Llama object is not thread-safe: llama_cpp.server serializes requests on it too
            out = llm.create_chat_completion(messages=messages, max_tokens=max_new, temperature=0.0)
        return time.perf_counter() - t0, out["usage"]["completion_tokens"], out["choices"][0]["message"]["content"]

    ask(prompts[0])  # warm-up
    results = {}
    for clients in levels:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(ask, prompts))
        results[clients] = {
            "wall_s": time.perf_counter() - start,
            "tokens": sum(a[1] for a in answers),
            "latencies": [a[0] for a in answers],
            "texts": [a[2] for a in answers],
        }
    llm.close()
    return results


def row(label: str, result: dict, reference_tps: float | None) -> str:
    tps = result["tokens"] / result["wall_s"]
    lat = sorted(result["latencies"])
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    ratio = f"{tps / reference_tps:7.2f}" if reference_tps else "      -"
    return (
        f"| {label:<22} | {tps:8.1f} | {ratio} | {statistics.mean(lat):7.2f} | "
        f"{statistics.median(lat):7.2f} | {p95:7.2f} | {result['tokens']:6d} |"
    )


def gguf_file(args) -> Path | None:
    """The GGUF file the llama.cpp rows serve: --gguf, else the target run's verified export of --gguf-type."""
    if args.gguf:
        return Path(args.gguf)
    from afina.serve.llamacpp_engine import find_gguf

    return find_gguf(args.target, args.gguf_type)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="runs/quickstart", help="run directory (or model spec) to serve")
    parser.add_argument("--gguf-type", default="q8_0", help="the run's verified GGUF export for the llama.cpp rows")
    parser.add_argument("--gguf", help="a GGUF file for the llama.cpp rows instead of the run's export")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per measurement (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--max-batch", type=int, default=16, help="both afina engines' --max-batch (default 16)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads, afina's and the peer's")
    parser.add_argument("--systems", default="generate,transformers,llama.cpp,peer", help="which rows to measure")
    args = parser.parse_args()
    prompts = quickstart_prompts(args.prompts)
    levels = [int(c) for c in args.clients.split(",")]
    systems = args.systems.split(",")
    gguf = gguf_file(args) if {"llama.cpp", "peer"} & set(systems) else None
    context = 2048
    # llama_cpp.server needs llama-cpp-python's `server` extra (sse-starlette, starlette-context, pydantic-settings).
    server_extra = ("llama_cpp", "sse_starlette", "starlette_context", "pydantic_settings")
    peer_server = all(importlib.util.find_spec(name) is not None for name in server_extra)
    peer = (
        "python -m llama_cpp.server"
        if peer_server
        else "Llama.create_chat_completion in this process (llama_cpp.server is not installed: "
        "pip install 'llama-cpp-python[server]')"
    )
    print(
        f"{len(prompts)} prompts, {args.max_new_tokens} new tokens each (greedy), target {args.target}, "
        f"GGUF {gguf}, {os.cpu_count()} CPUs, llama.cpp threads {args.threads}, max_batch {args.max_batch}; "
        f"peer: {peer}; "
        "the machine may be shared with other work",
        flush=True,
    )
    measured: dict[tuple[str, int], dict] = {}

    def measure_server(name: str, start) -> None:
        proc, base = start()
        try:
            run_clients(base, prompts[:2], args.max_new_tokens, 1)  # warm-up
            for c in levels:
                measured[(name, c)] = run_clients(base, prompts, args.max_new_tokens, c)
        finally:
            stop(proc)

    # The peer first: the other rows are printed against it as they are measured.
    if "peer" in systems:
        assert gguf is not None
        if peer_server:
            measure_server("peer", lambda: start_peer_server(gguf, args.threads, context))
        else:
            for c, result in run_peer_in_process(
                gguf, args.threads, context, prompts, args.max_new_tokens, levels
            ).items():
                measured[("peer", c)] = result
    print("\n| system                 | tokens/s | vs peer | mean s  | p50 s   | p95 s   | tokens |")
    print("|------------------------|----------|---------|---------|---------|---------|--------|")

    def show(name: str, c: int) -> None:
        peer = measured.get(("peer", c))
        peer_tps = peer["tokens"] / peer["wall_s"] if peer else None
        print(row(f"{name} c={c}", measured[(name, c)], peer_tps), flush=True)

    if "generate" in systems:
        measured[("model.generate", 1)] = run_generate(args.target, prompts, args.max_new_tokens)
        show("model.generate", 1)
    if "transformers" in systems:
        measure_server("transformers", lambda: start_server(args.target, args.max_new_tokens, args.max_batch))
        for c in levels:
            show("transformers", c)
    if "llama.cpp" in systems:
        extra = ["--engine", "llama.cpp", "--threads", str(args.threads)]
        target = str(gguf) if args.gguf else args.target
        if not args.gguf:
            extra += ["--gguf-type", args.gguf_type]
        measure_server("llama.cpp", lambda: start_server(target, args.max_new_tokens, args.max_batch, extra))
        for c in levels:
            show("llama.cpp", c)
    if "peer" in systems:
        for c in levels:
            show("peer", c)

    def differing(name: str, c: int, reference: tuple[str, int]) -> int:
        ours, theirs = measured[(name, c)]["texts"], measured[reference]["texts"]
        return sum(x.strip() != y.strip() for x, y in zip(ours, theirs, strict=True))

    mismatches = {f"{name} c={c}": differing(name, c, (name, levels[0])) for name, c in measured if c != levels[0]}
    if ("llama.cpp", levels[0]) in measured and ("peer", levels[0]) in measured:
        mismatches[f"llama.cpp c={levels[0]} vs peer"] = differing("llama.cpp", levels[0], ("peer", levels[0]))
    print(
        "\nc: concurrent clients. vs peer: tokens/s over the peer's at the same c. latency: per request, from send "
        "to full answer (model.generate: per call)."
    )
    print(f"answers differing from the same system's c={levels[0]} answers (of {len(prompts)}): {mismatches}")


if __name__ == "__main__":
    main()
