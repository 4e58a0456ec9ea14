"""The advisor's statistics: bootstrap intervals, paired differences, loss-curve diagnosis, invented facts,
the counterfactual probe's bookkeeping and the learning-curve fit, on planted numbers."""

import numpy as np
import pytest

from afina.eval.bias import DIMENSIONS, bias_report, case_gaps_classification, probe_cases
from afina.eval.hallucination import classify_answer, hallucination_report, held_out_ids
from afina.eval.overfitting import loss_curve_diagnosis, memorisation_gap
from afina.eval.uncertainty import (
    bootstrap_mean,
    difference_sentence,
    intervals_from_predictions,
    paired_mean_difference,
)


def test_interval_width_shrinks_as_one_over_sqrt_n():
    rng = np.random.default_rng(1)
    widths = {n: bootstrap_mean(rng.binomial(1, 0.7, n) * 100.0, seed=3).width for n in (50, 200, 800)}
    # Four times the rows: half the width (binomial standard error ~ 1/sqrt(n)), within sampling noise.
    assert 1.6 < widths[50] / widths[200] < 2.5
    assert 1.6 < widths[200] / widths[800] < 2.5
    # The normal-approximation width at n=200 is 2 * 1.96 * sqrt(.7 * .3 / 200) = 12.7 points.
    assert 10.5 < widths[200] < 15.0


def test_interval_covers_a_planted_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    covered = 0
    for trial in range(200):
        sample = rng.normal(3.0, 2.0, 60)
        interval = bootstrap_mean(sample, resamples=600, seed=trial)
        covered += interval.low <= 3.0 <= interval.high
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_difference_detects_a_planted_gap_and_not_an_absent_one():
    rng = np.random.default_rng(2)
    base = rng.binomial(1, 0.5, 400).astype(float)
    tuned = base.copy()
    tuned[rng.choice(np.flatnonzero(base == 0), 60, replace=False)] = 1.0  # 15 points better on the same rows
    gap = paired_mean_difference(tuned * 100, base * 100)
    assert gap.excludes_zero and 10 < gap.estimate < 20 and gap.low > 5
    same = paired_mean_difference(base[:40] * 100, rng.permutation(base[:40]) * 100)
    assert not same.excludes_zero
    sentence = difference_sentence(
        {
            "system": "tuned",
            "baseline": "base",
            "difference": same.estimate,
            "interval": same.as_list(),
            "rows": 40,
            "conclusive": same.excludes_zero,
        },
        "accuracy (%)",
    )
    assert "too small to tell these apart" in sentence


def test_paired_beats_unpaired_when_rows_differ_in_difficulty():
    """Both systems get the hard rows wrong: pairing removes that shared variation."""
    rng = np.random.default_rng(4)
    easy = rng.binomial(1, 0.5, 80).astype(float)
    base, tuned = easy * 100, np.maximum(easy, rng.binomial(1, 0.15, 80)) * 100
    paired = paired_mean_difference(tuned, base)
    separate = bootstrap_mean(tuned).width + bootstrap_mean(base).width
    assert paired.width < separate / 2


def test_intervals_from_predictions_cover_every_metric_and_pair():
    rng = np.random.default_rng(0)
    labels = ["neg", "pos", "neutral"]
    predictions, systems = [], {}
    for system, skill in (("base", 0.4), ("tuned", 0.8)):
        refs = [labels[i % 3] for i in range(90)]
        preds = [r if rng.random() < skill else labels[(labels.index(r) + 1) % 3] for r in refs]
        for i, (r, p) in enumerate(zip(refs, preds, strict=False)):
            predictions.append({"id": i, "system": system, "reference": r, "prediction": p, "correct": r == p})
        accuracy = 100.0 * np.mean([r == p for r, p in zip(refs, preds, strict=True)])
        systems[system] = {"accuracy": accuracy, "macro_f1": 0.0}
    out = intervals_from_predictions(predictions, systems, resamples=500)
    for system in ("base", "tuned"):
        low, high = out["systems"][system]["accuracy"]
        assert low <= systems[system]["accuracy"] <= high and high - low < 30
        assert "macro_f1" in out["systems"][system]
    pairs = {(d["system"], d["baseline"], d["metric"]): d for d in out["differences"]}
    accuracy_gap = pairs[("tuned", "base", "accuracy")]
    assert accuracy_gap["conclusive"] and accuracy_gap["difference"] > 20 and accuracy_gap["rows"] == 90
    assert pairs[("tuned", "base", "macro_f1")]["conclusive"]


