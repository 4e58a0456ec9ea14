"""Long-context evaluation: passkey retrieval by length and depth, perplexity by position bucket.

Passkey retrieval (after Mohtashami & Jaggi, 2023): a random 5-digit key is stated once inside
long prose, at a chosen depth (0 = the start, 1 = the end of the haystack), and the model is
asked for it at the end. A case counts as retrieved when greedy decoding reproduces the key:
computed in one teacher-forced forward pass (the argmax at every key position is the key's next
token), which is exactly the condition for greedy generation to write the key, without the cost
of generating.

Perplexity by position: long held-out text is cut into sequences of the longest length; the
per-token loss is averaged within position buckets (e.g. 0-1x, 1x-2x, 2x-4x the original window),
so one sees whether tokens far into a long input are predicted as well as early ones.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from afina.eval.haystack import Haystack
from afina.train.loss import _causal_lm_parts

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will ask you about it at the end.\n")
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyCase:
    """One test: token ids of prompt+answer; where the needle starts; the key's tokens at the end."""

    input_ids: list[int]
    key: str
    needle_start: int  # token index where the needle sentence starts
    needle_length: int
    answer_length: int  # the key's tokens, the last ones of input_ids
    length: int
    depth: float


def passkey_case(tokenizer, haystack: Haystack, length: int, depth: float, rng: random.Random) -> PasskeyCase:
    """A passkey test of exactly `length` tokens with the needle at `depth` of the haystack."""
    key = str(rng.randrange(10_000, 100_000))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prefix = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + encode(INSTRUCTION)
    needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
    question, answer = encode(QUESTION), encode(f" {key}")
    filler_tokens = length - len(prefix) - len(needle) - len(question) - len(answer)
    if filler_tokens < 0:
        raise ValueError(f"passkey length {length} is too short for the instruction, needle and question "
                         f"({length - filler_tokens} tokens at least)")
    filler: list[int] = []
    for piece in haystack.take(filler_tokens):
        filler += encode(" " + piece)
    filler = filler[:filler_tokens]
    cut = int(round(depth * filler_tokens))
    ids = prefix + filler[:cut] + needle + filler[cut:] + question + answer
    return PasskeyCase(ids, key, len(prefix) + cut, len(needle), len(answer), length, depth)


@torch.no_grad()
def retrieves_key(model, case: PasskeyCase, autocast) -> tuple[bool, float]:
    """(greedy decoding writes the key, the key's mean log-probability per token)."""
    decoder, head = _causal_lm_parts(model)
    ids = torch.tensor([case.input_ids], device=model.device)
    with autocast():
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    # Positions -n-1 .. -2 predict the n key tokens.
    n = case.answer_length
    logits = head(hidden[0, -n - 1 : -1]).float()
    targets = ids[0, -n:]
    logprob = -F.cross_entropy(logits, targets, reduction="mean")
    return bool((logits.argmax(-1) == targets).all()), float(logprob)


def passkey_grid(model, tokenizer, lengths: list[int], depths: list[float], trials: int, autocast,
                 haystack: Haystack, seed: int, echo=None) -> dict[str, Any]:
    """Accuracy (%) for every length x depth cell, over `trials` keys each."""
    rng = random.Random(seed)
    cells = []
    for length in lengths:
        for depth in depths:
            hits, logprobs = 0, []
            started = time.perf_counter()
            for _ in range(trials):
                case = passkey_case(tokenizer, haystack, length, depth, rng)
                hit, logprob = retrieves_key(model, case, autocast)
                hits += hit
                logprobs.append(logprob)
            cells.append({"length": length, "depth": depth, "trials": trials, "accuracy": 100.0 * hits / trials,
                          "key_logprob": round(sum(logprobs) / len(logprobs), 4),
                          "seconds": round(time.perf_counter() - started, 2)})
            if echo:
                echo(f"  passkey length {length:>6} depth {depth:.2f}: {hits}/{trials}")
    by_length = {str(length): sum(c["accuracy"] for c in cells if c["length"] == length) / len(depths) for length in lengths}
    return {"lengths": lengths, "depths": depths, "trials": trials, "cells": cells, "accuracy_by_length": by_length}


def position_buckets(original: int, longest: int) -> list[tuple[int, int]]:
    """[0, W), [W, 2W), [2W, 4W), ... up to the longest length: the extension's natural buckets."""
    edges = [0, original]
    while edges[-1] < longest:
        edges.append(min(edges[-1] * 2, longest))
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def perplexity_by_position(model, tokenizer, texts: list[str], length: int, buckets: list[tuple[int, int]],
                           max_sequences: int, autocast) -> dict[str, Any]:
    """Per-token perplexity of held-out text within position buckets, over sequences of `length` tokens.

    The texts are joined (separated by the end-of-sequence token) and cut into sequences of
    `length` tokens; the loss of the token at position t (predicted from t tokens before it) is
    counted in the bucket that holds t.
    """
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= length * max_sequences:
            break
    sequences = [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)][:max_sequences]
    if not sequences:
        raise ValueError(f"the held-out text has {len(stream)} tokens, fewer than one sequence of {length}; "
                         "give longer text (context.eval.text) or shorter lengths")
    decoder, head = _causal_lm_parts(model)
    sums = [0.0] * len(buckets)
    counts = [0] * len(buckets)
    for seq in sequences:
        ids = torch.tensor([seq], device=model.device)
        with autocast():
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
        for b, (lo, hi) in enumerate(buckets):
            lo_pred = max(lo, 1) - 1  # position p-1 predicts token p
            losses = F.cross_entropy(head(hidden[lo_pred : hi - 1]).float(), ids[0, lo_pred + 1 : hi], reduction="sum")
            sums[b] += float(losses)
            counts[b] += hi - 1 - lo_pred
    return {
        "sequence_length": length,
        "sequences": len(sequences),
        "buckets": [
            {"from": lo, "to": hi, "tokens": n, "loss": round(s / n, 4), "perplexity": round(math.exp(s / n), 3)}
            for (lo, hi), s, n in zip(buckets, sums, counts)
        ],
    }
