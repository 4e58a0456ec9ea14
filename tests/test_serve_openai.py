"""OpenAI options through the official openai client: each is honoured, or refused with a 400 naming it."""

import json

import httpx
import openai
import pytest

from afina.config import ServeConfig
from afina.serve.app import create_app
from afina.serve.grammar import ANY_OBJECT, json_grammar
from afina.serve.models import load_served
from serving import grammar_accepts, running_server

KEY = "openai-options-key"
MESSAGES = [{"role": "user", "content": "How do I descale the kettle?"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    return load_served(str(tiny_model_dir))


@pytest.fixture(scope="module")
def base(served):
    with running_server(create_app(served, ServeConfig(api_key=KEY, max_tokens=128, max_batch=4))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base, served):
    c = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    c.model_name = served.default
    return c


def greedy(client, n_tokens=24, **kw):
    return client.chat.completions.create(
        model=client.model_name, messages=kw.pop("messages", MESSAGES), max_tokens=n_tokens, **kw
    )


def test_stop_cuts_the_answer_before_the_stop_string_streamed_or_not(client):
    whole = greedy(client).choices[0].message.content
    assert len(whole) > 12
    stop = whole[6:9]
    cut = whole[: whole.find(stop)]
    reply = greedy(client, stop=[stop, "never-seen-zzz"])
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 24
    streamed = list(greedy(client, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"
    completion = client.completions.create(model=client.model_name, prompt="The kettle", max_tokens=24, stop=stop)
    assert stop not in completion.choices[0].text


def test_n_choices_and_seed_make_sampling_repeatable(client):
    first = greedy(client, 10, n=3, temperature=1.0, seed=7)
    again = greedy(client, 10, n=3, temperature=1.0, seed=7)
    other = greedy(client, 10, n=3, temperature=1.0, seed=8)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert texts != [c.message.content for c in other.choices]
    assert len(set(texts)) > 1  # each choice is sampled on its own
    assert 3 <= first.usage.completion_tokens <= 3 * 10  # every choice's tokens are counted
    streamed = list(greedy(client, 10, n=2, temperature=1.0, seed=7, stream=True))
    by_choice = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            by_choice[choice.index] += choice.delta.content or ""
    assert [by_choice[0], by_choice[1]] == texts[:2]


def test_logprobs_and_top_logprobs(client):
    reply = greedy(client, n_tokens=8, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.token == entry.top_logprobs[0].token  # greedy: the chosen token is the most likely
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    text = client.completions.create(model=client.model_name, prompt="The kettle", max_tokens=5, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == text.usage.completion_tokens
    assert "".join(lp.tokens) == text.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
    assert greedy(client, n_tokens=4).choices[0].logprobs is None


def test_stream_usage_and_the_role_in_the_first_delta(client):
    chunks = list(greedy(client, n_tokens=6, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert chunks[-1].usage.prompt_tokens == greedy(client, n_tokens=6).usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_content_parts_and_the_developer_role(client):
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "How do I "}, {"type": "text", "text": "descale the kettle?"}],
        }
    ]
    assert greedy(client, messages=parts).choices[0].message.content == greedy(client).choices[0].message.content
    as_system = greedy(client, messages=[{"role": "system", "content": "Be brief."}, *MESSAGES])
    as_developer = greedy(client, messages=[{"role": "developer", "content": "Be brief."}, *MESSAGES])
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="image_url"):
        greedy(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_json_schema_output_is_valid_json_of_the_schema(client, served):
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green"]},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        },
        "required": ["ok", "color", "tags"],
        "additionalProperties": False,
    }
    for seed in (1, 2):
        reply = greedy(
            client,
            n_tokens=100,
            temperature=1.0,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        )
        value = json.loads(reply.choices[0].message.content)
        assert set(value) == {"ok", "color", "tags"} and isinstance(value["ok"], bool)
        assert value["color"] in ("red", "green") and set(value["tags"]) <= {"a", "b"} and len(value["tags"]) <= 2
    free = greedy(client, n_tokens=60, response_format={"type": "json_object"})
    text = free.choices[0].message.content
    assert text.startswith("{") and grammar_accepts(served.tokenizer, json_grammar(ANY_OBJECT), text)
    if free.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    with pytest.raises(openai.BadRequestError, match="Unknown format: bogus"):
        greedy(
            client,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "format": "bogus"}},
            },
        )


@pytest.mark.parametrize(
    "option, value",
    [
        ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
        ("logit_bias", {"50256": -100}),
        ("presence_penalty", 0.5),
        ("audio", {"voice": "alloy", "format": "wav"}),
    ],
)
def test_unsupported_chat_options_are_refused_by_name(client, option, value):
    with pytest.raises(openai.BadRequestError, match=option) as caught:
        greedy(client, n_tokens=2, **{option: value})
    assert caught.value.status_code == 400 and caught.value.body["param"] == option


@pytest.mark.parametrize("option, value", [("echo", True), ("suffix", " and so on"), ("best_of", 3)])
def test_unsupported_completion_options_are_refused_by_name(client, option, value):
    with pytest.raises(openai.BadRequestError, match=option):
        client.completions.create(model=client.model_name, prompt="The kettle", max_tokens=2, **{option: value})


def test_harmless_options_are_accepted(client):
    reply = greedy(client, n_tokens=2, user="u-1", presence_penalty=0, frequency_penalty=0.0, tool_choice="none")
    assert reply.choices[0].message.content is not None


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"messages": "hi"}',
        b'{"messages": [{"role": "user", "content": 5}]}',
        b'{"messages": [{"role": "tool", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}',
        b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}',
        b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, "logprobs": true}',
        b"[1, 2]",
    ],
)
def test_malformed_requests_are_400_not_422(base, body):
    response = httpx.post(
        f"{base}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
