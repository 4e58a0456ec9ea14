"""Every use-case recipe of examples/use_cases/ end to end on a tiny slice of its real data: the recipe as
written (its mapping, splits, systems and metrics), with the tiny model, a few rows and two steps, so none
can rot. Skipped, with the reason, where ../shared/data is absent."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from afina.config import load_recipe
from afina.pipeline import run_stage
from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
USE_CASES = ROOT / "examples" / "use_cases"
DATA = (ROOT / ".." / "shared" / "data").resolve()

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"the shared datasets are not here ({DATA})")


def read_rows(name: str) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def first_documents(rows: list[dict], n: int) -> list[dict]:
    docs: list[str] = []
    out = []
    for row in rows:
        if row["doc_id"] not in docs:
            if len(docs) == n:
                break
            docs.append(row["doc_id"])
        out.append(row)
    return out


def banking_slice() -> dict[str, list[dict]]:
    intents = ["card_arrival", "lost_or_stolen_card", "top_up_failed"]
    train = [r for i in intents for r in [r for r in read_rows("intent_banking77_train.jsonl") if r["intent"] == i][:8]]
    test = [r for i in intents for r in [r for r in read_rows("intent_banking77_test.jsonl") if r["intent"] == i][:2]]
    return {"path": train, "test_path": test}


def tweets_slice() -> dict[str, list[dict]]:
    rows = read_rows("sentiment_tweeteval.jsonl")
    pool = [r for r in rows if r["split"] == "test"]
    held = [r for r in rows if r["split"] == "validation"]
    pick = [r for label in ("negative", "neutral", "positive") for r in [r for r in pool if r["label"] == label][:6]]
    return {"path": pick + [r for r in held if r["label"] != "neutral"][:4]}


def mbpp_slice() -> dict[str, list[dict]]:
    rows = {r["task_id"]: r for r in read_rows("code_mbpp.jsonl")}
    return {"path": [rows[i] for i in (*range(1, 5), *range(11, 14), *range(601, 613))]}


def tools_slice() -> dict[str, list[dict]]:
    """Short rows of both sources: single and parallel xLAM calls, Glaive chats with a tool result or no call."""
    rows = read_rows("tools_train.jsonl")
    short = [r for r in rows if len(json.dumps(r)) < 1400]
    xlam = [r for r in short if r["source"].startswith("xlam")][:14]
    glaive = [r for r in short if r["source"].startswith("glaive")][:6]
    return {"path": xlam + glaive}


SLICES: dict[str, tuple[Callable[[], dict[str, list[dict]]], list[str]]] = {
    "customer_service_banking77": (
        banking_slice,
        ["eval.max_examples=6", "data.split={train: 0.7, validation: 0.3, test: 0.0}"],
    ),
    "summaries_dialogsum": (
        lambda: {
            "path": read_rows("summarization_dialogsum_dev.jsonl")[:12],
            "test_path": read_rows("summarization_dialogsum_test.jsonl")[:3],
        },
        [],
    ),
    "house_style_headlines": (
        lambda: {"path": first_documents(read_rows("translation_ntrex128_en_es.jsonl"), 10)},
        ["data.max_length=512", "eval.max_examples=2"],
    ),
    "social_sentiment_tweeteval": (tweets_slice, ["eval.max_examples=4"]),
    "code_generation_mbpp": (mbpp_slice, ["eval.max_new_tokens=24", "eval.sandbox.time_limit_s=5"]),
    "translation_ntrex_en_es": (
        lambda: {"path": first_documents(read_rows("translation_ntrex128_en_es.jsonl"), 8)},
        [],
    ),
    "agent_tools_xlam_glaive": (
        tools_slice,
        [
            "data.split={train: 0.7, validation: 0.1, test: 0.2}",
            "eval.max_new_tokens=24",
            "eval.few_shot.k=1",
            "eval.report=true",
        ],
    ),
}


def test_every_use_case_recipe_is_covered():
    assert sorted(p.stem for p in USE_CASES.glob("*.yaml")) == sorted(SLICES)


@pytest.mark.parametrize("name", sorted(SLICES))
def test_use_case_recipe_runs_end_to_end_on_a_slice(name, tmp_path, tiny_model_dir):
    make_slice, extra = SLICES[name]
    paths = [f"data.{key}={write_jsonl(tmp_path / f'{key}.jsonl', rows)}" for key, rows in make_slice().items()]
    recipe = load_recipe(
        USE_CASES / f"{name}.yaml",
        [
            f"output_dir={tmp_path / 'runs'}",
            f"model.name={tiny_model_dir}",
            *paths,
            "training.max_steps=2",
            "training.batch_size=2",
            "training.eval_every=null",
            "training.precision=fp32",
            "training.tensorboard=false",
            "training.plots=false",
            "eval.max_examples=3",
            "eval.max_new_tokens=8",
            "eval.batch_size=4",
            "eval.few_shot.selection=random",  # MiniLM retrieval is tested elsewhere; here it only adds time
            "eval.rag.retriever=bm25",
            "eval.forgetting.enabled=false",
            "eval.risks.bias=false",
            "eval.risks.memorisation_rows=0",
            "eval.risks.unanswerable_rows=0",
            "eval.risks.resamples=100",
            "eval.report=false",
            *extra,
        ],
    )
    # prepare, train and eval as `afina run` does them; export (adapter) is the same for every recipe and is
    # tested in test_eval_export.py.
    prepared, trained, evaluated = (
        run_stage(stage, recipe, lambda line: None) for stage in ("prepare", "train", "eval")
    )
    assert prepared["splits"]["train"] > 0 and prepared["splits"]["test"] > 0
    assert trained["steps"] == 2
    systems = evaluated["systems"]
    wanted = [s for s in recipe.eval.systems if recipe.task in ("chat", "tools") or s in ("base", "tuned")]
    if recipe.task == "classification" and recipe.classification.mode == "head":
        wanted = ["tuned"]
    assert list(systems) == wanted
    metrics = set.intersection(*(set(scores) for scores in systems.values()))
    expected = {
        "customer_service_banking77": {"accuracy", "macro_f1", "in_scope_flagged"},
        "summaries_dialogsum": {"rougeL", "words_mean", "length_ratio"},
        "house_style_headlines": {"rougeL", "chrf"},
        "social_sentiment_tweeteval": {"accuracy", "macro_f1"},
        "code_generation_mbpp": {"pass@1"},
        "translation_ntrex_en_es": {"bleu", "chrf"},
        "agent_tools_xlam_glaive": {"call_decision"},
    }[name]
    assert expected <= metrics
    if recipe.task == "tools":  # every system's tool metrics carry their bootstrap interval
        assert all("call_decision" in evaluated["intervals"]["systems"][s] for s in wanted)
