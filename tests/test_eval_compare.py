"""`afina eval` with every system, metrics by task, the forgetting probe and the HTML report."""

import json
import subprocess
from pathlib import Path

import pytest

from afina.eval.forgetting import default_probe_path, forgetting_verdict, load_probe
from afina.eval.metrics import bleu, chrf, classification_scores, rouge_scores, token_f1
from afina.eval.summary import format_table
from afina.pipeline import evaluate, prepare, train
from afina.rag import Retriever, load_passages, passages_from_rows
from afina.rundir import RunDir, read_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CHROMIUM = Path("/usr/bin/chromium")


def test_metrics_by_task_use_the_field_libraries():
    assert token_f1(["the Denver Broncos"], [["Denver Broncos"]]) == 100.0
    assert 0 < token_f1(["Denver"], [["Denver Broncos"]]) < 100
    assert rouge_scores(["the cat sat"], [["a dog ran", "the cat sat"]])["rougeL"] == 100.0  # best reference
    assert bleu(["el gato se sienta en la alfombra"], [["el gato se sienta en la alfombra"]]) == pytest.approx(100.0)
    assert chrf(["el perro"], [["el gato se sienta"]]) < 50
    scores = classification_scores(["positive", "It is negative.", "banana"], ["positive", "negative", "negative"])
    assert scores["accuracy"] == pytest.approx(200 / 3)
    assert scores["confusion"]["labels"] == ["negative", "positive", "(other)"]
    assert scores["confusion"]["matrix"][0] == [1, 0, 1]


def test_default_probe_and_probe_file_errors(tmp_path):
    questions = load_probe(default_probe_path())
    assert len(questions) == 40 and all(0 <= q["answer"] < len(q["choices"]) for q in questions)
    bad = tmp_path / "probe.jsonl"
    bad.write_text(
        '{"question": "2+2?", "choices": ["4", "5"], "answer": 0}\n{"question": "x", "choices": ["a"], "answer": 0}\n'
    )
    with pytest.raises(ValueError, match=r"probe.jsonl:2: field 'choices'"):
        load_probe(bad)
    assert forgetting_verdict(80.0, 70.0, 5.0)["flagged"] and not forgetting_verdict(80.0, 78.0, 5.0)["flagged"]


@pytest.mark.skipif(not (SHARED / "mcq_arc_easy_dev.jsonl").is_file(), reason="../shared/data not present")
def test_arc_file_is_accepted_as_a_probe():
    questions = load_probe(SHARED / "mcq_arc_easy_dev.jsonl", max_questions=30)
    assert len(questions) == 30 and all(isinstance(q["answer"], int) for q in questions)


