"""The loop from served traffic back to training: preference data from logs, drift monitoring, the promotion gate."""

import json
from datetime import UTC
from pathlib import Path

import pytest

from afina.config import load_recipe
from afina.data.preference_logs import preferences_from_logs
from afina.pipeline import prepare
from afina.rundir import RunDir, read_jsonl
from conftest import write_jsonl


def chat(question):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}]


def planted_logs(folder):
    """Requests with every kind of feedback, and the counts they must give."""
    requests = [
        {"id": "r1", "messages": chat("Refund time?"), "answer": "Two years.", "model": "m"},  # corrected
        {"id": "r2", "messages": chat("Warranty?"), "answer": "Two years on parts.", "model": "m"},  # rated 1
        {"id": "r3", "messages": chat("Warranty?"), "answer": "No idea.", "model": "m"},  # rated -1
        {
            "id": "r4",
            "messages": chat("Warranty?"),
            "answer": "Two years on parts.",
            "model": "m",
        },  # rated 1, same text
        {"id": "r5", "messages": chat("Colour?"), "answer": "Blue.", "model": "m"},  # rated 0 (latest)
        {"id": "r6", "messages": chat("Opening hours?"), "answer": "9 to 5.", "model": "m"},  # unrated
        {"id": "r7", "prompt": "Kettle model K2 is", "answer": "a toaster.", "model": "m"},  # raw, rated -1
        {"id": "r8", "messages": chat("Price?"), "answer": "", "model": "m"},  # empty answer
        # cut off when the client went away: rated and corrected, still not the model's answer
        {"id": "r9", "messages": chat("Delivery?"), "answer": "Within", "model": "m", "aborted": True},
    ]
    feedback = [
        {"id": "r1", "rating": -1, "correction": "Refunds take 5 business days."},
        {"id": "r2", "rating": 1},
        {"id": "r3", "rating": -1},
        {"id": "r4", "rating": 1},
        {"id": "r5", "rating": 1},
        {"id": "r5", "rating": 0},
        {"id": "r7", "rating": -1},
        {"id": "r8", "rating": 1},
        {"id": "r9", "rating": -1, "correction": "Within three days."},
    ]
    write_jsonl(folder / "requests.jsonl", requests)
    write_jsonl(folder / "feedback.jsonl", feedback)


def test_from_logs_pairs_counts_every_kind(tmp_path, tiny_model_dir):
    logs = tmp_path / "logs"
    logs.mkdir()
    planted_logs(logs)
    counts = preferences_from_logs(logs, tmp_path / "pairs.jsonl")
    assert counts["requests"] == 9 and counts["left_out_aborted"] == 1
    assert counts["pairs_from_corrections"] == 1
    assert counts["pairs_from_ratings"] == 1  # r2/r4 (same text) over r3, once
    assert counts["kto_good"] == 1 + 1 and counts["repeated_rating"] == 1  # the correction; r2 (r4 repeats it)
    assert counts["kto_bad"] == 1 + 2  # the corrected answer; r3 and r7
    assert counts["neutral_rating"] == 1 and counts["left_out_unrated"] == 1 and counts["left_out_empty_answer"] == 1
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Refunds take 5 business days.", "Two years."),
        ("Two years on parts.", "No idea."),
    ]
    kto = read_jsonl(tmp_path / "pairs.kto.jsonl")
    assert {(k["completion"], k["label"]) for k in kto} >= {
        ("a toaster.", False),
        ("Refunds take 5 business days.", True),
    }
    assert len(kto) == counts["kto_written"] == 5

    # both files prepare as they are for task: preference
    for name, path in (("pairs", tmp_path / "pairs.jsonl"), ("kto", tmp_path / "pairs.kto.jsonl")):
        recipe = load_recipe(
            None,
            [
                f"name={name}",
                f"output_dir={tmp_path / 'runs'}",
                f"model.name={tiny_model_dir}",
                f"data.path={path}",
                "task=preference",
                "data.split.train=1",
                "data.split.validation=0",
                "data.split.test=0",
            ],
        )
        report = prepare(recipe)
        assert report["schema"] == ("preference" if name == "pairs" else "kto")
        assert report["rejected"] == 0 and report["kept"] == len(read_jsonl(path))
    row = read_jsonl(RunDir(tmp_path / "runs" / "pairs").split_path("train"))[0]
    assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["content"] == "Refund time?"


