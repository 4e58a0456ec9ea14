"""The zero-shot classification baseline with and without contextual calibration, on the same rows.

A base model asked to pick one of the labels its instruction lists tends to answer the first one: on
TweetEval the default model answered `negative` (listed first) for 93% of tweets, 19.2% accuracy, below
chance. `afina eval` now divides out the model's label prior measured on content-free inputs
(classification.calibrate_zero_shot). This bench scores the recipe's own test rows (its eval.max_examples
sample) with the base model, raw and calibrated, in one process:

    python bench/bench_zero_shot_calibration.py                        # TweetEval sentiment (the use case)
    python bench/bench_zero_shot_calibration.py --recipe examples/use_cases/customer_service_banking77.yaml

Prints accuracy and macro-F1 (with 95% bootstrap intervals of accuracy), and how the answers spread over
the labels, beside the test split's own label shares. Prepares the recipe's data first if needed.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from afina.config import load_recipe
    from afina.device import autocast_factory, pick_device, recipe_weight_dtype, resolve_precision
    from afina.eval.metrics import label_metrics
    from afina.eval.sample import eval_rows
    from afina.eval.uncertainty import bootstrap_mean
    from afina.models import load_model, load_tokenizer
    from afina.pipeline import prepare
    from afina.rundir import RunDir, read_jsonl
    from afina.tasks import classification

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "examples/use_cases/social_sentiment_tweeteval.yaml"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    run = RunDir(recipe.run_dir)
    if not run.split_path("test").is_file():
        prepare(recipe)
    rows = eval_rows(recipe)
    labels = classification.label_set(recipe, read_jsonl(run.split_path("train")))
    rows = [row for row in rows if row["label"] in labels]
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    model = load_model(recipe.model.name, recipe_weight_dtype(recipe, device)).to(device).eval()
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)
    began = time.perf_counter()
    with torch.no_grad():
        raw = classification.score_rows(model, tokenizer, rows, labels, recipe, autocast, recipe.eval.batch_size)
        prior = classification.label_prior(model, tokenizer, labels, recipe, autocast)
    seconds = time.perf_counter() - began
    references = [row["label"] for row in rows]
    truth = Counter(references)
    print(f"{args.recipe}: {len(rows)} test rows, labels in the instruction's order: {', '.join(labels)}")
    print("label prior on content-free inputs: " + ", ".join(f"{k} {v:.3f}" for k, v in prior.items()))
    for name, predicted in (("raw", raw), ("calibrated", classification.calibrated(raw, prior))):
        answers = [p["predicted_label"] for p in predicted]
        scores = label_metrics(references, answers, labels)
        correct = [100.0 * (a == r) for a, r in zip(answers, references)]
        low, high = bootstrap_mean(correct).as_list()
        spread = Counter(answers)
        shares = ", ".join(f"{k} {100 * spread[k] / len(answers):.0f}%" for k in labels)
        print(
            f"{name:>10}: accuracy {scores['accuracy']:.1f} [{low:.1f}, {high:.1f}], "
            f"macro-F1 {scores['macro_f1']:.1f}; answers {shares}"
        )
    print("test split: " + ", ".join(f"{k} {100 * truth[k] / len(rows):.0f}%" for k in labels))
    print(f"scoring time {seconds:.0f} s ({device}, {resolve_precision(recipe.training.precision, device)})")


if __name__ == "__main__":
    main()
