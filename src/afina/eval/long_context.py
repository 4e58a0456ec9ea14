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

from afina.eval.haystack import Haystack
from afina.train.loss import causal_lm_parts, cross_entropy_sum, hidden_loss_sum

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will ask you about it at the end.\n"
)
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
        from afina.config import RecipeError

        raise RecipeError(
            f"context.eval.lengths: passkey length {length} is too short for the instruction, needle "
            f"and question ({length - filler_tokens} tokens at least); give longer lengths"
        )
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
    decoder, head = causal_lm_parts(model)
    ids = torch.tensor([case.input_ids], device=model.device)
    with autocast():
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
    # Positions -n-1 .. -2 predict the n key tokens.
    n = case.answer_length
    logits = head(hidden[0, -n - 1 : -1]).float()
    targets = ids[0, -n:]
    logprob = -cross_entropy_sum(logits, targets) / n
    return bool((logits.argmax(-1) == targets).all()), float(logprob)


def passkey_grid(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int,
    autocast,
    haystack: Haystack,
    seed: int,
    echo=None,
) -> dict[str, Any]:
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
            cells.append(
                {
                    "length": length,
                    "depth": depth,
                    "trials": trials,
                    "accuracy": 100.0 * hits / trials,
                    "key_logprob": round(sum(logprobs) / len(logprobs), 4),
                    "seconds": round(time.perf_counter() - started, 2),
                }
            )
            if echo:
                echo(f"  passkey length {length:>6} depth {depth:.2f}: {hits}/{trials}")
    by_length = {
        str(length): sum(c["accuracy"] for c in cells if c["length"] == length) / len(depths) for length in lengths
    }
    return {"lengths": lengths, "depths": depths, "trials": trials, "cells": cells, "accuracy_by_length": by_length}


def position_buckets(original: int, longest: int) -> list[tuple[int, int]]:
    """[0, W), [W, 2W), [2W, 4W), ... up to the longest length: the extension's natural buckets."""
    edges = [0, min(original, longest)]
    while edges[-1] < longest:
        edges.append(min(edges[-1] * 2, longest))
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def perplexity_by_position(
    model, tokenizer, texts: list[str], length: int, buckets: list[tuple[int, int]], max_sequences: int, autocast
) -> dict[str, Any]:
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
        raise ValueError(
            f"the held-out text has {len(stream)} tokens, fewer than one sequence of {length}; "
            "give longer text (context.eval.text) or shorter lengths"
        )
    decoder, head = causal_lm_parts(model)
    sums = [0.0] * len(buckets)
    counts = [0] * len(buckets)
    for seq in sequences:
        ids = torch.tensor([seq], device=model.device)
        with autocast():
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
        for b, (lo, hi) in enumerate(buckets):
            lo_pred = max(lo, 1) - 1  # position p-1 predicts token p
            sums[b] += hidden_loss_sum(head, hidden[lo_pred : hi - 1], ids[0, lo_pred + 1 : hi])
            counts[b] += hi - 1 - lo_pred
    return {
        "sequence_length": length,
        "sequences": len(sequences),
        "buckets": [
            {"from": lo, "to": hi, "tokens": n, "loss": round(s / n, 4), "perplexity": round(math.exp(s / n), 3)}
            for (lo, hi), s, n in zip(buckets, sums, counts)
        ],
    }


# ---- the stage --------------------------------------------------------------------------------

SYSTEM_LABELS = {
    "base": "base (no scaling)",
    "base_scaled": "base + rope scaling, not fine-tuned",
    "tuned": "extended (rope scaling + fine-tuning)",
}


def default_lengths(original: int) -> list[int]:
    return [original, 2 * original, 4 * original]


def held_out_texts(recipe, run) -> list[str]:
    """Long text for perplexity: context.eval.text, else the test split's rows (text, or chat turns joined)."""
    from afina.eval.haystack import file_paragraphs
    from afina.rundir import read_jsonl

    cfg = recipe.context.eval
    if cfg.text:
        return file_paragraphs(recipe.resolve_path(cfg.text))
    rows = read_jsonl(run.require(run.split_path("test"), "prepare"))
    return [row["text"] if "text" in row else "\n".join(m["content"] for m in row["messages"]) for row in rows]