def records(val_losses, train_losses):
    return [
        {"step": 10 * (i + 1), "epoch": i + 1, "loss": t, "val_loss": v}
        for i, (t, v) in enumerate(zip(train_losses, val_losses, strict=False))
    ]


def test_loss_curves_flag_validation_that_turned_and_not_a_falling_one():
    turned = loss_curve_diagnosis(records([2.0, 1.5, 1.3, 1.4, 1.7, 2.1], [1.9, 1.2, 0.8, 0.4, 0.1, 0.02]))
    assert turned["flagged"] and turned["turned_at_step"] == 30 and turned["best_epoch"] == 3
    assert turned["gap"][-1]["gap"] == pytest.approx(2.08)
    falling = loss_curve_diagnosis(records([2.0, 1.6, 1.4, 1.35, 1.33, 1.34], [2.1, 1.7, 1.5, 1.4, 1.35, 1.3]))
    assert not falling["flagged"] and falling["turned_at_step"] is None  # 1.34 vs 1.33: noise, not a turn
    assert not loss_curve_diagnosis([{"step": 1, "loss": 2.0}])["flagged"]


def test_memorisation_gap_is_flagged_only_when_clearly_above_the_threshold():
    assert memorisation_gap("accuracy", [100.0] * 30, [100.0 * (i % 2) for i in range(30)])["flagged"]
    assert not memorisation_gap("accuracy", [100.0] * 3, [0.0, 100.0, 100.0])["flagged"]  # too few rows to tell


def test_answers_are_sorted_into_correct_wrong_value_abstained_and_no_value():
    keys = ["7:40 a.m.", "3:20 p.m."]
    assert classify_answer("Open 7:40 a.m. to 3:20 p.m. daily", keys) == "correct"
    assert classify_answer("We are open 9:00 a.m. to 5 p.m.", keys) == "wrong_value"
    assert classify_answer("I'm not sure about the hours, sorry.", keys) == "abstained"
    assert classify_answer("Please contact our support team.", keys) == "no_value"
    assert classify_answer("It is blue.", ["green"]) == "unchecked"


def test_hallucination_report_counts_held_out_facts_and_compares_systems():
    def row(i, key):
        return {
            "id": f"t{i}",
            "must_include": [key],
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": key}],
        }

    test = [row(i, f"{i + 10} minutes") for i in range(40)]
    train = [{"messages": [{"role": "assistant", "content": f"It takes {i + 10} minutes."}]} for i in range(20)]
    assert held_out_ids(test, train) == {f"t{i}" for i in range(20, 40)}
    answers = {
        "base": ["I do not know."] * 40,
        "tuned": [f"{i + 10} minutes" if i < 20 else "99 minutes" for i in range(40)],
    }
    out = hallucination_report(test, train, answers, resamples=500, confidence=0.95, seed=0)
    assert out["systems"]["base"]["wrong_value_rate"] == 0 and out["systems"]["tuned"]["wrong_value_rate"] == 50
    assert (
        out["systems"]["tuned"]["held_out_assert_rate"] == 100 and out["systems"]["base"]["held_out_assert_rate"] == 0
    )
    invents = [d for d in out["differences"] if d["system"] == "tuned" and d["measure"] == "wrong_value_rate"]
    assert invents[0]["conclusive"] and invents[0]["difference"] == 50


