"""Generative classification's constrained scoring, measured: each label scored as its own whole sequence
(prompt + label, afina before, and the way lm-eval-harness-style multiple choice does it) against the prompt run
once with every label reading its cached keys and values (afina's score_rows now), on the default model.

Same rows, same batch size, same process; prints rows per second of each, the ratio, and the largest difference
between the two methods' label log-probabilities (they compute the same number).

    flock /tmp/afina-bench.lock python bench/bench_label_scoring.py --rows 96
    flock /tmp/afina-bench.lock python bench/bench_label_scoring.py --dataset banking77 --rows 48
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from afina.config import load_recipe
from afina.device import autocast_factory
from afina.models import load_model, load_tokenizer
from afina.tasks import classification
from afina.train.loss import label_logprobs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {  # name -> (file, text field, label field, rows kept by (field, value) or None)
    "tweeteval": ("sentiment_tweeteval.jsonl", "text", "label", ("split", "validation")),
    "banking77": ("intent_banking77_test.jsonl", "text", "intent", None),
}


def read_rows(name: str) -> tuple[list[dict[str, str]], list[str]]:
    file, text, label, keep = DATASETS[name]
    rows = [json.loads(line) for line in (DATA / file).read_text().splitlines()]
    if keep:
        rows = [r for r in rows if r[keep[0]] == keep[1]]
    return [{"text": r[text], "label": r[label]} for r in rows], sorted({r[label] for r in rows})


def whole_sequences(model, tokenizer, rows, labels, recipe, autocast, batch_size: int) -> list[list[float]]:
    """Every (row, label) pair as one sequence, batch_size sequences per forward pass."""
    encoded = [e for group in classification.label_groups(tokenizer, rows, labels, recipe) for e in group]
    flat = label_logprobs(model, encoded, tokenizer.pad_token_id, batch_size, autocast)
    return [flat[i * len(labels) : (i + 1) * len(labels)] for i in range(len(rows))]


def shared_prompt(model, tokenizer, rows, labels, recipe, autocast, batch_size: int) -> list[list[float]]:
    scored = classification.score_rows(model, tokenizer, rows, labels, recipe, autocast, batch_size)
    return [[s["label_logprobs"][label] for label in labels] for s in scored]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="tweeteval")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=48, help="sequences (whole) / prompts (shared) per pass")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    rows, labels = read_rows(args.dataset)
    rows = rows[: args.rows]
    recipe = load_recipe(None, ["task=classification", f"model.name={args.model}"])
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    model.eval()
    autocast = autocast_factory("fp32", torch.device("cpu"))
    shared_prompt(model, tokenizer, rows[:2], labels, recipe, autocast, args.batch_size)  # warm-up
    results = {}
    for name, method in (("whole sequences", whole_sequences), ("shared prompt", shared_prompt)):
        began = time.perf_counter()
        scores = method(model, tokenizer, rows, labels, recipe, autocast, args.batch_size)
        results[name] = (scores, time.perf_counter() - began)
    (before, t_before), (after, t_after) = results["whole sequences"], results["shared prompt"]
    gap = max(abs(a - b) for ra, rb in zip(before, after) for a, b in zip(ra, rb))
    agree = sum(ra.index(max(ra)) == rb.index(max(rb)) for ra, rb in zip(before, after))
    print(
        f"{args.dataset}: {len(rows)} rows x {len(labels)} labels, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}"
    )
    print("| method | seconds | rows/s |")
    print("|---|---:|---:|")
    for name, (_, seconds) in results.items():
        print(f"| {name} | {seconds:.1f} | {len(rows) / seconds:.2f} |")
    print(f"shared prompt / whole sequences speed: {t_before / t_after:.2f}x")
    print(f"largest label log-probability difference: {gap:.5f} nats; same predicted label on {agree}/{len(rows)}")


if __name__ == "__main__":
    main()
