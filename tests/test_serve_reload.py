"""`afina serve --watch FILE`: a promoted adapter replaces the served one while clients keep asking."""

import json
import threading
import time

import httpx

from afina.config import ServeConfig
from afina.serve.app import create_app
from afina.serve.models import load_served
from serving import make_adapter, running_server

MESSAGES = [{"role": "user", "content": "How do I descale it?"}]


def ask(base):
    reply = httpx.post(
        f"{base}/v1/chat/completions", json={"model": "support", "messages": MESSAGES, "max_tokens": 6}, timeout=60
    )
    return reply.status_code, reply.json()


def test_the_server_switches_adapters_under_load_without_a_failed_request(tiny_model_dir, tmp_path):
    first = make_adapter(tiny_model_dir, tmp_path / "first", 1)
    second = make_adapter(tiny_model_dir, tmp_path / "second", 2)
    serving = tmp_path / "serving.json"
    served = load_served(str(tiny_model_dir), {"support": str(first)}, watch=str(serving))
    served.watcher.interval = 0.05
    results: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client(base):
        while not stop.is_set():
            sent = time.monotonic()
            status, body = ask(base)
            content = body["choices"][0]["message"]["content"] if status == 200 else json.dumps(body)
            results.append((sent, status, content))

    with running_server(create_app(served, ServeConfig(max_batch=4))) as base:
        before = ask(base)[1]["choices"][0]["message"]["content"]
        clients = [threading.Thread(target=client, args=(base,)) for _ in range(4)]
        for thread in clients:
            thread.start()
        while len(results) < 8:
            time.sleep(0.02)
        # what `afina promote --serving` writes
        serving.write_text(json.dumps({"run": str(tmp_path), "adapter": str(second)}))
        deadline = time.monotonic() + 60
        while served.watcher.reloads == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        switched_at = time.monotonic()
        while len([r for r in results if r[0] > switched_at]) < 8:
            time.sleep(0.02)
        stop.set()
        for thread in clients:
            thread.join()
        after = ask(base)[1]["choices"][0]["message"]["content"]
        models = httpx.get(f"{base}/v1/models").json()["data"]

    assert served.watcher.reloads == 1 and served.watcher.current == str(second) and not served.watcher.errors
    assert all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200]
    assert after != before  # the second adapter answers now, under the same name
    assert {content for sent, _, content in results if sent > switched_at} == {after}  # sent after the switch
    assert {content for sent, _, content in results if sent < switched_at} >= {before}
    assert [m["id"] for m in models][0] == "support"
    assert list(served.model.peft_config) == ["reloaded1"]  # the replaced adapter was unloaded


def test_a_bad_serving_file_keeps_the_current_adapter(tiny_model_dir, tmp_path):
    first = make_adapter(tiny_model_dir, tmp_path / "first", 1)
    serving = tmp_path / "serving.json"
    served = load_served(str(tiny_model_dir), {"support": str(first)}, watch=str(serving))
    served.watcher.stop()
    serving.write_text(json.dumps({"adapter": str(tmp_path / "missing")}))
    assert served.watcher.check() is False
    assert "no adapter_config.json" in served.watcher.errors[0]
    assert served.adapters == {"support": "adapter0"}
