"""Tool-calling data: every input shape maps onto one canonical row, malformed calls are rejects with their reason,
tools are rendered by the template (the model's own or chatml-tools), and the loss covers calls and answers only."""

import copy
import json
from pathlib import Path

import pytest

from afina.data.format import IGNORE_INDEX, TemplateError, assistant_spans, encode_chat, render_prompt
from afina.data.schema import RowError, guess_schema, to_canonical
from afina.models.templates import with_chat_template

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"],
    },
}
OPENAI_TOOLS = [{"type": "function", "function": WEATHER}]
RESULT = '{"temp": 21}'
OPENAI_ROW = {
    "tools": OPENAI_TOOLS,
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1_0", "content": RESULT},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
}
CANONICAL = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1_0", "content": RESULT},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
    "tools": OPENAI_TOOLS,
}
SHAREGPT_ROW = {  # LLaMA-Factory's glaive / xLAM files
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": RESULT},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
    "tools": json.dumps([WEATHER]),
}
HERMES_ROW = {
    "conversations": [
        {"from": "system", "value": f"<tools>\n{json.dumps(WEATHER)}\n</tools>"},
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "gpt", "value": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'},
        {"from": "tool", "value": f"<tool_response>\n{RESULT}\n</tool_response>"},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ]
}
GLAIVE_ROW = {
    "system": "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
    + json.dumps(WEATHER, indent=4),
    "chat": "USER: Weather in Paris?\n\n\nASSISTANT: <functioncall> "
    '{"name": "get_weather", "arguments": \'{"city": "Paris"}\'} <|endoftext|>\n\n\n'
    f"FUNCTION RESPONSE: {RESULT}\n\n\nASSISTANT: It is 21 degrees in Paris. <|endoftext|>\n\n\n",
}


def canonical(row):
    schema, _ = guess_schema(row, {})
    return to_canonical(row, schema, {}, None)


@pytest.mark.parametrize(
    "row", [OPENAI_ROW, SHAREGPT_ROW, HERMES_ROW, GLAIVE_ROW], ids=["openai", "sharegpt", "hermes", "glaive"]
)
def test_every_input_shape_maps_to_the_same_canonical_row(row):
    assert canonical(row) == CANONICAL


def test_a_legacy_function_call_and_a_call_without_a_tool_result_map_too():
    row = copy.deepcopy(OPENAI_ROW)
    row["messages"][1] = {
        "role": "assistant",
        "content": None,
        "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    row["messages"][2].pop("tool_call_id")  # answers the call waiting for it
    got = canonical(row)
    assert got["messages"][1]["tool_calls"][0]["function"] == CANONICAL["messages"][1]["tool_calls"][0]["function"]
    assert got["messages"][2]["tool_call_id"] == got["messages"][1]["tool_calls"][0]["id"]


def broken(path, value):
    row = copy.deepcopy(OPENAI_ROW)
    target = row
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return row


CALL = ("messages", 1, "tool_calls", 0, "function")


@pytest.mark.parametrize(
    "row, reason",
    [
        (broken((*CALL, "arguments"), '{"city": "Par'), "arguments is not valid JSON"),
        (broken((*CALL, "arguments"), '["Paris"]'), "arguments must be a JSON object, got list"),
        (broken((*CALL, "arguments"), '{"unit": "c"}'), "'city' is a required property"),
        (broken((*CALL, "arguments"), '{"city": "Paris", "unit": "k"}'), "do not match its parameters at unit"),
        (
            broken((*CALL, "name"), "get_time"),
            "calls 'get_time', which is not among the row's tools (offered: get_weather)",
        ),
        (broken(("messages", 2, "tool_call_id"), "call_9"), "answers tool call 'call_9', which no earlier call"),
        (
            broken(("messages", 3), {"role": "tool", "tool_call_id": "call_1_0", "content": "again"}),
            "answers tool call",
        ),
        (
            broken(("tools",), [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]),
            "not a valid JSON Schema",
        ),
    ],
    ids=[
        "bad-json",
        "not-object",
        "missing-required",
        "enum",
        "unknown-tool",
        "orphan-result",
        "answered-twice",
        "bad-schema",
    ],
)
def test_each_malformed_call_is_a_reject_with_its_reason(row, reason):
    with pytest.raises(RowError) as caught:
        canonical(row)
    assert reason in str(caught.value)


def test_a_required_parameter_with_a_default_may_be_left_out():
    row = copy.deepcopy(OPENAI_ROW)
    tool = row["tools"][0]["function"]
    tool["parameters"] = {**tool["parameters"], "required": ["city", "unit"]}
    tool["parameters"]["properties"]["unit"] = {"type": "string", "default": "c"}
    assert canonical(row)["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


def test_prepare_writes_tool_rows_and_rejects_with_reasons(tmp_path, tiny_model_dir):
    from afina.config import load_recipe
    from afina.data.prepare import prepare_data
    from afina.rundir import read_jsonl

    cities = ["Paris", "Oslo", "Lima", "Quito", "Accra", "Hanoi", "Perth", "Dakar", "Riga", "Tunis", "Sofia", "Cusco"]
    questions = ["Weather in {}?", "Is it raining in {} today", "How warm will {} get", "Do I need a coat for {}"]
    good = []
    for i, city in enumerate(cities):
        row = copy.deepcopy(OPENAI_ROW)
        row["messages"][0]["content"] = questions[i % 4].format(city) + f" Trip {i * 7919 % 1000}."
        row["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": city})
        row["messages"][3]["content"] = f"{city}: {i + 10} degrees, {'dry' if i % 2 else 'wet'}."
        good.append(row)
    rows = [*good, broken((*CALL, "name"), "get_time")]
    source = tmp_path / "tools.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(
        None,
        [
            "name=tools",
            f"output_dir={tmp_path}",
            f"model.name={tiny_model_dir}",
            f"data.path={source}",
            "model.chat_template=chatml-tools",
            "data.clean.min_tokens=1",
        ],
    )
    prepare_data(recipe)
    run = tmp_path / "tools" / "data"
    kept = [r for split in ("train", "validation", "test") for r in read_jsonl(run / f"{split}.jsonl")]
    assert len(kept) == 12 and all(r["tools"] == OPENAI_TOOLS for r in kept)
    rejects = read_jsonl(run / "rejects.jsonl")
    assert [r["reason"] for r in rejects] == [
        "messages[1].tool_calls[0] calls 'get_time', which is not among the row's tools (offered: get_weather)"
    ]


