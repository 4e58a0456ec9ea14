"""The server under abuse: an abandoned stream, then a flood; before/after numbers for issue 14.

1. Abandoned stream: a client reads 3 events of a `--stream-tokens` (default 300) token stream and
   closes the connection; a 4-token request sent right after is timed, next to the same request on
   an idle server. A server that generates on for nobody makes the second client wait for it.
2. Flood: 60 concurrent requests (`--flood-tokens` new tokens each) against `--max-queue 45`; the
   time to the first 429, how many got 429, and the time /health and a wrong-key /v1/models take
   while the flood is in flight.

`afina serve` runs as a subprocess from the source tree given by --src (default: this checkout), so
the same script measures an older checkout too:

    flock /tmp/afina-bench.lock python bench/bench_server_abuse.py [--target smollm2-135m-instruct] [--src DIR]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

KEY = "bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def start_server(target: str, src: str, *flags: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": src}
    proc = subprocess.Popen(
        [sys.executable, "-m", "afina", "serve", target, "--port", str(port), "--api-key", KEY, *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
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


def stop(proc: subprocess.Popen) -> float:
    """Send SIGTERM; seconds until the server exited (killed after 60 s)."""
    start = time.perf_counter()
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return time.perf_counter() - start


def short_request(http: httpx.Client) -> float:
    t0 = time.perf_counter()
    response = http.post(
        "/v1/chat/completions",
        headers=AUTH,
        timeout=600,
        json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4},
    )
    response.raise_for_status()
    return time.perf_counter() - t0


def abandoned_stream(target: str, src: str, stream_tokens: int) -> dict:
    proc, base = start_server(target, src, "--max-tokens", str(max(stream_tokens, 16)))
    try:
        with httpx.Client(base_url=base, timeout=600) as http:
            short_request(http)  # warm-up
            idle = short_request(http)
            body = {
                "messages": [{"role": "user", "content": "Write a long story about a kettle."}],
                "max_tokens": stream_tokens,
                "stream": True,
            }
            with http.stream("POST", "/v1/chat/completions", headers=AUTH, json=body) as response:
                events = 0
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events += 1
                        if events == 3:
                            break
            after = short_request(http)
    finally:
        shutdown = stop(proc)
    return {"idle_4_token_s": idle, "after_abandoned_4_token_s": after, "sigterm_exit_s": shutdown}


def flood(target: str, src: str, requests: int, max_queue: int, tokens: int) -> dict:
    proc, base = start_server(target, src, "--max-queue", str(max_queue), "--max-tokens", str(tokens))
    try:
        with httpx.Client(base_url=base, timeout=600) as warm:
            short_request(warm)
        start = time.perf_counter()
        first_429 = [None]
        lock = threading.Lock()

        def ask(i: int) -> int:
            status = httpx.post(
                f"{base}/v1/completions",
                headers=AUTH,
                timeout=600,
                json={"prompt": f"Question {i}: how do I descale a kettle?", "max_tokens": tokens},
            ).status_code
            if status == 429:
                with lock:
                    first_429[0] = first_429[0] or time.perf_counter() - start
            return status

        with ThreadPoolExecutor(requests) as pool:
            futures = [pool.submit(ask, i) for i in range(requests)]
            time.sleep(1.0)  # the flood is in flight
            t0 = time.perf_counter()
            health = httpx.get(f"{base}/health", timeout=600)
            health_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            wrong_key = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=600)
            wrong_key_s = time.perf_counter() - t0
            statuses = [f.result() for f in futures]
        wall = time.perf_counter() - start
    finally:
        stop(proc)
    return {
        "first_429_s": first_429[0],
        "count_429": statuses.count(429),
        "count_200": statuses.count(200),
        "other": len(statuses) - statuses.count(429) - statuses.count(200),
        "health_s": health_s,
        "health_queued": health.json().get("queued"),
        "wrong_key_status": wrong_key.status_code,
        "wrong_key_s": wrong_key_s,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2-135m-instruct", help="run directory or model spec to serve")
    parser.add_argument(
        "--src",
        default=str(Path(__file__).resolve().parents[1] / "src"),
        help="the afina source tree to serve from (default: this checkout)",
    )
    parser.add_argument("--stream-tokens", type=int, default=300)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--max-queue", type=int, default=45)
    parser.add_argument("--flood-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"target {args.target}, source {args.src}, {os.cpu_count()} CPUs; load: {os.getloadavg()}", flush=True)
    a = abandoned_stream(args.target, args.src, args.stream_tokens)
    print(
        f"abandoned stream ({args.stream_tokens} tokens asked, 3 events read): 4-token request idle "
        f"{a['idle_4_token_s']:.2f} s, right after the abandoned stream {a['after_abandoned_4_token_s']:.2f} s; "
        f"SIGTERM to exit {a['sigterm_exit_s']:.1f} s",
        flush=True,
    )
    f = flood(args.target, args.src, args.requests, args.max_queue, args.flood_tokens)
    first = f"{f['first_429_s']:.2f} s" if f["first_429_s"] is not None else "never"
    print(
        f"flood ({args.requests} concurrent, max_queue {args.max_queue}, {args.flood_tokens} tokens): "
        f"{f['count_200']} x 200, {f['count_429']} x 429 (first after {first}), {f['other']} other; "
        f"/health during the flood {f['health_s']:.2f} s (queued {f['health_queued']}), wrong key -> "
        f"{f['wrong_key_status']} in {f['wrong_key_s']:.2f} s; all done in {f['wall_s']:.1f} s",
        flush=True,
    )
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
