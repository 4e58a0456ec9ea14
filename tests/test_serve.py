"""The server through real HTTP clients: the official openai package and httpx."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from afina.cli import main
from afina.config import ServeConfig
from afina.serve.app import create_app
from afina.serve.models import load_served
from serving import make_adapter, running_server

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "kettle": make_adapter(tiny_model_dir, root / "kettle", 1),
        "toaster": make_adapter(tiny_model_dir, root / "toaster", 2),
    }


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapters):
    return load_served(str(tiny_model_dir), {name: str(path) for name, path in adapters.items()})


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    settings = ServeConfig(
        api_key=KEY, max_tokens=64, max_prompt_tokens=200, max_body_bytes=8192, log_dir=str(log_dir), redact_pii=True
    )
    with running_server(create_app(served, settings)) as base:
        yield base, log_dir


def client(base, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


def direct_greedy(tiny_model_dir, adapter_dir, tokenizer, messages, n):
    """What plain transformers (+ peft) answers, for comparison with the server."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_each_adapter_is_served_by_name_and_answers_like_peft(server, tiny_model_dir, adapters, tokenizer):
    base, _ = server
    c = client(base)
    names = [m.id for m in c.models.list().data]
    assert names[0] == "kettle" and set(names) == {"kettle", "toaster", tiny_model_dir.name}
    messages = [{"role": "user", "content": "How do I descale it?"}]
    answers = {}
    for name, adapter_dir in [
        ("kettle", adapters["kettle"]),
        ("toaster", adapters["toaster"]),
        (tiny_model_dir.name, None),
    ]:
        reply = c.chat.completions.create(model=name, messages=messages, max_tokens=8)
        assert reply.model == name and 0 < reply.usage.completion_tokens <= 8
        answers[name] = reply.choices[0].message.content
        assert answers[name] == direct_greedy(tiny_model_dir, adapter_dir, tokenizer, messages, 8)
    assert len(set(answers.values())) == 3  # three different models really answered