def test_from_logs_pairs_from_the_command_line(tmp_path):
    from afina.cli import main

    logs = tmp_path / "logs"
    logs.mkdir()
    planted_logs(logs)
    assert (
        main(
            [
                "data",
                "from-logs",
                str(logs),
                "--pairs",
                "-o",
                str(tmp_path / "p.jsonl"),
                "--kto-output",
                str(tmp_path / "k.jsonl"),
            ]
        )
        == 0
    )
    assert len(read_jsonl(tmp_path / "p.jsonl")) == 2 and len(read_jsonl(tmp_path / "k.jsonl")) == 5
    assert main(["data", "from-logs", str(logs), "--pairs", "-o", str(logs / "requests.jsonl")]) == 2
    assert json.loads((logs / "requests.jsonl").read_text().splitlines()[0])["id"] == "r1"  # untouched


# ---- monitoring ------------------------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KETTLE = [
    "How do I descale my kettle with vinegar?",
    "My kettle makes a whistling noise when boiling, is that normal?",
    "Can I put lemon juice in the kettle to remove limescale?",
    "The kettle lid will not close after descaling",
    "How often should I descale an electric kettle in hard water?",
    "White flakes float in water from my kettle",
    "Is it safe to boil milk in a kettle?",
    "My kettle switches off before the water boils",
    "What is the best descaler for a stainless steel kettle?",
    "Kettle smells of plastic after descaling",
]


def banking_texts(name, n, start=0):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not here (CI has ../shared/data)")
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()[start : start + n]]


def served_run(tmp_path):
    """A run whose train split is banking questions (as afina prepare writes chat rows)."""
    import random

    texts = banking_texts("intent_banking77_train.jsonl", 10003)
    texts = random.Random(0).sample(texts, 250)
    run = RunDir(tmp_path / "runs" / "bank")
    run.data.mkdir(parents=True)
    write_jsonl(
        run.split_path("train"),
        [
            {
                "id": str(i),
                "messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "Let me check that."}],
            }
            for i, t in enumerate(texts)
        ],
    )
    return run


def log_requests(folder, prompts, start, answer="Let me check that for you."):
    """A request log as `afina serve --log-dir` writes it, one request every 10 minutes from `start`."""
    from datetime import timedelta

    folder.mkdir(exist_ok=True)
    rows = [
        {
            "id": f"chatcmpl-{i}",
            "time": (start + timedelta(minutes=10 * i)).strftime("%Y-%m-%dT%H:%M:%S%z"),
            "endpoint": "chat",
            "model": "bank",
            "messages": [{"role": "user", "content": p}],
            "answer": answer,
            "usage": {},
            "latency_s": 0.5 + (i % 3) * 0.1,
        }
        for i, p in enumerate(prompts)
    ]
    write_jsonl(folder / "requests.jsonl", rows)
    write_jsonl(
        folder / "feedback.jsonl", [{"id": r["id"], "rating": 1 if i % 2 else -1} for i, r in enumerate(rows[:10])]
    )


def test_monitor_sees_no_drift_in_traffic_like_the_training_data(tmp_path):
    from datetime import datetime

    from afina.eval.monitor import monitor

    run = served_run(tmp_path)
    prompts = banking_texts("intent_banking77_test.jsonl", 3080)[::40]  # held-out questions of the same kind
    log_requests(tmp_path / "logs", prompts, datetime(2026, 11, 1, 8, tzinfo=UTC))
    report = monitor(tmp_path / "logs", run.root)
    assert not report["drift"]["drifted"] and not report["retrain"], report["verdict"]
    assert report["drift"]["share_unlike_train"] < 0.2
    assert report["verdict"].startswith("no retraining needed")
    assert sum(t["requests"] for t in report["traffic"]) == len(prompts) and report["bucket"] == "hour"
    assert (run.root / "monitor" / "report.json").is_file()


