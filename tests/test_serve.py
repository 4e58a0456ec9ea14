"""The server through real HTTP clients: the official openai package and httpx."""

import socket
import threading
import time

import httpx
import pytest


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    import uvicorn

    from afina.serve.app import create_app, load_target

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(load_target(str(tiny_model_dir)), max_tokens_limit=64)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield base, tiny_model_dir.name
    srv.should_exit = True
    thread.join(timeout=10)


def client(base):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_models_and_chat(server):
    base, name = server
    c = client(base)
    assert [m.id for m in c.models.list().data] == [name]
    reply = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=5)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 5
    assert isinstance(reply.choices[0].message.content, str)


def test_streaming_matches_non_streaming(server):
    base, name = server
    c = client(base)
    messages = [{"role": "user", "content": "Tell me about kettles"}]
    whole = c.chat.completions.create(model=name, messages=messages, max_tokens=6).choices[0].message.content
    pieces = c.chat.completions.create(model=name, messages=messages, max_tokens=6, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in pieces).strip() == whole.strip()


def test_completion(server):
    base, name = server
    reply = client(base).completions.create(model=name, prompt="The kettle", max_tokens=4)
    assert reply.usage.completion_tokens <= 4


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 422),
        (b'{"messages": "hi"}', 422),
        (b'{"model": "other", "messages": [{"role": "user", "content": "hi"}]}', 404),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400),
    ],
)
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(server, body, status):
    base, _ = server
    response = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert isinstance(response.json(), dict)
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
