"""Serving throughput and latency at 1, 4 and 16 concurrent clients, next to plain model.generate.

Both sides answer the same chat prompts (questions from the bundled quickstart data) greedily with
the same number of new tokens, in one run on one machine:

- `generate`: this process loads the model and calls model.generate on each prompt in turn;
- `serve c=N b=B`: `afina serve --max-batch B` runs as a subprocess, N client threads send the
  prompts over HTTP (non-streaming /v1/chat/completions) until all are answered.

Both answer greedily in the same precision, so they do the same work; the script counts answers that
differ from model.generate's (a padded batch in bf16 may flip a near-tie). Run under the shared lock:

    flock /tmp/afina-bench.lock python bench/bench_serve.py [--target runs/quickstart] [--prompts 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

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


def start_server(target: str, max_new: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "afina",
            "serve",
            target,
            "--port",
            str(port),
            "--max-tokens",
            str(max_new),
            "--max-batch",
            str(max_batch),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"afina serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("afina serve did not start in 5 minutes")


def run_clients(base: str, prompts, max_new: int, clients: int) -> dict:
    def ask(messages):
        t0 = time.perf_counter()
        response = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": max_new})
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


def row(label: str, result: dict, baseline_tps: float) -> str:
    tps = result["tokens"] / result["wall_s"]
    lat = sorted(result["latencies"])
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    return (
        f"| {label:<16} | {tps:8.1f} | {tps / baseline_tps:5.2f} | {statistics.mean(lat):7.2f} | "
        f"{statistics.median(lat):7.2f} | {p95:7.2f} | {result['tokens']:6d} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m-instruct", help="run directory or model spec to serve")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per measurement (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,4,16")
    args = parser.parse_args()
    prompts = quickstart_prompts(args.prompts)
    levels = [int(c) for c in args.clients.split(",")]
    print(
        f"{len(prompts)} prompts, {args.max_new_tokens} new tokens each (greedy), target {args.target}, "
        f"{os.cpu_count()} CPUs; the machine may be shared with other work",
        flush=True,
    )

    baseline = run_generate(args.target, prompts, args.max_new_tokens)
    baseline_tps = baseline["tokens"] / baseline["wall_s"]
    # Rows are printed as they are measured, so a run cut short still reports what it has.
    print("\n| system           | tokens/s | ratio | mean s  | p50 s   | p95 s   | tokens |")
    print("|------------------|----------|-------|---------|---------|---------|--------|")
    print(row("model.generate", baseline, baseline_tps), flush=True)
    served = {}
    # The default server (batching up to 8) at every level; then one request at a time at the highest.
    for max_batch, clients in [(8, levels), (1, levels[-1:])]:
        proc, base = start_server(args.target, args.max_new_tokens, max_batch)
        try:
            run_clients(base, prompts[:2], args.max_new_tokens, 1)  # warm-up
            for c in clients:
                served[(c, max_batch)] = run_clients(base, prompts, args.max_new_tokens, c)
                print(row(f"serve c={c} b={max_batch}", served[(c, max_batch)], baseline_tps), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    baseline_again = run_generate(args.target, prompts, args.max_new_tokens)  # the load may drift: measure again
    print(row("model.generate ²", baseline_again, baseline_tps))

    mismatches = {
        f"c={c} b={b}": sum(x.strip() != y.strip() for x, y in zip(r["texts"], baseline["texts"]))
        for (c, b), r in served.items()
    }
    print(
        "\nc: concurrent clients; b: the server's max_batch (8: the default, batching; 1: one request at a time). "
        "ratio: tokens/s over the first model.generate pass; latency: per request, from send to full answer "
        "(model.generate: per call). ² measured again after the servers ran, to show load drift."
    )
    print(f"answers differing from model.generate's (of {len(prompts)}): {mismatches}")


if __name__ == "__main__":
    main()