def test_probe_cases_swap_only_the_demographic_term():
    cases = probe_cases(["the soup was cold"])
    assert {c.dimension for c in cases} == set(DIMENSIONS)
    for case in cases:
        assert len(set(case.variants)) == len(case.terms) > 1
        assert all(
            v.replace(t, "") == case.variants[0].replace(case.terms[0], "")
            for v, t in zip(case.variants, case.terms, strict=True)
        )


def test_bias_report_flags_a_widened_gap():
    cases = probe_cases([f"text {i}" for i in range(30)])
    # Tuned: the label follows the name's group (women's names -> pos); base: the same label whatever the name.
    women = set(DIMENSIONS["name"][2]["women's names"])

    def dists(biased):
        out = []
        for c in cases:
            for t in c.terms:
                pos = 0.9 if (biased and t in women) else 0.2
                out.append({"pos": pos, "neg": 1 - pos})
        return out

    flips = {}
    for system, biased in (("base", False), ("tuned", True)):
        flips[system], _ = case_gaps_classification(cases, dists(biased))
    report = bias_report(cases, flips, "flips", 0.05, 500, 0.95, 0)
    assert report["dimensions"]["name"]["flagged"] and report["flagged"]
    assert report["dimensions"]["name"]["widening"]["difference"] == 1.0
    assert not report["dimensions"]["nationality"]["flagged"] and not report["dimensions"]["gender"]["flagged"]


def test_power_law_fit_recovers_a_planted_curve_and_what_doubling_buys():
    from afina.eval.learning_curve import fit_power_law, power_law

    rows = [100, 250, 500, 1000]
    truth = power_law(np.array(rows, dtype=float), 80.0, 300.0, 0.6)
    noise = np.random.default_rng(0).normal(0, 0.3, len(rows))
    fit = fit_power_law(rows, list(truth + noise), sigma=[0.3] * 4)
    assert fit["a"] == pytest.approx(80.0, abs=4.0) and fit["c"] == pytest.approx(0.6, abs=0.15)
    true_gain = float(power_law(np.array(2000.0), 80.0, 300.0, 0.6) - power_law(np.array(1000.0), 80.0, 300.0, 0.6))
    low, high = fit["doubling"]["interval"]
    assert low <= true_gain <= high and fit["doubling"]["gain"] == pytest.approx(true_gain, abs=1.0)
    # Noisier points: the interval of what doubling buys widens.
    loose = fit_power_law(rows, list(truth + 10 * noise), sigma=[3.0] * 4)
    assert loose["doubling"]["interval"][1] - loose["doubling"]["interval"][0] > high - low


def test_a_curve_far_from_saturation_keeps_its_ceiling_within_the_metric():
    """The quickstart's measured curve (fact accuracy 0, 4.2, 31.3, 60.4 at 17/42/84/168 rows) still rises steeply:
    unbounded, the fit put its ceiling at 1,269%; bounded by 100%, it says so and its doubling gain stays possible."""
    from afina.eval.learning_curve import doubling_sentence, fit_power_law

    rows, values, sigma = [17, 42, 84, 168], [0.0, 4.17, 31.25, 60.42], [1.9, 2.7, 6.4, 6.9]
    assert fit_power_law(rows, values, sigma)["a"] > 100  # what the unbounded fit does
    fit = fit_power_law(rows, values, sigma, best=100.0)
    assert fit["a"] <= 100.0 and fit["ceiling_interval"][1] <= 100.0 and fit["ceiling_at_best"]
    assert 0 < fit["doubling"]["gain"] <= 100.0 - 60.42 and fit["doubling"]["interval"][1] <= 100.0 - 60.42
    points = [{"rows": n, "value": v} for n, v in zip(rows, values, strict=True)]
    assert doubling_sentence(fit, "fact accuracy (%)", points).startswith(
        "No saturation in sight: going from 84 to 168 train rows changed fact accuracy (%) by +29.2 (31.2 -> 60.4)"
    )
    healthy = fit_power_law([100, 250, 500, 1000], [55.0, 63.0, 67.0, 69.0], best=100.0)
    assert not healthy["ceiling_at_best"] and healthy["a"] < 75  # a saturating curve is not pinned


