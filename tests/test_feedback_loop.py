"""The loop from served traffic back to training: preference data from logs, drift monitoring, the promotion gate."""

import json

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
        {"id": "r1", "messages": chat("Refund time?"), "answer": "Two years.", "model": "m"},           # corrected
        {"id": "r2", "messages": chat("Warranty?"), "answer": "Two years on parts.", "model": "m"},     # rated 1
        {"id": "r3", "messages": chat("Warranty?"), "answer": "No idea.", "model": "m"},                # rated -1
        {"id": "r4", "messages": chat("Warranty?"), "answer": "Two years on parts.", "model": "m"},     # rated 1, same text
        {"id": "r5", "messages": chat("Colour?"), "answer": "Blue.", "model": "m"},                     # rated 0 (latest)
        {"id": "r6", "messages": chat("Opening hours?"), "answer": "9 to 5.", "model": "m"},            # unrated
        {"id": "r7", "prompt": "Kettle model K2 is", "answer": "a toaster.", "model": "m"},             # raw, rated -1
        {"id": "r8", "messages": chat("Price?"), "answer": "", "model": "m"},                           # empty answer
    ]
    feedback = [
        {"id": "r1", "rating": -1, "correction": "Refunds take 5 business days."},
        {"id": "r2", "rating": 1}, {"id": "r3", "rating": -1}, {"id": "r4", "rating": 1},
        {"id": "r5", "rating": 1}, {"id": "r5", "rating": 0},
        {"id": "r7", "rating": -1}, {"id": "r8", "rating": 1},
    ]
    write_jsonl(folder / "requests.jsonl", requests)
    write_jsonl(folder / "feedback.jsonl", feedback)


def test_from_logs_pairs_counts_every_kind(tmp_path, tiny_model_dir):
    logs = tmp_path / "logs"
    logs.mkdir()
    planted_logs(logs)
    counts = preferences_from_logs(logs, tmp_path / "pairs.jsonl")
    assert counts["requests"] == 8
    assert counts["pairs_from_corrections"] == 1
    assert counts["pairs_from_ratings"] == 1  # r2/r4 (same text) over r3, once
    assert counts["kto_good"] == 1 + 1 and counts["repeated_rating"] == 1  # the correction; r2 (r4 repeats it)
    assert counts["kto_bad"] == 1 + 2  # the corrected answer; r3 and r7
    assert counts["neutral_rating"] == 1 and counts["left_out_unrated"] == 1 and counts["left_out_empty_answer"] == 1
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Refunds take 5 business days.", "Two years."), ("Two years on parts.", "No idea.")]
    kto = read_jsonl(tmp_path / "pairs.kto.jsonl")
    assert {(k["completion"], k["label"]) for k in kto} >= {("a toaster.", False), ("Refunds take 5 business days.", True)}
    assert len(kto) == counts["kto_written"] == 5

    # both files prepare as they are for task: preference
    for name, path in (("pairs", tmp_path / "pairs.jsonl"), ("kto", tmp_path / "pairs.kto.jsonl")):
        recipe = load_recipe(None, [f"name={name}", f"output_dir={tmp_path / 'runs'}", f"model.name={tiny_model_dir}",
                                    f"data.path={path}", "task=preference", "data.split.train=1", "data.split.validation=0",
                                    "data.split.test=0"])
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
    assert main(["data", "from-logs", str(logs), "--pairs", "-o", str(tmp_path / "p.jsonl"),
                 "--kto-output", str(tmp_path / "k.jsonl")]) == 0
    assert len(read_jsonl(tmp_path / "p.jsonl")) == 2 and len(read_jsonl(tmp_path / "k.jsonl")) == 5
    assert main(["data", "from-logs", str(logs), "--pairs", "-o", str(logs / "requests.jsonl")]) == 2
    assert json.loads((logs / "requests.jsonl").read_text().splitlines()[0])["id"] == "r1"  # untouched