def _load_system(system: str, recipe, run, rope, device):
    from afina.device import recipe_weight_dtype
    from afina.models import load_model, load_trained

    dtype = recipe_weight_dtype(recipe, device)
    if system == "base":
        return load_model(recipe.model.name, dtype).to(device)
    if system == "base_scaled":
        return load_model(recipe.model.name, dtype, rope=rope).to(device)
    return load_trained(run.root, recipe.model.name, device, dtype, full=recipe.method.type == "full")


def evaluate_long_context(recipe, echo=print) -> dict[str, Any]:
    """Passkey accuracy by length x depth and perplexity by position for each system; writes
    eval/long_context.json and eval/long_context.html (heat map) and returns the results."""
    import gc

    from afina.device import autocast_factory, peak_memory_mb, pick_device, resolve_precision
    from afina.models import load_tokenizer, recipe_rope_settings
    from afina.models.rope import read_rope_settings
    from afina.rundir import RunDir, write_json_atomic

    run = RunDir(recipe.run_dir)
    cfg = recipe.context.eval
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)
    # The settings the model was trained with (saved beside the adapter), else what the recipe asks.
    rope = (read_rope_settings(run.adapter) if run.adapter.is_dir() else None) or recipe_rope_settings(recipe)
    if rope is None:
        raise ValueError(
            "the long-context evaluation needs context.rope_scaling (linear, dynamic or yarn) in the recipe"
        )
    original = rope["original_length"]
    lengths = sorted(cfg.lengths or default_lengths(original))
    haystack_path = recipe.resolve_path(cfg.haystack) if cfg.haystack else None
    texts = held_out_texts(recipe, run) if cfg.perplexity else []
    buckets = position_buckets(original, lengths[-1])
    result: dict[str, Any] = {
        "rope_scaling": rope,
        "original_window": original,
        "lengths": lengths,
        "depths": cfg.depths,
        "haystack": None,
        "systems": {},
    }
    for system in cfg.systems:
        if system == "tuned" and not (run.adapter.is_dir() or run.model.is_dir()):
            echo("  long-context: no trained model yet (run `afina train`); skipping 'tuned'")
            continue
        echo(f"long-context eval: {SYSTEM_LABELS[system]}")
        started = time.perf_counter()
        model = _load_system(system, recipe, run, rope, device).eval()
        haystack = Haystack(
            tokenizer, haystack_path, seed=recipe.seed, field=cfg.haystack_field
        )  # the same haystacks and keys for every system
        result["haystack"] = haystack.provenance
        entry: dict[str, Any] = {
            "passkey": passkey_grid(
                model, tokenizer, lengths, cfg.depths, cfg.trials, autocast, haystack, recipe.seed, echo
            )
        }
        if cfg.perplexity:
            entry["perplexity"] = perplexity_by_position(
                model, tokenizer, texts, lengths[-1], buckets, cfg.max_sequences, autocast
            )
        entry["wall_time_s"] = round(time.perf_counter() - started, 1)
        entry["peak_memory_mb"] = round(peak_memory_mb(device), 1)
        result["systems"][system] = entry
        del model
        gc.collect()
    write_json_atomic(run.eval / "long_context.json", result)
    write_long_context_page(run, result, recipe.name)
    return result


def format_long_context(result: dict[str, Any]) -> str:
    """A text table: passkey accuracy by length (mean over depths) and perplexity by bucket, per system."""
    lengths = result["lengths"]
    original = result["original_window"]
    head = f"{'system':<40}" + "".join(f"{f'{n} ({n / original:g}x)':>14}" for n in lengths)
    lines = ["passkey retrieval accuracy (%) by length, mean over depths:", head]
    for system, entry in result["systems"].items():
        by_length = entry["passkey"]["accuracy_by_length"]
        lines.append(f"{SYSTEM_LABELS[system]:<40}" + "".join(f"{by_length[str(n)]:>14.1f}" for n in lengths))
    if any("perplexity" in e for e in result["systems"].values()):
        lines.append("perplexity by token position:")
        for system, entry in result["systems"].items():
            if "perplexity" in entry:
                cells = ", ".join(
                    f"{b['from']}-{b['to']}: {b['perplexity']:.2f}" for b in entry["perplexity"]["buckets"]
                )
                lines.append(f"  {SYSTEM_LABELS[system]:<38} {cells}")
    return "\n".join(lines)