def test_streaming_matches_non_streaming(server):
    base, _ = server
    c = client(base)
    messages = [{"role": "user", "content": "Tell me about kettles"}]
    whole = c.chat.completions.create(model="toaster", messages=messages, max_tokens=6).choices[0].message.content
    chunks = list(c.chat.completions.create(model="toaster", messages=messages, max_tokens=6, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completion_with_and_without_streaming(server):
    base, _ = server
    c = client(base)
    reply = c.completions.create(model="kettle", prompt="The kettle", max_tokens=4)
    assert 0 < reply.usage.completion_tokens <= 4
    streamed = "".join(
        chunk.choices[0].text
        for chunk in c.completions.create(model="kettle", prompt="The kettle", max_tokens=4, stream=True)
    )
    assert streamed == reply.choices[0].text


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "invalid_json"),
        (b'{"messages": "hi"}', 400, "invalid_request"),
        (b'{"messages": [{"role": "user", "content": 5}]}', 400, "invalid_request"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', 400, "invalid_request"),
        (b'{"model": "other", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, "max_tokens_exceeded"),
        (json.dumps({"messages": [{"role": "user", "content": "kettle " * 300}]}).encode(), 400, "prompt_too_long"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 9000}]}).encode(), 413, "body_too_large"),
    ],
)
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(server, body, status, code):
    base, _ = server
    response = httpx.post(
        f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json", **AUTH}
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    ok = httpx.post(
        f"{base}/v1/chat/completions",
        headers=AUTH,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert ok.status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_a_missing_or_wrong_key_gets_401(server, headers):
    base, _ = server
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
        response = httpx.request(method, f"{base}{path}", headers=headers, json={"prompt": "a", "messages": []})
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    import openai

    with pytest.raises(openai.AuthenticationError):
        client(base, key="wrong").models.list()
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_32_concurrent_clients_all_get_answers(server):
    base, _ = server
    names = ["kettle", "toaster", None]

    def one_client(i):
        statuses = []
        with httpx.Client(base_url=base, headers=AUTH, timeout=120) as http:
            for j in range(3):
                body = {
                    "messages": [{"role": "user", "content": f"client {i} question {j}"}],
                    "max_tokens": 4,
                    "stream": (i + j) % 2 == 0,
                }
                if names[(i + j) % 3]:
                    body["model"] = names[(i + j) % 3]
                response = http.post("/v1/chat/completions", json=body)
                text = response.text
                statuses.append(
                    (
                        response.status_code,
                        text.endswith("data: [DONE]\n\n") if body["stream"] else "choices" in response.json(),
                    )
                )
        return statuses

    with ThreadPoolExecutor(32) as pool:
        results = [s for client_results in pool.map(one_client, range(32)) for s in client_results]
    assert len(results) == 96
    assert all(status == 200 and complete for status, complete in results), results
    assert httpx.get(f"{base}/health").json()["queued"] == 0


def test_a_full_queue_answers_429_never_5xx(served):
    with running_server(create_app(served, ServeConfig(max_queue=1, max_tokens=64))) as base:

        def ask(i):
            return httpx.post(f"{base}/v1/completions", json={"prompt": f"number {i}", "max_tokens": 48}, timeout=120)

        with ThreadPoolExecutor(8) as pool:
            statuses = [r.status_code for r in pool.map(ask, range(8))]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses


def test_metrics_count_requests_and_tokens(server):
    base, _ = server
    client(base).completions.create(model="kettle", prompt="Metrics", max_tokens=3)
    text = httpx.get(f"{base}/metrics").text
    assert 'afina_requests_total{path="/v1/completions",status="200"}' in text
    assert 'afina_tokens_total{kind="completion",model="kettle"}' in text
    assert "afina_request_latency_seconds_bucket" in text and "afina_queue_depth" in text


def test_logged_requests_feedback_and_from_logs_make_a_training_file(server, tmp_path):
    base, log_dir = server
    c = client(base)
    good = c.chat.completions.create(
        model="kettle", max_tokens=4, messages=[{"role": "user", "content": "Mail me at ann@example.com please"}]
    )
    bad = c.chat.completions.create(
        model="kettle", max_tokens=4, messages=[{"role": "user", "content": "Return window?"}]
    )
    ignored = c.completions.create(model="kettle", prompt="Unrated", max_tokens=2)
    post = lambda body: httpx.post(f"{base}/v1/feedback", headers=AUTH, json=body)  # noqa: E731
    assert post({"id": good.id, "rating": 1}).status_code == 200
    assert post({"id": bad.id, "rating": -1, "correction": "Returns are accepted within 47 days."}).status_code == 200
    assert post({"id": "chatcmpl-unknown", "rating": 1}).status_code == 404
    assert post({"id": good.id}).status_code == 400
    assert post({"id": good.id, "rating": 7}).status_code == 400

    logged = [json.loads(line) for line in (log_dir / "requests.jsonl").read_text().splitlines()]
    mine = {row["id"]: row for row in logged}
    assert mine[good.id]["messages"][0]["content"] == "Mail me at [EMAIL] please"  # redacted
    assert mine[ignored.id]["prompt"] == "Unrated"

    out = tmp_path / "next_round.jsonl"
    assert main(["data", "from-logs", str(log_dir), "-o", str(out)]) == 0
    rows = {row["source"]["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert rows[bad.id]["messages"][-1] == {"role": "assistant", "content": "Returns are accepted within 47 days."}
    assert rows[good.id]["messages"][-1]["content"] == good.choices[0].message.content
    assert ignored.id not in rows
    from afina.data.schema import guess_schema

    assert all(guess_schema(row, {})[0] == "chat" for row in rows.values())


def test_redaction_masks_contact_details():
    from afina.serve.logs import redact

    text = redact("write to j.doe+x@mail.example.org, call +44 20 7946 0958, card 4111 1111 1111 1111, host 10.0.0.12")
    assert text == "write to [EMAIL], call [PHONE], card [CARD], host [IP]"
    assert redact("order 47 arrived in 3 days") == "order 47 arrived in 3 days"


def test_serve_settings_come_from_the_runs_recipe_then_flags(tmp_path):
    from afina.cli import build_parser, serve_settings
    from afina.config import RecipeError

    run = tmp_path / "runs" / "bot"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(
        json.dumps({"recipe": {"serve": {"port": 9000, "max_tokens": 50, "adapters": {"a": "x"}}}})
    )
    args = build_parser().parse_args(["serve", str(run), "--max-tokens", "20", "--adapter", "b=y", "--redact-pii"])
    settings = serve_settings(args)
    assert (settings.host, settings.port, settings.max_tokens) == ("127.0.0.1", 9000, 20)
    assert settings.adapters == {"a": "x", "b": "y"} and settings.redact_pii
    with pytest.raises(RecipeError, match="NAME=PATH"):
        serve_settings(build_parser().parse_args(["serve", str(run), "--adapter", "nopath"]))
    with pytest.raises(RecipeError, match="max_queue"):
        serve_settings(build_parser().parse_args(["serve", str(run), "--max-queue", "0"]))


def test_a_padded_batch_answers_as_each_request_alone(served, tokenizer):
    import contextlib
    import dataclasses

    import torch

    from afina.serve.batching import Job, Scheduler

    fp32 = dataclasses.replace(served, autocast=contextlib.nullcontext)  # exact comparison: no bf16 rounding
    scheduler = Scheduler(fp32, max_batch=4)
    prompts = ["Hi", "How long is the warranty on the kettle?", "Descale it how", "One more question about tea"]

    def job(text, n):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        return Job(
            "kettle",
            dict(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            True,
        )

    jobs = [job(text, n) for text, n in zip(prompts, [3, 6, 5, 6], strict=True)]
    with fp32.use("kettle") as model, torch.no_grad():
        batched = [g.ids for g in scheduler.run_batch(model, jobs)]
        alone = [scheduler.run_batch(model, [j])[0].ids for j in jobs]
    for b, a, j in zip(batched, alone, jobs, strict=True):
        assert b.tolist() == a.tolist()
        assert b.shape[1] <= j.kwargs["input_ids"].shape[1] + j.kwargs["max_new_tokens"]


def test_data_from_logs_says_what_is_missing(tmp_path, capsys):
    assert main(["data", "from-logs", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "requests.jsonl not found" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()
