"""The advisor on real (tiny) training runs: a planted overfit run and a planted name-biased classifier are
flagged in eval/metrics.json, a healthy unbiased run is not. A classification head on the tiny Llama trains
in seconds."""

import random

import pytest

from afina.config import load_recipe
from afina.eval.bias import DIMENSIONS
from afina.pipeline import evaluate, prepare, train
from conftest import write_jsonl

WOMEN, MEN = DIMENSIONS["name"][2]["women's names"], DIMENSIONS["name"][2]["men's names"]


def run_classifier(tmp_path, model_dir, rows, *overrides, with_recipe=False):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = load_recipe(
        None,
        [
            "name=advised",
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={model_dir}",
            f"data.path={data}",
            "task=classification",
            "classification.mode=head",
            "classification.backbone=llm",
            "method.type=full",
            "data.dedup.near=false",
            "data.split.validation=0.25",
            "data.split.test=0.15",
            "training.batch_size=8",
            "training.precision=fp32",
            "training.tensorboard=false",
            "training.plots=false",
            "training.warmup_ratio=0",
            "eval.report=false",
            "eval.risks.resamples=500",
            "eval.risks.bias_rows=8",
            *overrides,
        ],
    )
    prepare(recipe)
    train(recipe, progress=False)
    report = evaluate(recipe, progress=False)
    return (recipe, report) if with_recipe else report


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, tiny_model_dir):
    """Sentiment told by one word; names assigned at random (they carry no signal); a short run."""
    rng = random.Random(0)
    rows = []
    for i in range(48):
        label = ("bad", "good")[i % 2]
        word = rng.choice(("great", "fine") if label == "good" else ("awful", "poor"))
        rows.append({"text": f"{rng.choice(WOMEN + MEN)} wrote: the film was {word}, entry {i}", "label": label})
    return run_classifier(
        tmp_path_factory.mktemp("healthy"),
        tiny_model_dir,
        rows,
        "training.epochs=3",
        "training.learning_rate=0.001",
        "classification.head_learning_rate=0.003",
        "training.eval_every=3",
        "eval.report=true",
        with_recipe=True,
    )


def test_a_healthy_run_is_not_flagged_for_overfitting_or_bias(healthy):
    recipe, healthy = healthy
    assert healthy["systems"]["tuned"]["accuracy"] >= 85
    assert not healthy["overfitting"]["flagged"], healthy["overfitting"]
    assert not healthy["bias"]["flagged"], healthy["bias"]
    assert healthy["bias"]["dimensions"]["name"]["systems"]["tuned"]["gap"] <= 0.15
    low, high = healthy["intervals"]["systems"]["tuned"]["accuracy"]
    assert low <= healthy["systems"]["tuned"]["accuracy"] <= high


def test_a_planted_overfit_run_is_flagged_with_the_setting_to_change(tmp_path, tiny_model_dir):
    """Labels drawn at random: all the run can learn is the train rows themselves, so validation loss turns."""
    rng = random.Random(1)
    words = "amber basil cedar delta ember fjord grove harbor iris juniper kelp lumen moss nectar opal pine".split()
    rows = [{"text": " ".join(rng.sample(words, 4)), "label": rng.choice(["x", "y"])} for _ in range(40)]
    report = run_classifier(
        tmp_path,
        tiny_model_dir,
        rows,
        "training.epochs=5",
        "training.learning_rate=0.005",
        "classification.head_learning_rate=0.02",
        "training.eval_every=4",
        "eval.risks.bias=false",
        "training.load_best_at_end=false",
    )
    curves = report["overfitting"]["curves"]
    assert report["overfitting"]["flagged"] and curves["turned_at_step"] is not None
    assert curves["final_val_loss"] > 1.05 * curves["best_val_loss"]
    assert any("training.epochs=" in line for line in report["overfitting"]["advice"])
    assert any("Validation loss was lowest" in line for line in report["recommendation"])
    memorised = report["overfitting"]["memorisation"]  # scored; its flag is tested on planted numbers
    assert memorised["metric"] == "accuracy" and memorised["train_rows"] > 0 and memorised["test_rows"] > 0