def heatmap_html(result: dict[str, Any]) -> str:
    """Accuracy by length (columns) x depth (rows), one panel per system, as an embedded PNG."""
    import matplotlib

    from afina.plots import img_tag

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(result["systems"])
    if not systems:
        return "<p>No system evaluated.</p>"
    lengths, depths, original = result["lengths"], result["depths"], result["original_window"]
    fig, axes = plt.subplots(
        1, len(systems), figsize=(3.6 * len(systems) + 0.8, 0.5 * len(depths) + 2.2), squeeze=False
    )
    for ax, system in zip(axes[0], systems):
        cells = {(c["length"], c["depth"]): c["accuracy"] for c in result["systems"][system]["passkey"]["cells"]}
        grid = [[cells[(n, d)] for n in lengths] for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(lengths)), [f"{n}\n{n / original:g}x" for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_title(SYSTEM_LABELS[system], fontsize=9)
        ax.set_xlabel("length (tokens, x original window)", fontsize=8)
    axes[0][0].set_ylabel("key depth", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="passkey accuracy (%)", shrink=0.8)
    return img_tag(fig)


def long_context_section(result: dict[str, Any]) -> str:
    """The report section: settings, heat map, tables."""
    import html

    rope = result["rope_scaling"]
    rows = ""
    for system, entry in result["systems"].items():
        by_length = entry["passkey"]["accuracy_by_length"]
        rows += (
            f"<tr><td>{html.escape(SYSTEM_LABELS[system])}</td>"
            + "".join(f"<td>{by_length[str(n)]:.1f}</td>" for n in result["lengths"])
            + "</tr>"
        )
    head = (
        "<tr><th>system</th>"
        + "".join(f"<th>{n} ({n / result['original_window']:g}x)</th>" for n in result["lengths"])
        + "</tr>"
    )
    ppl = ""
    for system, entry in result["systems"].items():
        if "perplexity" in entry:
            ppl += (
                f"<tr><td>{html.escape(SYSTEM_LABELS[system])}</td>"
                + "".join(f"<td>{b['perplexity']:.2f}</td>" for b in entry["perplexity"]["buckets"])
                + "</tr>"
            )
    first = next((e["perplexity"] for e in result["systems"].values() if "perplexity" in e), None)
    ppl_table = ""
    if first:
        ppl_head = (
            "<tr><th>system</th>"
            + "".join(f"<th>tokens {b['from']}-{b['to']}</th>" for b in first["buckets"])
            + "</tr>"
        )
        ppl_table = (
            f"<h3>Perplexity by token position</h3><p>{first['sequences']} held-out sequences of "
            f"{first['sequence_length']} tokens.</p><table>{ppl_head}{ppl}</table>"
        )
    return (
        f"<p>Rope scaling {html.escape(rope['rope_type'])} x{rope['factor']:g}: original window "
        f"{rope['original_length']} &rarr; {rope['target_length']} tokens. Haystack: "
        f"{html.escape(str(result['haystack']))}. "
        "A key counts as retrieved when greedy decoding writes it.</p>"
        f"{heatmap_html(result)}<h3>Passkey accuracy (%) by length, mean over depths</h3><table>{head}{rows}</table>"
        f"{ppl_table}"
    )


def write_long_context_page(run, result: dict[str, Any], name: str) -> None:
    import html

    from afina.eval.html import CHECK_SCRIPT, STYLE
    from afina.rundir import write_text_atomic

    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>afina long-context eval: '
        f"{html.escape(name)}</title><style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head><body>"
        f"<h1>Long-context evaluation: {html.escape(name)}</h1>{long_context_section(result)}</body></html>\n"
    )
    write_text_atomic(run.eval / "long_context.html", page)
