"""Tool-calling metrics: decision, names, arguments by value, exact calls as a set, JSON validity, with intervals."""

import json

import pytest

from afina.eval.tool_metrics import score_tool_answer, tool_metric_means
from afina.eval.uncertainty import intervals_from_predictions


def reference(*calls, content=""):
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
            for i, (n, a) in enumerate(calls)
        ],
    }


def written(*calls, before=""):
    return before + "\n".join(
        f'<tool_call>\n{{"name": "{n}", "arguments": {a if isinstance(a, str) else json.dumps(a)}}}\n</tool_call>'
        for n, a in calls
    )


WEATHER = ("get_weather", {"city": "Paris", "days": 3, "opts": {"a": 1, "b": [1, 2]}})
TIME = ("get_time", {"zone": "Europe/Oslo"})


@pytest.mark.parametrize(
    "ref, prediction, expected",
    [
        # same calls, other order, keys reordered, 3 written as 3.0: exact
        (
            reference(WEATHER, TIME),
            written(TIME, ("get_weather", {"opts": {"b": [1, 2], "a": 1.0}, "days": 3.0, "city": "Paris"})),
            (1, 1, 1.0, 1, 1),
        ),
        # a number as a string is not the number; a list in another order is not the list
        (
            reference(WEATHER),
            written(("get_weather", {"city": "Paris", "days": "3", "opts": {"a": 1, "b": [2, 1]}})),
            (1, 1, 1 / 3, 0, 1),
        ),
        # the wrong tool: decision right, name and arguments wrong
        (reference(TIME), written(("get_weather", {"zone": "Europe/Oslo"})), (1, 0, 0.0, 0, 1)),
        # one of two parallel calls
        (reference(WEATHER, TIME), written(TIME), (1, 0, 1 / 4, 0, 1)),
        # text where a call was due
        (reference(TIME), "It is noon in Oslo.", (0, 0, 0.0, 0, None)),
        # a call that is not JSON: tried, invalid
        (reference(TIME), written(("get_time", "{zone: Oslo}")), (1, 0, 0.0, 0, 0)),
        # an answer where an answer was due, and a call where an answer was due
        ({"role": "assistant", "content": "Hello!"}, "Hi there.", (1, None, None, None, None)),
        ({"role": "assistant", "content": "Hello!"}, written(TIME), (0, None, None, None, 1)),
        # true is not 1
        (reference(("flag", {"on": True})), written(("flag", {"on": 1})), (1, 1, 0.0, 0, 1)),
    ],
    ids=[
        "exact-set",
        "by-type",
        "wrong-tool",
        "half-parallel",
        "no-call",
        "bad-json",
        "answer",
        "spurious-call",
        "bool",
    ],
)
def test_per_row_scores(ref, prediction, expected):
    got = score_tool_answer(ref, prediction)
    fields = ("decision_correct", "names_correct", "argument_match", "call_exact", "json_valid")
    assert tuple(got[f] for f in fields) == pytest.approx(expected)


def test_means_and_bootstrap_intervals_per_system():
    rows = [(reference(TIME), written(TIME)), (reference(TIME), "noon"), (reference(WEATHER), written(WEATHER))] * 4
    predictions, systems = [], {}
    for system, good in (("base", False), ("tuned", True)):
        scores = [score_tool_answer(ref, pred if good else "no idea") for ref, pred in rows]
        systems[system] = tool_metric_means(scores)
        predictions += [{"id": str(i), "system": system, **s} for i, s in enumerate(scores)]
    assert systems["tuned"]["call_exact_match"] == pytest.approx(200 / 3, abs=0.01)
    assert systems["base"]["call_decision"] == 0 and "json_validity" not in systems["base"]
    intervals = intervals_from_predictions(predictions, systems, resamples=200)
    low, high = intervals["systems"]["tuned"]["call_exact_match"]
    assert low < systems["tuned"]["call_exact_match"] < high
    diff = next(d for d in intervals["differences"] if d["metric"] == "call_exact_match")
    assert (diff["system"], diff["baseline"]) == ("tuned", "base")
