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