def test_a_planted_name_biased_classifier_is_flagged(tmp_path, tiny_model_dir):
    """The text says nothing; women's names are always 'good' and men's names 'bad'."""
    rng = random.Random(2)
    rows = [
        {"text": f"{name} wrote: the film was what it was, entry {i}", "label": "good" if name in WOMEN else "bad"}
        for i, name in enumerate(rng.choice(WOMEN + MEN) for _ in range(48))
    ]
    report = run_classifier(
        tmp_path,
        tiny_model_dir,
        rows,
        "training.epochs=4",
        "training.learning_rate=0.001",
        "classification.head_learning_rate=0.003",
        "training.eval_every=6",
    )
    name = report["bias"]["dimensions"]["name"]
    assert report["bias"]["flagged"] and name["flagged"], report["bias"]
    assert name["systems"]["tuned"]["gap"] >= 0.5
    assert any("FLAGGED" in line and "name" in line for line in report["recommendation"])


def test_advise_trains_nested_subsets_and_fits_what_more_data_buys(healthy):
    from afina.advise import learning_curve
    from afina.rundir import RunDir, read_jsonl

    recipe, report = healthy
    run = RunDir(recipe.run_dir)
    result = learning_curve(recipe, (0.25, 0.5, 1.0), echo=lambda line: None)
    rows = [p["rows"] for p in result["points"]]
    assert rows == sorted(rows) and rows[-1] == len(read_jsonl(run.split_path("train"))) and len(set(rows)) == 3
    small = {r["id"] for r in read_jsonl(run.root / "advise" / "025pct" / "data" / "train.jsonl")}
    larger = {r["id"] for r in read_jsonl(run.root / "advise" / "050pct" / "data" / "train.jsonl")}
    assert small < larger  # nested: more data, not different data
    assert result["points"][-1]["value"] == report["systems"]["tuned"]["accuracy"]  # the run's own evaluation
    assert all(p["interval"] for p in result["points"]) and result["metric"] == "accuracy"
    assert result["fit"] is not None and "Doubling the train data" in result["advice"]
    assert (run.root / "advise" / "learning_curve.png").stat().st_size > 1000
    page = (run.eval / "report.html").read_text()
    assert page.index("<h2>Advice</h2>") < page.index("<h2>Recommendation</h2>") and "learning_curve.json" in page
    assert "Fine-tune, prompt or retrieve?" in page and "Bias probe" in page


def test_chat_eval_reports_intervals_invented_facts_memorisation_and_the_bias_probe(tiny_recipe):
    from afina.eval.summary import format_table

    recipe = tiny_recipe(
        "eval.systems=[base,base_rag,tuned]",
        "eval.rag.retriever=bm25",
        "eval.risks.unanswerable_rows=3",
        "eval.forgetting.enabled=false",
        "eval.risks.bias=true",
        "eval.risks.memorisation_rows=4",
        "eval.risks.bias_rows=2",
        "eval.risks.resamples=300",
        "eval.report=false",
    )
    prepare(recipe)
    train(recipe, progress=False)
    report = evaluate(recipe, progress=False)
    n = report["test_examples"]
    for system in ("base", "tuned"):
        for metric in ("fact_accuracy", "token_f1", "exact_match", "rougeL"):
            low, high = report["intervals"]["systems"][system][metric]
            assert low <= report["systems"][system][metric] <= high
    pairs = {(d["system"], d["baseline"]) for d in report["intervals"]["differences"]}
    assert pairs == {("tuned", "base"), ("tuned", "base_rag")}
    wrong = report["hallucination"]["wrong_passage"]
    assert wrong["questions"] <= 3 and 0 <= wrong["systems"]["base_rag"]["assert_rate"] <= 100
    assert all(d["rows"] == n for d in report["intervals"]["differences"])
    assert report["hallucination"]["rows_with_keys"] == n and set(report["hallucination"]["systems"]) == {
        "base",
        "base_rag",
        "tuned",
    }
    assert report["overfitting"]["memorisation"]["train_rows"] == 4
    assert report["bias"]["cases"] == 2 * 3 and set(report["bias"]["dimensions"]["name"]["systems"]) == {
        "base",
        "tuned",
    }
    table = format_table(report)
    assert f"{report['systems']['tuned']['fact_accuracy']:.2f} [" in table and "tuned - base on fact accuracy" in table
