"""OpenAI tool calling through the official openai client against a real server: calls held to each tool's schema,
tool_choice honoured, streamed deltas that reassemble to the same calls, tool results in, parallel calls."""

import copy
import json
import shutil

import jsonschema
import openai
import pytest

from afina.config import ServeConfig
from afina.models.templates import with_chat_template
from afina.serve.app import create_app
from afina.serve.models import load_served
from afina.serve.tools import ToolCallStream
from serving import running_server

KEY = "tools-key"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "days"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}/[A-Z][a-z]{1,8}$"}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris and Oslo?"}]


@pytest.fixture(scope="module")
def tools_model_dir(tiny_model_dir, tokenizer, tmp_path_factory):
    """The tiny model with the chatml-tools template (what model.chat_template: chatml-tools trains and serves)."""
    folder = tmp_path_factory.mktemp("tools") / "model"
    shutil.copytree(tiny_model_dir, folder)
    with_chat_template(copy.deepcopy(tokenizer), "chatml-tools").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def client(tools_model_dir):
    served = load_served(str(tools_model_dir))
    with running_server(create_app(served, ServeConfig(api_key=KEY, max_tokens=160))) as url:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        c.model_name = served.default
        yield c


def ask(client, messages=ASK, **kw):
    kw.setdefault("max_tokens", 160)
    return client.chat.completions.create(model=client.model_name, messages=messages, tools=TOOLS, **kw)


def valid_calls(calls):
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def reassembled(chunks):
    """Tool calls rebuilt from streamed deltas as an OpenAI client does: by index, arguments concatenated."""
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function.name:
                    call["name"] += delta.function.name
                call["arguments"] += delta.function.arguments or ""
    return content, [calls[i] for i in sorted(calls)], finish


def test_required_call_is_valid_and_the_stream_reassembles_to_it(client):
    reply = ask(client, tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = valid_calls(choice.message.tool_calls)
    assert len(calls) == 1 and all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    content, streamed, finish = reassembled(ask(client, tool_choice="required", parallel_tool_calls=False, stream=True))
    assert content == "" and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == calls
    assert all(c["id"] and c["id"].startswith("call_") for c in streamed)


def test_named_tool_choice_calls_that_tool(client):
    for name in ("get_time", "get_weather"):
        chosen = {"type": "function", "function": {"name": name}}
        choice = ask(client, tool_choice=chosen, parallel_tool_calls=False).choices[0]
        assert {n for n, _ in valid_calls(choice.message.tool_calls)} == {name}


def test_tool_choice_none_answers_in_text(client):
    choice = ask(client, tool_choice="none", max_tokens=12).choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert "<tool_call>" not in choice.message.content


def test_auto_is_text_or_valid_calls(client):
    for seed in range(4):
        choice = ask(client, temperature=1.0, seed=seed, max_tokens=100).choices[0]
        if choice.message.tool_calls:
            valid_calls(choice.message.tool_calls)
        else:
            assert not choice.message.content.startswith("<tool_call>")


def test_parallel_calls_and_a_single_call_when_parallel_is_off(client):
    """Sampled answers under tool_choice required: some seeds make several calls (each valid, ids distinct, the
    stream reassembling to the same calls); with parallel_tool_calls off every answer is one call."""
    several = None
    for seed in range(12):
        choice = ask(client, tool_choice="required", temperature=1.0, seed=seed).choices[0]
        if choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) > 1:
            several = seed
            calls = valid_calls(choice.message.tool_calls)
            assert len({c.id for c in choice.message.tool_calls}) == len(calls)
            break
    assert several is not None, "no seed made parallel calls"
    streamed = reassembled(ask(client, tool_choice="required", temperature=1.0, seed=several, stream=True))[1]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == calls
    for seed in range(3):
        single = ask(client, tool_choice="required", temperature=1.0, seed=seed, parallel_tool_calls=False)
        assert len(single.choices[0].message.tool_calls) == 1


def test_a_tool_result_round_trip_to_a_final_answer(client):
    weather = {"type": "function", "function": {"name": "get_weather"}}
    call = ask(client, tool_choice=weather, parallel_tool_calls=False).choices[0].message
    result = json.dumps({"city": "Paris", "temp_c": 21, "sky": "clear"})
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in call.tool_calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": result} for c in call.tool_calls),
    ]
    final = ask(client, history, tool_choice="none", max_tokens=16)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    without = ask(client, history[:1], tool_choice="none", max_tokens=1)
    assert final.usage.prompt_tokens > without.usage.prompt_tokens + len(call.tool_calls) * 10  # the result was read
    orphan = [*history[:1], {"role": "tool", "tool_call_id": "call_nobody", "content": result}]
    with pytest.raises(openai.BadRequestError, match="call_nobody"):
        ask(client, orphan)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"format": "bogus"}}}]}, "bogus"),
        ({"response_format": {"type": "json_object"}}, "not both"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_problem(client, kw, message):
    tools = kw.pop("tools", TOOLS)
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model=client.model_name, messages=ASK, tools=tools, max_tokens=4, **kw)


def test_a_template_without_tool_support_is_refused(tiny_model_dir):
    served = load_served(str(tiny_model_dir))
    with running_server(create_app(served, ServeConfig(max_tokens=16))) as url:
        plain = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="chatml-tools") as caught:
            plain.chat.completions.create(model=served.default, messages=ASK, tools=TOOLS, max_tokens=4)
        assert caught.value.body["param"] == "tools"


def test_streamed_call_deltas_follow_openai_shape_piece_by_piece():
    text = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo}\\n", "days": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Oslo"}}\n</tool_call>'
    )
    stream = ToolCallStream(expect_calls=True)
    deltas = [d for ch in text for d in stream.add(ch)] + stream.finish()
    firsts = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
    assert [(f["index"], f["function"]) for f in firsts] == [
        (0, {"name": "get_weather", "arguments": ""}),
        (1, {"name": "get_time", "arguments": ""}),
    ]
    arguments = {0: "", 1: ""}
    for delta in deltas:
        part = delta["tool_calls"][0]
        arguments[part["index"]] += part["function"].get("arguments", "") if "id" not in part else ""
    assert json.loads(arguments[0]) == {"city": "Oslo}\n", "days": 2} and json.loads(arguments[1]) == {
        "zone": "Europe/Oslo"
    }
    assert stream.message()["tool_calls"][1]["function"]["arguments"] == arguments[1] and stream.finished_calls()
    plain = ToolCallStream(expect_calls=True)
    released = [d for ch in "<b>bold</b>" for d in plain.add(ch)]
    assert released[0] == {"content": "<b"} and "".join(d["content"] for d in released) == "<b>bold</b>"


def test_the_server_accepts_a_native_tool_template_and_refuses_one_it_cannot_parse(tokenizer):
    """Qwen2.5's own template writes calls as the grammar does; Llama 3's (no tool support here) is refused."""
    from pathlib import Path

    from afina.serve.schema import ApiError
    from afina.serve.tools import check_tool_template

    templates = Path(__file__).parent / "fixtures" / "chat_templates"
    qwen, llama = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
    qwen.chat_template = (templates / "qwen2_5_tools.jinja").read_text(encoding="utf-8")
    llama.chat_template = (templates / "llama3.jinja").read_text(encoding="utf-8")
    check_tool_template(qwen)
    with pytest.raises(ApiError, match="chatml-tools"):
        check_tool_template(llama)
