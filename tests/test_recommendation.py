"""The recommendation's headline follows its intervals: a system is called better only where the paired interval
excludes zero; otherwise the systems are tied on the test split, and the clearly cheaper one is recommended."""

import random

from afina.eval.risks import headline_pairs, risk_sentences
from afina.eval.summary import recommend
from afina.eval.uncertainty import intervals_from_predictions


def planted(scores: dict[str, list[float]], wall_s: dict[str, float]) -> dict:
    """A report over per-row token F1 scores (one list per system, the same rows), as eval builds it."""
    systems = {s: {"token_f1": sum(v) / len(v)} for s, v in scores.items()}
    predictions = [
        {"system": s, "id": i, "token_f1": value} for s, values in scores.items() for i, value in enumerate(values)
    ]
    report = {
        "systems": systems,
        "efficiency": {
            s: {"wall_s": w, "latency_p50_s": w / 10, "cost_per_1k_requests": w / 100} for s, w in wall_s.items()
        },
    }
    report["intervals"] = intervals_from_predictions(
        predictions, systems, resamples=2000, seed=0, pairs=headline_pairs(systems)
    )
    return report


def noisy(rng: random.Random, mean: float, n: int = 80) -> list[float]:
    return [min(100.0, max(0.0, rng.gauss(mean, 25))) for _ in range(n)]


def test_a_difference_whose_interval_crosses_zero_is_a_tie_everywhere_the_headline_is_said():
    rng = random.Random(0)
    base = noisy(rng, 22)
    tuned = noisy(rng, 36)
    tuned_rag = [min(100.0, t + rng.gauss(0.05, 3)) for t in tuned]  # the same answers, give or take
    base_rag = [min(100.0, t - 2 + rng.gauss(0, 12)) for t in tuned]
    report = planted(
        {"base": base, "base_rag": base_rag, "tuned": tuned, "tuned_rag": tuned_rag},
        {"base": 10, "base_rag": 30, "tuned": 10, "tuned_rag": 32},
    )
    best = max(report["systems"], key=lambda s: report["systems"][s]["token_f1"])
    lines = recommend(report)
    headline = lines[0]
    assert headline.startswith(f"Best quality on token F1 (%): {best}")
    assert "tied on this test split with" in headline and "the paired interval includes zero" in headline
    assert "better than base (" in headline  # the clear gap is called
    tied_tuned = "tuned" if best == "tuned_rag" else "tuned_rag"
    assert tied_tuned in headline.split("tied on this test split with")[1]
    assert any(line.startswith("Recommended among the tied: tuned,") for line in lines)
    assert any("Fine-tuning (tuned) and the best prompting-only system (base_rag) are tied" in line for line in lines)
    assert not any("beats" in line for line in lines)
    # The sentences about differences list the stated pairs only, not the headline's extra comparisons.
    stated = [line for line in risk_sentences(report) if " - " in line]
    assert all(
        line.split(" on ")[0] in {"tuned - base", "tuned - base_rag", "tuned_rag - tuned", "tuned_rag - base_rag"}
        for line in stated
    )


def test_a_clear_gap_is_called_better_with_its_interval():
    rng = random.Random(1)
    report = planted(
        {"base": noisy(rng, 10), "base_fewshot": noisy(rng, 30), "tuned": noisy(rng, 70)},
        {"base": 10, "base_fewshot": 12, "tuned": 10},
    )
    lines = recommend(report)
    assert lines[0].startswith("Best quality on token F1 (%): tuned")
    assert "better than base (" in lines[0] and "base_fewshot (" in lines[0] and "tied" not in lines[0]
    assert any(
        "Fine-tuning (tuned) is better than the best prompting-only system (base_fewshot)" in line for line in lines
    )
    assert not any(line.startswith("Recommended among the tied") for line in lines)


def test_the_answer_budget_covers_long_references_unless_the_recipe_sets_one(tokenizer):
    from afina.eval.generate import answer_budget

    references = [" ".join(["the filter needs rinsing"] * (10 + i)) for i in range(40)]  # ~40 to ~200 tokens
    lengths = sorted(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    derived = answer_budget(None, tokenizer, references)
    assert derived.source == "references" and derived.tokens >= lengths[int(0.95 * len(lengths))]
    assert derived.tokens > 64  # the old fixed default would have cut most of them
    assert "95th percentile" in derived.describe()
    assert answer_budget(None, tokenizer, references, window=256).tokens == 128  # half the model's window
    assert answer_budget(48, tokenizer, references).tokens == 48  # the recipe's own number is kept


def test_answers_cut_at_the_cap_are_reported_per_system_everywhere(tiny_recipe):
    """The tiny random model never stops by itself: with a cap of 6 tokens every answer is cut, and the table,
    metrics.json, the report and the recommendation say so per system."""
    import json

    from afina.eval.summary import format_table
    from afina.pipeline import evaluate, prepare
    from afina.rundir import RunDir

    recipe = tiny_recipe("eval.max_new_tokens=6", "eval.systems=[base,base_fewshot]", "eval.forgetting.enabled=false")
    prepare(recipe)
    report = evaluate(recipe, progress=False)
    cut = report["answer_length"]["cut"]
    n = report["test_examples"]
    assert report["answer_length"]["max_new_tokens"] == 6 and "eval.max_new_tokens" in report["answer_length"]["how"]
    assert set(cut) == {"base", "base_fewshot"} and all(c["answers"] == n and c["cut"] >= n // 2 for c in cut.values())
    headline, warning = report["recommendation"][:2]
    assert headline.startswith("Best quality") and warning.startswith("Answers cut short: base ")
    assert "6-token cap" in warning and "base_fewshot" in warning
    run = RunDir(recipe.run_dir)
    assert json.loads((run.eval / "metrics.json").read_text())["answer_length"]["cut"] == cut
    assert "answers cut at 6 new tokens" in (run.eval / "report.html").read_text()
    assert "answers cut at 6 tok" in format_table(report)


def test_every_phase_of_eval_after_generation_says_what_it_does(tiny_recipe, capsys):
    """The forgetting probe, intervals, memorisation, hallucination and writing each announce themselves (the
    probe with a bar per batch), so `afina eval` is never silent for minutes after the answers are generated."""
    from afina.pipeline import evaluate, prepare, train

    recipe = tiny_recipe("training.max_steps=2", "eval.systems=[base,tuned]", "eval.forgetting.max_questions=6")
    prepare(recipe)
    train(recipe, progress=False)
    capsys.readouterr()
    evaluate(recipe, progress=True)
    err = capsys.readouterr().err
    phases = [
        "eval: forgetting probe, 6 general-knowledge questions",
        "forgetting probe (base)",
        "forgetting probe (tuned)",
        "eval: bootstrap intervals",
        "eval: memorisation check",
        "eval: hallucination check",
        "eval: writing eval/metrics.json",
    ]
    positions = [err.find(phase) for phase in phases]
    assert all(p >= 0 for p in positions), [phase for phase, p in zip(phases, positions) if p < 0]
    assert positions == sorted(positions)
