"""Domain adaptation (raw text, chunked and packed, perplexity before/after) and multi-task mixtures."""

import json
import math
import random
from collections import Counter

import pytest

from afina.config import RecipeError
from afina.data.format import IGNORE_INDEX, chunk_starts, count_chunks, encode_split, encode_text_chunks, text_token_ids
from afina.data.mixture import mix, mixture_counts, mixture_shares
from afina.data.prepare import format_report
from afina.eval.domain import default_general_text_path, load_general_text
from afina.eval.summary import format_table
from afina.export.merge import export
from afina.pipeline import evaluate, prepare, train
from afina.rundir import RunDir, read_jsonl
from afina.tasks import domain
from conftest import support_rows, write_jsonl

# ---- chunking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("length,overlap", [(16, 0), (16, 5), (7, 6)])
def test_every_token_of_a_long_document_is_labelled_exactly_once(tokenizer, length, overlap):
    text = " ".join(f"word{i} is followed by more text about topic {i % 7}." for i in range(20))
    ids = text_token_ids(tokenizer, text)
    chunks = encode_text_chunks(tokenizer, text, length, overlap)
    assert len(chunks) == count_chunks(len(ids), length, overlap) > 1
    assert all(len(c["input_ids"]) <= length for c in chunks)
    # Position 0 of a chunk is never predicted; every later labelled position is, once.
    predicted = []
    for (start, _), chunk in zip(chunk_starts(len(ids), length, overlap), chunks):
        assert chunk["input_ids"] == ids[start : start + len(chunk["input_ids"])]
        predicted += [start + i for i, label in enumerate(chunk["labels"]) if i > 0 and label != IGNORE_INDEX]
    assert sorted(predicted) == sorted(set(predicted))
    missed = set(range(1, len(ids))) - set(predicted)
    # Without overlap, each chunk's first token has no context; with overlap, nothing is missed.
    assert missed == ({s for s, _ in chunk_starts(len(ids), length, 0)} - {0} if overlap == 0 else set())
    assert ids[-1] == tokenizer.eos_token_id


def test_chunk_arithmetic_and_bad_overlap():
    assert chunk_starts(10, 4, 1) == [(0, 0), (3, 4), (6, 7)]
    assert chunk_starts(4, 4) == [(0, 0)] and chunk_starts(0, 4) == []
    assert count_chunks(9, 4) == 2  # the lone ninth token would predict nothing: no chunk of its own
    with pytest.raises(ValueError, match="larger than the overlap"):
        chunk_starts(10, 4, 4)


def test_domain_recipe_rules(tiny_recipe):
    recipe = tiny_recipe("task=domain", "data.max_length=64")
    assert recipe.training.packing and recipe.chunk_length() == 64
    assert not tiny_recipe("task=domain", "training.packing=false").training.packing
    with pytest.raises(RecipeError, match=r"domain.overlap \(64\) must be smaller"):
        tiny_recipe("task=domain", "data.max_length=64", "domain.overlap=64")
    with pytest.raises(RecipeError, match="data.schema must be text"):
        tiny_recipe("task=domain", "data.schema=chat")
    with pytest.raises(RecipeError, match="longer than training.pack_length"):
        tiny_recipe("task=domain", "domain.chunk_length=128", "training.pack_length=64")


def test_the_packaged_general_text_sample_loads():
    rows = load_general_text(default_general_text_path())
    assert len(rows) >= 20 and all(len(r["text"]) > 200 for r in rows)
    source = {json.loads(line)["source"] for line in default_general_text_path().read_text().splitlines()}
    assert source == {"written for afina by its contributors, Apache-2.0 like the rest of afina"}


DOMAIN_WORDS = ["filter", "membrane", "rinse", "valve", "pressure", "cartridge", "flow", "sensor", "descale", "pump"]


def domain_documents(n: int, sentences: int, seed: int = 0) -> str:
    """Plain text: n documents (paragraphs) of a narrow vocabulary, some much longer than a chunk."""
    rng = random.Random(seed)
    docs = []
    for d in range(n):
        count = sentences * (4 if d % 3 == 0 else 1)
        docs.append(
            " ".join(
                f"The {rng.choice(DOMAIN_WORDS)} needs a {rng.choice(DOMAIN_WORDS)} check after "
                f"{rng.randint(2, 9)} cycles."
                for _ in range(count)
            )
        )
    return "\n\n".join(docs) + "\n"