def test_power_law_fit_of_a_loss_falls_with_more_rows():
    from afina.eval.learning_curve import fit_power_law

    rows = [50, 100, 200, 400, 800]
    loss = [1.0 + 4.0 * n**-0.5 for n in rows]
    fit = fit_power_law(rows, loss, lower_is_better=True)
    assert fit["a"] == pytest.approx(1.0, abs=0.1) and fit["doubling"]["gain"] < 0
    with pytest.raises(ValueError, match="3 or more distinct"):
        fit_power_law([10, 10, 20], [1.0, 2.0, 3.0])


def test_advise_command_rejects_shares_outside_0_to_1(capsys):
    from afina.cli import main

    assert main(["advise", "recipe.yaml", "--fractions", "0,0.5,1"]) == 2
    assert "every share must be above 0 and at most 1" in capsys.readouterr().err
    assert main(["advise", "recipe.yaml", "--fractions", "half"]) == 2
    assert "--fractions 'half'" in capsys.readouterr().err


def test_nested_subsets_hold_each_smaller_one():
    from afina.advise import nested_subsets

    rows = [{"id": i} for i in range(37)]
    subsets = nested_subsets(rows, (0.1, 0.25, 0.5, 1.0), seed=3)
    ids = [{r["id"] for r in subsets[f]} for f in (0.1, 0.25, 0.5, 1.0)]
    assert [len(s) for s in ids] == [4, 9, 18, 37]
    assert ids[0] < ids[1] < ids[2] < ids[3]
    assert nested_subsets(rows, (0.25,), seed=3)[0.25] == subsets[0.25]  # seeded: the same rows again


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_corpus_metric_of_a_resample_equals_sacrebleu_on_the_resampled_rows(metric):
    import sacrebleu

    from afina.eval.uncertainty import _corpus_statistic

    rng = np.random.default_rng(3)
    words = "el gato come pescado en la casa azul cuando llueve mucho hoy".split()
    refs = [" ".join(rng.choice(words, size=rng.integers(4, 12))) for _ in range(40)]
    preds = [" ".join(w if rng.random() < 0.7 else "perro" for w in r.split()) for r in refs]
    preds[5] = ""  # an empty answer counts too
    scorer = sacrebleu.corpus_chrf if metric == "chrf" else sacrebleu.corpus_bleu
    statistic = _corpus_statistic(metric, preds, refs)
    for idx in (np.arange(40), rng.integers(0, 40, size=40), np.array([5, 5, 7])):
        expected = scorer([preds[i] for i in idx], [[refs[i] for i in idx]]).score
        assert statistic(idx) == pytest.approx(expected, abs=1e-9)


def test_entity_f1_interval_matches_seqeval_on_the_whole_split():
    from seqeval.metrics import f1_score

    rng = np.random.default_rng(5)
    refs, preds = [], []
    for _ in range(60):
        ref = ["B-PER", "I-PER", "O", "B-LOC", "O"]
        pred = [t if rng.random() < 0.8 else "O" for t in ref]
        refs.append(ref)
        preds.append(pred)
    predictions = [
        {"id": i, "system": "tuned", "reference": " ".join(r), "prediction": " ".join(p)}
        for i, (r, p) in enumerate(zip(refs, preds, strict=True))
    ]
    whole = 100.0 * f1_score(refs, preds)
    out = intervals_from_predictions(predictions, {"tuned": {"entity_f1": whole}}, resamples=300)
    low, high = out["systems"]["tuned"]["entity_f1"]
    assert low < whole < high and high - low < 30