def test_monitor_detects_a_planted_shift_and_names_the_new_topic(tmp_path):
    from datetime import datetime

    from afina.cli import main
    from afina.eval.monitor import monitor

    run = served_run(tmp_path)
    earlier = banking_texts("intent_banking77_test.jsonl", 3080)[::100]
    recent = banking_texts("intent_banking77_test.jsonl", 3080)[5::300] + KETTLE * 2
    log_requests(tmp_path / "logs", earlier + recent, datetime(2026, 11, 1, 8, tzinfo=UTC))
    report = monitor(tmp_path / "logs", run.root, recent_days=len(recent) * 10 / (24 * 60) - 1e-6)
    drift = report["drift"]
    assert report["recent"]["requests"] == len(recent)
    assert drift["drifted"] and report["retrain"] and drift["share_unlike_train"] > 0.5
    top = drift["new_topics"][0]
    assert "kettle" in top["label"] and top["size"] >= len(KETTLE) and all(e in KETTLE for e in top["examples"])
    assert report["verdict"].startswith("retrain recommended") and "kettle" in report["verdict"]
    assert main(["monitor", str(tmp_path / "logs"), "--run", str(run.root), "--bucket", "day"]) == 0


# ---- the promotion gate ----------------------------------------------------------------------------


def evaluated_run(root, accuracy, probe, test_sha="abc", threshold=5.0):
    """A run as `afina prepare` + `afina eval` leave it for the gate: the manifest and eval/metrics.json."""
    from afina.rundir import write_json_atomic

    run = RunDir(root)
    run.update_manifest(
        recipe={"eval": {"forgetting": {"threshold": threshold}}}, data={"splits_sha256": {"test": test_sha}}
    )
    write_json_atomic(
        run.eval / "metrics.json",
        {
            "test_examples": 40,
            "systems": {
                "base": {"fact_accuracy": 10.0, "rougeL": 0.1},
                "tuned": {"fact_accuracy": accuracy, "rougeL": accuracy / 200},
            },
            "forgetting": {
                "probe": "probe.jsonl",
                "questions": 40,
                "base_accuracy": 60.0,
                "tuned_accuracy": probe,
                "drop": 60.0 - probe,
                "threshold": threshold,
                "flagged": 60.0 - probe > threshold,
            },
        },
    )
    (run.root / "adapter").mkdir(parents=True, exist_ok=True)
    return run


def test_promotion_when_better_and_not_forgetting_points_the_serving_file(tmp_path):
    from afina.eval.promote import promote

    current = evaluated_run(tmp_path / "current", accuracy=60.0, probe=58.0)
    new = evaluated_run(tmp_path / "new", accuracy=72.5, probe=55.0)  # 3 points lost: within 5
    decision = promote(new.root, current.root, serving=tmp_path / "serving.json")
    assert decision["promoted"] and decision["primary_metric"] == "fact_accuracy" and decision["gain"] == 12.5
    assert json.loads((tmp_path / "serving.json").read_text())["adapter"] == str(new.adapter.resolve())
    assert json.loads((new.root / "promotion.json").read_text())["promoted"]
    assert len(read_jsonl(current.root / "promotions.jsonl")) == 1


@pytest.mark.parametrize(
    "accuracy, probe, test_sha, reason",
    [
        (59.0, 58.0, "abc", "no better"),  # worse on the frozen test split
        (60.0, 58.0, "abc", "no better"),  # a tie is not a gain
        (80.0, 50.0, "abc", "8.0 points lost"),  # better, but forgets
        (80.0, 58.0, "other", "same frozen test split"),  # scored on another test split
    ],
)
def test_promotion_refused(tmp_path, accuracy, probe, test_sha, reason):
    from afina.cli import main

    current = evaluated_run(tmp_path / "current", accuracy=60.0, probe=58.0)
    new = evaluated_run(tmp_path / "new", accuracy=accuracy, probe=probe, test_sha=test_sha)
    serving = tmp_path / "serving.json"
    assert main(["promote", str(new.root), "--over", str(current.root), "--serving", str(serving)]) == 3
    decision = json.loads((new.root / "promotion.json").read_text())
    assert not decision["promoted"] and any(reason in r for r in decision["reasons"]), decision["reasons"]
    assert not serving.exists()