def test_domain_adaptation_end_to_end(tiny_recipe, tmp_path):
    corpus = tmp_path / "manual.txt"
    corpus.write_text(domain_documents(30, 6), encoding="utf-8")
    recipe = tiny_recipe(
        "task=domain",
        f"data.path={corpus}",
        "data.max_length=64",
        "domain.overlap=8",
        "data.dedup.near=false",
        "training.max_steps=10",
        "training.eval_every=10",
        "training.learning_rate=0.02",
        "domain.max_eval_chunks=12",
        "eval.forgetting.enabled=false",
        "export.formats=[adapter, merged]",
    )
    report = prepare(recipe)
    run = RunDir(recipe.run_dir)
    assert report["schema"] == "text" and report["rejected"] == 0  # long documents are kept and chunked
    assert report["domain"]["documents_split"] > 0 and report["domain"]["chunks"]["train"] > report["splits"]["train"]
    assert "chunks of 64 tokens (overlap 8)" in format_report(report)
    train_rows = read_jsonl(run.split_path("train"))
    from afina.models import load_tokenizer

    chunks = encode_split(load_tokenizer(recipe.model.name), train_rows, "all", domain.chunking(recipe))
    assert len(chunks) == report["domain"]["chunks"]["train"] and max(len(c["input_ids"]) for c in chunks) == 64

    summary = train(recipe, progress=False)
    assert summary["packing"] and summary["train_examples"] == len(chunks)
    assert summary["val_loss_after"] < summary["val_loss_before"]

    result = evaluate(recipe, progress=False)
    base, tuned = result["systems"]["base"], result["systems"]["tuned"]
    assert tuned["domain_perplexity"] < base["domain_perplexity"]
    assert base["domain_perplexity"] == pytest.approx(math.exp(base["domain_loss"]), rel=1e-3)
    assert result["texts"]["general"]["tokens"] > 0 and result["texts"]["domain"]["chunks"] == 12
    assert result["change"]["domain"]["perplexity_ratio"] < 1
    saved = json.loads((run.eval / "metrics.json").read_text())
    assert saved["systems"] == result["systems"] and (run.eval / "report.html").is_file()
    table = format_table(result)
    assert "domain perplexity" in table and "general-text perplexity" in table
    # Export verifies the reloaded model on the start of held-out documents (raw text, no chat template).
    exported = export(recipe)
    assert exported["adapter"]["ok"] and exported["merged"]["ok"]


# ---- multi-task ---------------------------------------------------------------------------------


def test_mixture_counts_by_weights_and_temperature():
    sizes = {"big": 900, "small": 100}
    assert mixture_counts(sizes) == sizes  # T=1, no total: the data as it is
    assert mixture_counts(sizes, temperature=2.0) == {"big": 750, "small": 250}  # sqrt(900) : sqrt(100)
    uniform = mixture_shares(sizes, temperature=1000.0)
    assert uniform["small"] == pytest.approx(0.5, abs=0.01)
    assert mixture_counts(sizes, weights={"big": 1, "small": 3}, total=101) == {"big": 25, "small": 76}
    with pytest.raises(ValueError, match="no mixture weight for task"):
        mixture_counts(sizes, weights={"big": 1})
    with pytest.raises(ValueError, match="have a share of the mixture but no rows"):
        mixture_counts({"a": 5, "b": 0}, weights={"a": 1, "b": 1})


