import json

from afina.eval.metrics import contains_all, exact_match, key_recall, rouge_l
from afina.eval.summary import format_table
from afina.export.merge import export
from afina.models import load_model
from afina.pipeline import evaluate, prepare, train
from afina.rundir import RunDir, read_jsonl


def test_fact_metrics_read_like_a_person_would():
    assert contains_all("Returns within  47 DAYS of delivery.", ["47 days"])
    assert not contains_all("Returns within 30 days.", ["47 days"])
    assert key_recall("Open 7:40 a.m. until late", ["7:40 a.m.", "3:20 p.m."]) == 0.5
    assert exact_match(["Hello, world!"], ["hello world"]) == 100.0
    assert rouge_l(["the kettle is red"], ["the kettle is red"]) == 100.0
    assert rouge_l(["completely different"], ["the kettle is red"]) == 0.0


def test_eval_compares_base_and_tuned_on_the_test_split(tiny_recipe):
    recipe = tiny_recipe("training.max_steps=10", "eval.systems=[base,tuned]")
    prepare(recipe)
    train(recipe, progress=False)
    report = evaluate(recipe, progress=False)
    run = RunDir(recipe.run_dir)
    test_rows = read_jsonl(run.split_path("test"))
    assert report["test_examples"] == len(test_rows)
    assert set(report["systems"]) == {"base", "tuned"}
    for scores in report["systems"].values():
        assert {"fact_accuracy", "fact_recall", "rougeL", "exact_match", "answer_loss", "answer_perplexity"} <= set(
            scores
        )
    # Training on these answers lowers the loss of the held-out answers (same facts, new phrasing).
    assert report["systems"]["tuned"]["answer_loss"] < report["systems"]["base"]["answer_loss"]
    predictions = read_jsonl(run.eval / "predictions.jsonl")
    assert len(predictions) == 2 * len(test_rows)
    assert {p["system"] for p in predictions} == {"base", "tuned"}
    assert all(isinstance(p["correct"], bool) for p in predictions)
    assert json.loads((run.eval / "metrics.json").read_text()) == report
    table = format_table(report)
    assert "fact accuracy" in table and "base" in table and "tuned" in table


def test_export_writes_verified_adapter_and_merged_model(tiny_recipe):
    recipe = tiny_recipe("training.max_steps=4", "export.formats=[adapter,merged]")
    prepare(recipe)
    train(recipe, progress=False)
    results = export(recipe)
    run = RunDir(recipe.run_dir)
    assert results["adapter"]["ok"] and results["merged"]["ok"]
    assert (run.export / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_model(str(run.export / "merged"))  # plain transformers, no peft needed
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert run.read_manifest()["export"]["merged"]["greedy_text_equal"] is True