def test_a_preference_run_is_compared_on_the_chat_test_file_it_was_scored_on(tmp_path):
    from afina.eval.promote import promote
    from afina.rundir import write_json_atomic

    current = evaluated_run(tmp_path / "current", accuracy=60.0, probe=58.0, test_sha="chat-test-sha")
    new = evaluated_run(tmp_path / "dpo", accuracy=70.0, probe=58.0, test_sha="pairs-test-sha")
    metrics = json.loads((new.eval / "metrics.json").read_text())
    metrics["systems"]["tuned"]["preference_accuracy"] = 90.0  # not in CURRENT: the gate decides on fact accuracy
    metrics["task_test"] = {"path": "runs/current/data/test.jsonl", "sha256": "chat-test-sha", "rows": 40}
    write_json_atomic(new.eval / "metrics.json", metrics)
    decision = promote(new.root, current.root)
    assert decision["promoted"] and decision["primary_metric"] == "fact_accuracy", decision["reasons"]


def test_promotion_needs_both_runs_evaluated(tmp_path):
    from afina.cli import main

    current = evaluated_run(tmp_path / "current", accuracy=60.0, probe=58.0)
    (tmp_path / "new").mkdir()
    assert main(["promote", str(tmp_path / "new"), "--over", str(current.root)]) == 2


def test_the_server_publishes_drift_and_feedback_as_prometheus_gauges(tmp_path, tiny_model_dir):
    """--monitor-every: the monitor's drift share, verdict and feedback rates appear on /metrics."""
    import re
    import time
    from datetime import datetime

    import httpx

    from afina.config import ServeConfig
    from afina.serve.app import create_app
    from afina.serve.models import ServeError, load_served
    from serving import running_server

    run = served_run(tmp_path)
    logs = tmp_path / "logs"
    log_requests(logs, banking_texts("intent_banking77_test.jsonl", 3080)[5::300] + KETTLE * 3, datetime.now(UTC))
    served = load_served(str(tiny_model_dir))

    def gauge(text, name):
        found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return float(found.group(1)) if found else None

    app = create_app(served, ServeConfig(log_dir=str(logs), monitor_every=3600), run_root=str(run.root))
    with running_server(app) as base:
        metrics = httpx.get(f"{base}/metrics").text
        for _ in range(600):  # the monitor thread's first pass embeds the split and the traffic
            if (gauge(metrics, "afina_monitor_requests") or 0) > 0:
                break
            time.sleep(0.1)
            metrics = httpx.get(f"{base}/metrics").text
        assert gauge(metrics, "afina_drift_unlike_share") > 0.5
        assert gauge(metrics, "afina_drift_unlike_limit") == 0.2
        assert gauge(metrics, "afina_retrain_recommended") == 1.0
        assert gauge(metrics, "afina_feedback_negative_share") is not None
        reply = httpx.post(
            f"{base}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        ).json()
        httpx.post(f"{base}/v1/feedback", json={"id": reply["id"], "rating": -1, "correction": "Hello!"})
        metrics = httpx.get(f"{base}/metrics").text
        assert gauge(metrics, 'afina_feedback_total{kind="negative"}') == 1.0
        assert gauge(metrics, 'afina_feedback_total{kind="correction"}') == 1.0
        assert app.state.monitor.is_alive()
    assert not app.state.monitor.is_alive()  # stopped with the server
    with pytest.raises(ServeError, match="--log-dir"):
        create_app(served, ServeConfig(monitor_every=60), run_root=str(run.root))
    with pytest.raises(ServeError, match="no train split"):
        create_app(served, ServeConfig(log_dir=str(logs), monitor_every=60), run_root=str(tiny_model_dir))