def test_mix_upsamples_evenly_and_is_seeded():
    rows = {"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(3)]}
    mixed = mix(rows, weights={"a": 1, "b": 1}, total=20, seed=7)
    counts = Counter(mixed)
    assert sum(counts[r] for r in rows["b"]) == 10 and sorted(counts[r] for r in rows["b"]) == [3, 3, 4]
    assert all(counts[r] <= 1 for r in rows["a"]) and sum(counts[r] for r in rows["a"]) == 10
    assert (
        mixed
        == mix(rows, weights={"a": 1, "b": 1}, total=20, seed=7)
        != mix(rows, weights={"a": 1, "b": 1}, total=20, seed=8)
    )


def test_sources_recipe_rules(tiny_recipe):
    with pytest.raises(RecipeError, match="either data.path .* or data.sources"):
        tiny_recipe("data.sources=[{task: a, path: x.jsonl}]")
    with pytest.raises(RecipeError, match="task name.* a appear more than once"):
        tiny_recipe("data.path=null", "data.sources=[{task: a, path: x}, {task: a, path: y}]")
    with pytest.raises(RecipeError, match="choose one way to mix"):
        tiny_recipe(
            "data.path=null",
            "data.sources=[{task: a, path: x, weight: 1}, {task: b, path: y, weight: 2}]",
            "data.mixture.temperature=2",
        )


def arithmetic_rows(n: int) -> list[dict]:
    return [
        {"prompt": f"What is {i} plus {i + 1}?", "completion": f"{i} plus {i + 1} is {2 * i + 1}."} for i in range(n)
    ]


def test_multitask_prepare_train_eval_per_task(tiny_recipe, tmp_path):
    support = write_jsonl(tmp_path / "support_chats.jsonl", support_rows(6, 4))
    sums = write_jsonl(tmp_path / "sums.jsonl", arithmetic_rows(40) + ["not json"])
    recipe = tiny_recipe(
        "data.path=null",
        f"data.sources=[{{task: support, path: {support}, weight: 1}}, {{task: sums, path: {sums}, weight: 3}}]",
        "data.mixture.total=60",
        "data.dedup.near=false",
        "training.eval_every=4",
        "eval.systems=[base, tuned]",
        "eval.forgetting.enabled=false",
        "eval.max_examples=3",
    )
    report = prepare(recipe)
    run = RunDir(recipe.run_dir)
    assert report["mixture"]["train_rows_mixed"] == {"support": 15, "sums": 45}
    assert report["tasks"]["sums"]["rejected"] == 1 and report["tasks"]["support"]["schema"] == "chat"
    assert report["tasks"]["sums"]["schema"] == "prompt_completion"
    train_rows = read_jsonl(run.split_path("train"))
    assert Counter(r["task"] for r in train_rows) == {"support": 15, "sums": 45}
    test_rows = read_jsonl(run.split_path("test"))
    test_tasks = Counter(r["task"] for r in test_rows)
    assert test_tasks == {
        "support": report["tasks"]["support"]["splits"]["test"],
        "sums": report["tasks"]["sums"]["splits"]["test"],
    }
    rejects = read_jsonl(run.data / "rejects.jsonl")
    assert [r["task"] for r in rejects] == ["sums"] and "sums.jsonl:41" in f"{rejects[0]['file']}:{rejects[0]['line']}"
    text = format_report(report)
    assert "train mixture 45 rows" in text and "mixed by weights" in text
    assert "tasks/sums/data/report.html" in (run.data / "report.html").read_text()

    train(recipe, progress=False)
    result = evaluate(recipe, progress=False)
    assert set(result["tasks"]) == {"support", "sums"} and result["test_examples"] == 6
    for part in result["tasks"].values():
        assert part["test_examples"] == 3
        assert {"answer_loss", "answer_perplexity", "rougeL", "token_f1"} <= set(part["systems"]["tuned"])
    assert "fact_accuracy" in result["tasks"]["support"]["systems"]["tuned"]  # support rows carry must_include
    assert "fact_accuracy" not in result["tasks"]["sums"]["systems"]["tuned"]
    # The overall loss is the token-weighted mean of the tasks' losses: it lies between them.
    losses = [part["systems"]["tuned"]["answer_loss"] for part in result["tasks"].values()]
    assert min(losses) - 1e-3 <= result["systems"]["tuned"]["answer_loss"] <= max(losses) + 1e-3
    predictions = read_jsonl(run.eval / "predictions.jsonl")
    assert {p["task"] for p in predictions} == {"support", "sums"}
    assert "task sums:" in format_table(result)


def test_few_shot_examples_come_from_the_rows_own_task():
    from afina.eval.generative import per_task

    rows = [{"id": "t1", "task": "a"}, {"id": "t2", "task": "b"}, {"id": "t3", "task": "a"}]
    train_rows = [{"id": "x", "task": "a"}, {"id": "y", "task": "b"}, {"id": "x", "task": "a"}]  # x upsampled
    made = per_task(rows, train_rows, lambda test, train: [(t["id"], [r["id"] for r in train]) for t in test])
    assert made == [("t1", ["x"]), ("t2", ["y"]), ("t3", ["x"])]
    assert per_task([{"id": "t"}], [{"id": "x"}], lambda test, train: [len(train)]) == [1]


def test_a_dumped_multitask_recipe_loads_again(tiny_recipe, tmp_path):
    from afina.config import build_recipe

    recipe = tiny_recipe(
        "data.path=null", "data.sources=[{task: a, path: x, weight: 1}, {task: b, path: y, weight: 2}]"
    )
    again = build_recipe(recipe.to_dict(), "dumped", tmp_path)
    assert [s.weight for s in again.data.sources] == [1, 2] and again.data.mixture.temperature is None


def test_domain_prepare_reads_a_jsonl_text_field_and_keeps_long_documents(tiny_recipe, tmp_path):
    docs = [{"doc_id": i, "document": domain_documents(1, 30 if i == 0 else 3, seed=i).strip()} for i in range(12)]
    docs.append({"doc_id": 99, "document": "   "})  # empty after cleaning: rejected with its reason
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    recipe = tiny_recipe(
        "task=domain", f"data.path={data}", "data.fields.text=document", "data.max_length=64", "data.dedup.near=false"
    )
    report = prepare(recipe)
    assert report["schema"] == "text" and report["kept"] == 12 and report["rejected"] == 1
    assert report["tokens"]["max"] > 64 and report["truncation"]["rows_over_max_length"] == 0
    rejects = read_jsonl(RunDir(recipe.run_dir).data / "rejects.jsonl")
    assert rejects[0]["line"] == 13 and rejects[0]["step"] == "clean"