@pytest.mark.parametrize("kind", ["bm25", "dense", "hybrid"])
def test_retrievers_find_the_passage_that_answers(tmp_path, kind):
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps(p)
            for p in [
                {"id": "kettle", "text": "The Quorlan kettle holds 1.7 litres and boils in ninety seconds."},
                {"id": "returns", "text": "Returns are accepted within 47 days of delivery with the receipt."},
                {"id": "hours", "text": "Support is open Tuesday to Saturday from 7:40 in the morning."},
            ]
        )
        + "\n"
    )
    retriever = Retriever(load_passages(corpus), kind)
    hits = retriever.search(["How many days do I have to return an item?", "When is support open?"], top_k=2)
    assert [h[0].id for h in hits] == ["returns", "hours"] and len(hits[0]) == 2
    rows = [{"id": "r1", "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}]
    assert passages_from_rows(rows)[0].text == "Q: Q?\nA: A."
    if kind != "dense":  # bm25s's index-building chatter stays out of a run's output
        import logging

        assert logging.getLogger("bm25s").getEffectiveLevel() >= logging.WARNING


def test_eval_runs_every_system_and_writes_the_three_files(tiny_recipe):
    recipe = tiny_recipe(
        "training.max_steps=2",
        "eval.max_examples=6",
        "eval.few_shot.k=2",
        "eval.price_per_hour=2.5",
        "eval.forgetting.max_questions=12",
    )
    prepare(recipe)
    train(recipe, progress=False)
    report = evaluate(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    systems = ["base", "base_fewshot", "base_rag", "tuned", "tuned_rag"]
    assert list(report["systems"]) == systems
    for system in systems:
        assert {"fact_accuracy", "rougeL", "rouge2", "token_f1", "exact_match", "answer_loss"} <= set(
            report["systems"][system]
        )
        eff = report["efficiency"][system]
        assert eff["latency_p95_s"] >= eff["latency_p50_s"] > 0 and eff["generated_tokens_per_s"] > 0
        assert eff["cost_per_1k_requests"] > 0
    # Same weights, different prompts: few-shot and RAG prompts change the reference answer's loss.
    assert report["systems"]["base_rag"]["answer_loss"] != report["systems"]["base"]["answer_loss"]
    assert report["training"]["wall_time_s"] is None or report["training"]["wall_time_s"] >= 0
    forgetting = report["forgetting"]
    assert forgetting["questions"] == 12 and isinstance(forgetting["flagged"], bool)
    predictions = read_jsonl(run.eval / "predictions.jsonl")
    assert len(predictions) == 5 * report["test_examples"] and {p["system"] for p in predictions} == set(systems)
    assert all(len(p["retrieved"]) == 3 for p in predictions if p["system"].endswith("_rag"))
    assert json.loads((run.eval / "metrics.json").read_text()) == report
    assert report["recommendation"] and "Best quality" in report["recommendation"][0]
    assert "base_fewshot" in format_table(report)
    page = (run.eval / "report.html").read_text()
    assert page.count('class="plot"') >= 5 and "http" not in page.split("<body", 1)[1].split("metrics.json")[0]
    _check_renders_in_chromium(run.eval / "report.html", page.count('class="plot"'))


def _check_renders_in_chromium(path: Path, n_plots: int) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium not installed (Debian package chromium)")
    out = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            "--dump-dom",
            path.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f'data-plots-total="{n_plots}"' in out.stdout
    assert f'data-plots-rendered="{n_plots}"' in out.stdout  # every embedded PNG decoded
    assert "Systems × metrics" in out.stdout or "Systems &times; metrics" in out.stdout


def test_code_task_scores_pass_at_1_in_the_sandbox(tiny_recipe):
    rows = []
    for i in range(10):
        rows.append(
            {
                "id": f"c{i}",
                "messages": [
                    {"role": "user", "content": f"Write a function f{i} returning {i}."},
                    {"role": "assistant", "content": f"def f{i}():\n    return {i}"},
                ],
                "tests": [f"assert f{i}() == {i}"],
            }
        )
    recipe = tiny_recipe(
        "eval.systems=[base]", "eval.forgetting.enabled=false", "eval.report=false", "data.split.test=0.3", rows=rows
    )
    prepare(recipe)  # only the base model answers: no training needed
    report = evaluate(recipe, progress=False)
    assert report["metrics"] == ["pass@1", "perplexity"]
    assert all(0 <= s["pass@1"] <= 100 for s in report["systems"].values())
    predictions = read_jsonl(RunDir(recipe.run_dir).eval / "predictions.jsonl")
    assert all(p["sandbox"] in {"passed", "failed", "timeout", "memory", "error"} for p in predictions)


def test_classification_reports_a_confusion_matrix(tiny_recipe):
    words = ["great", "awful", "lovely", "terrible", "superb", "horrid", "fine", "bad", "nice", "poor"]
    rows = [
        {
            "id": f"s{i}",
            "messages": [
                {"role": "user", "content": f"Sentiment of: it was {w} {i}"},
                {"role": "assistant", "content": "positive" if i % 2 == 0 else "negative"},
            ],
        }
        for i, w in enumerate(words * 2)
    ]
    recipe = tiny_recipe(
        "eval.systems=[base]",
        "eval.metrics=[classification]",
        "eval.forgetting.enabled=false",
        "data.split.test=0.3",
        rows=rows,
    )
    prepare(recipe)
    report = evaluate(recipe, progress=False)
    scores = report["systems"]["base"]
    assert 0 <= scores["accuracy"] <= 100 and 0 <= scores["macro_f1"] <= 100
    matrix = scores["confusion"]["matrix"]
    assert sum(map(sum, matrix)) == report["test_examples"]
    assert "Confusion matrices" in (RunDir(recipe.run_dir).eval / "report.html").read_text()