# ---- templates and loss ----------------------------------------------------------------------


def supervised_text(tokenizer, encoded):
    return tokenizer.decode([t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX])


@pytest.fixture
def chatml_tools(tokenizer):
    return with_chat_template(copy.deepcopy(tokenizer), "chatml-tools")


@pytest.fixture
def qwen25(tokenizer):
    """A Qwen2.5-style tokenizer: the shared BPE vocabulary with Qwen2.5's own tool-aware chat template."""
    qwen = copy.deepcopy(tokenizer)
    qwen.chat_template = (TEMPLATES / "qwen2_5_tools.jinja").read_text(encoding="utf-8")
    qwen.eos_token = "<|im_end|>"
    return qwen


def test_a_template_without_tool_support_is_refused_with_the_fix(tokenizer):
    with pytest.raises(TemplateError, match="model.chat_template: chatml-tools"):
        encode_chat(tokenizer, CANONICAL["messages"], tools=CANONICAL["tools"])


@pytest.mark.parametrize("template", ["chatml_tools", "qwen25"])
def test_loss_covers_calls_and_answers_never_tool_results(template, request):
    tok = request.getfixturevalue(template)
    encoded = encode_chat(tok, CANONICAL["messages"], tools=CANONICAL["tools"])
    learned = supervised_text(tok, encoded)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in learned
    assert "It is 21 degrees in Paris." in learned
    assert RESULT not in learned and "get_weather" not in learned.split("<tool_call>")[0]  # no tool list, no result
    assert "Weather in Paris?" not in learned


@pytest.mark.parametrize("template", ["chatml_tools", "qwen25"])
def test_train_equals_serve_on_tool_turns(template, request):
    """Each assistant turn (a call, or the answer after a tool result) starts exactly where the served prompt ends."""
    tok = request.getfixturevalue(template)
    full, spans = assistant_spans(tok, CANONICAL["messages"], CANONICAL["tools"])
    assert len(spans) == 2
    for index, (start, _end) in zip((1, 3), spans):
        prompt = render_prompt(tok, CANONICAL["messages"][:index], CANONICAL["tools"])
        assert full.startswith(prompt) and start == len(prompt)
        assert "get_weather" in prompt  # the served prompt shows the tools


def test_a_rated_tool_call_from_the_request_log_becomes_a_tool_row(tmp_path):
    """The feedback loop: a served tool call (logged with its tools, the answer as <tool_call> text) rated good is a
    training row that prepare reads back as the same call."""
    from afina.data.from_logs import from_logs
    from afina.serve.logs import RequestLog

    log = RequestLog(tmp_path / "logs")
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    request = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": OPENAI_TOOLS}
    log.log_request("chatcmpl-1", "chat", "base", request, answer, {"prompt_tokens": 1}, 0.1)
    log.log_feedback("chatcmpl-1", 1, None, None)
    from_logs(tmp_path / "logs", tmp_path / "rows.jsonl")
    (row,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    got = canonical(row)
    assert got["tools"] == OPENAI_TOOLS
    assert got["messages"][-1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