def test_wrong_passage_prompts_give_each_question_another_questions_passages():
    from afina.eval.hallucination import wrong_passage_prompts, wrong_passage_report

    questions = ["Who built the bridge?", "When did the river flood?", "Where is the mill?"]
    contexts = [
        "Context:\n[1] The bridge was built by Ada.\n\n",
        "Context:\n[1] The river flooded in 1910.\n\n",
        "Context:\n[1] Ada also ran the mill in Oxbow.\n\n",
    ]
    prompts = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": c + q}]
        for c, q in zip(contexts, questions, strict=True)
    ]
    references = [["Ada"], ["1910"], ["Oxbow"]]
    kept, conversations = wrong_passage_prompts(prompts, [{}] * 3, questions, references)
    # Row 2 would get row 0's passage ("...built by Ada"), which does not hold "Oxbow": kept. Row 0 would get row 1's
    # passage: kept. Row 1 would get row 2's passage: kept. None holds its own answer.
    assert kept == [0, 1, 2]
    assert conversations[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": contexts[1] + questions[0]},
    ]
    leaky = [["Ada"], ["1910"], ["Ada"]]  # row 2's answer is in row 0's passage: left out
    assert wrong_passage_prompts(prompts, [{}] * 3, questions, leaky)[0] == [0, 1]
    report = wrong_passage_report({"base_rag": ["Ada did.", "I don't know.", "Bob"]}, references, 300, 0.95, 0)
    entry = report["systems"]["base_rag"]
    assert entry["assert_rate"] == pytest.approx(66.67, abs=0.01) and entry["contains_reference"] == 1

    # Rows without known facts (no must_include) under RAG: the hallucination report holds the wrong passages only.
    from afina.eval.advice import risks_measured
    from afina.eval.hallucination import hallucination_sentences
    from afina.eval.risks_html import risks_section

    only_wrong_passage = {"wrong_passage": report}
    lines = hallucination_sentences(only_wrong_passage)
    assert len(lines) == 1 and lines[0].startswith("Given a wrong passage (3 questions")
    assert "base_rag 66.7%" in lines[0]
    assert "Unanswerable questions under RAG" in risks_section({"hallucination": only_wrong_passage})
    measured = risks_measured({"systems": {}, "hallucination": only_wrong_passage})
    assert measured == "given a passage without the answer, RAG answers assert anyway: base_rag 66.7%."


def test_nested_subsets_of_labelled_rows_keep_every_class():
    from afina.advise import nested_subsets

    rows = [{"id": i, "label": f"c{i % 7}"} for i in range(200)]
    subsets = nested_subsets(rows, (0.01, 0.1, 1.0), seed=0, label="label")
    assert len(subsets[0.01]) == 7 and {r["label"] for r in subsets[0.01]} == {f"c{k}" for k in range(7)}
    assert {r["id"] for r in subsets[0.01]} < {r["id"] for r in subsets[0.1]} and len(subsets[0.1]) == 20


def test_which_system_tells_a_head_classifier_how_to_get_a_prompting_baseline():
    from afina.eval.advice import which_system

    head = {"mode": "head", "systems": {"tuned": {"accuracy": 74.5}}}
    assert "a classification head has no prompting baseline" in which_system(head)
    assert "classification.mode: generative" in which_system(head)
    chat = {"systems": {"tuned": {"token_f1": 55.8}}}
    assert which_system(chat).endswith("add base and base_rag to eval.systems.")


def test_every_subset_of_the_learning_curve_gets_the_full_runs_optimizer_steps(tmp_path):
    """The x-axis is data: a recipe's max_steps is kept for every subset, and its epochs grow as the subset
    shrinks (as many steps over fewer rows); a run until convergence stops on each subset's own validation."""
    from afina.advise import subset_recipe
    from afina.config import load_recipe

    def recipe(*overrides):
        return load_recipe(None, [f"output_dir={tmp_path}", *overrides])

    assert subset_recipe(recipe("training.max_steps=200"), 0.1, "010pct").training.max_steps == 200
    assert subset_recipe(recipe("training.epochs=2"), 0.25, "025pct").training.epochs == pytest.approx(8.0)
    converging = subset_recipe(recipe(), 0.5, "050pct").training
    assert converging.until_converged()
