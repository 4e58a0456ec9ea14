"""`task: tagging`: one BIO tag per word (named entities) from a token-classification head.

Words become sub-word tokens; the first sub-token of each word carries the word's tag, the
others carry no loss (and predictions are read at first sub-tokens only). Metrics are
entity-level (seqeval: an entity counts when its span and type both match), overall and per type.

A causal LM sees only the words before each word. With tagging.context=echo (the default for the
LLM backbone) the sentence is fed twice and the second copy is tagged: its tokens attend to the
whole first copy, so each tag is decided with the whole sentence in view, while the model's own
causal attention is used exactly as pretrained (nothing is switched to bidirectional). It costs
twice the tokens. tagging.backbone=encoder uses a bidirectional encoder (MiniLM) instead.
"""

from __future__ import annotations

import time
from typing import Any

from afina.config import Recipe, RecipeError
from afina.data.format import IGNORE_INDEX
from afina.eval.outputs import write_eval
from afina.eval.risks import add_intervals, add_overfitting, risk_sentences
from afina.eval.sample import eval_rows
from afina.eval.summary import efficiency_of_batches, recommend, training_cost
from afina.rundir import RunDir
from afina.tasks.base import TaskType
from afina.train.task import TrainingTask


class TagError(ValueError):
    """Tags that would make the entity metric wrong: a type training never saw."""


def tag_set(train_rows: list[dict[str, Any]]) -> list[str]:
    """The tags of the train split: O first, then by entity type and position (B, I, E, S)."""
    tags = {tag for row in train_rows for tag in row["tags"]} | {"O"}
    order = {"O": 0, "B": 1, "I": 2, "E": 3, "S": 4}
    return sorted(tags, key=lambda t: ("" if t == "O" else t[2:], order[t[0]]))


def encode_words(
    tokenizer, words: list[str], tags: list[str] | None, tag_index: dict[str, int], echo: bool
) -> dict[str, Any]:
    """Token ids of the words (twice with echo) and the tag id at the first sub-token of each tagged word.

    Tokens are matched to words by character offsets (any fast tokenizer: WordPiece, byte-level BPE).
    `first_tokens` lists, per word, the position of its first sub-token in the tagged copy.
    """
    sequence = words + words if echo else words
    text, spans, position = "", [], 0
    for i, word in enumerate(sequence):
        if i:
            text += " "
            position += 1
        spans.append((position, position + len(word)))
        text += word
        position += len(word)
    owner = [-1] * len(text)
    for w, (start, end) in enumerate(spans):
        owner[start:end] = [w] * (end - start)
    encoded = tokenizer(text, return_offsets_mapping=True)
    first_of_word: dict[int, int] = {}
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        # A byte-level BPE token carries the space before its word: its last character tells the word.
        owner_word = owner[end - 1] if end > start else -1
        if owner_word >= 0 and owner_word not in first_of_word:
            first_of_word[owner_word] = t
    offset = len(words) if echo else 0
    missing = [words[j] for j in range(len(words)) if offset + j not in first_of_word]
    if missing:
        raise ValueError(f"word(s) {missing[:3]} produce no token with this tokenizer")
    first_tokens = [first_of_word[offset + j] for j in range(len(words))]
    labels = [IGNORE_INDEX] * len(encoded["input_ids"])
    if tags is not None:
        for j, position in enumerate(first_tokens):
            labels[position] = tag_index.get(tags[j], IGNORE_INDEX)
    return {"input_ids": list(encoded["input_ids"]), "labels": labels, "first_tokens": first_tokens}


def uses_echo(recipe: Recipe) -> bool:
    return recipe.tagging.backbone == "llm" and recipe.tagging.context == "echo"


def encode_rows(tokenizer, rows: list[dict[str, Any]], tags: list[str], echo: bool) -> list[dict[str, Any]]:
    index = {tag: i for i, tag in enumerate(tags)}
    out = []
    for row in rows:
        try:
            out.append(encode_words(tokenizer, row["tokens"], row.get("tags"), index, echo))
        except ValueError as exc:
            raise ValueError(f"{row.get('source', row.get('id'))}: {exc}") from None
    return out


def training_task(recipe: Recipe, run: RunDir, train_rows: list[dict[str, Any]]) -> TrainingTask:
    from afina.tasks.heads import head_training_task
    from afina.train.loss import count_tagged_tokens, token_label_loss

    bad = next((row for row in train_rows if "tokens" not in row or "tags" not in row), None)
    if bad is not None:
        raise RecipeError(
            f"task: tagging needs rows with tokens and tags; {bad.get('source', bad.get('id'))} has fields "
            f"{sorted(bad)} (set data.schema=tagging and map data.fields)"
        )
    tags = tag_set(train_rows)
    if tags == ["O"]:
        raise TagError("the train split has no entity tags (every tag is O); there is nothing to learn")
    cfg = recipe.tagging
    echo = uses_echo(recipe)
    task = head_training_task(
        recipe,
        run,
        "token",
        tags,
        cfg.backbone,
        cfg.encoder,
        cfg.head_learning_rate,
        encode=lambda tokenizer, rows: encode_rows(tokenizer, rows, tags, echo),
        loss_fn=token_label_loss,
        count_fn=count_tagged_tokens,
    )
    task.extra_summary = {
        **task.extra_summary,
        "context": "echo" if echo else ("left" if cfg.backbone == "llm" else "bidirectional"),
    }
    return task


def check_test_tags(rows: list[dict[str, Any]], tags: list[str], policy: str):
    """Rows with a tag training never saw: an error, or (policy skip) left out with the reason."""
    known = set(tags)
    unseen = [row for row in rows if set(row["tags"]) - known]
    if not unseen:
        return rows, []
    names = sorted({t for row in unseen for t in row["tags"] if t not in known})
    message = (
        f"{len(unseen)} test row(s) have tag(s) training never saw: {', '.join(map(repr, names[:10]))} "
        f"(first: {unseen[0].get('source', unseen[0].get('id'))})"
    )
    if policy == "error":
        raise TagError(message + "; add train rows with these entity types, or set tagging.unseen_test_labels=skip")
    rejects = [
        {
            "id": row.get("id"),
            "source": row.get("source"),
            "reason": f"tag(s) {sorted(set(row['tags']) - known)} never seen in training; left out of the metrics",
        }
        for row in unseen
    ]
    return [row for row in rows if not set(row["tags"]) - known], rejects


def predict_tags(
    model, tokenizer, rows: list[dict[str, Any]], tags: list[str], echo: bool, autocast, batch_size: int = 16
) -> list[list[str]]:
    """The tag of every word: the argmax of the head at the word's first sub-token."""
    from afina.train.loss import head_logits

    encoded = encode_rows(tokenizer, [{"tokens": row["tokens"]} for row in rows], tags, echo)
    logits = head_logits(model, encoded, tokenizer.pad_token_id, batch_size, autocast)
    return [
        [tags[int(i)] for i in per_token[example["first_tokens"]].argmax(-1)]
        for example, per_token in zip(encoded, logits)
    ]


def evaluate(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Entity-level precision/recall/F1 (overall and per type) of the trained tagger on the test split."""

    from afina.device import autocast_factory, pick_device, resolve_precision
    from afina.eval.metrics import entity_metrics
    from afina.tasks.heads import load_trained_head

    run = RunDir(recipe.run_dir)
    cfg = recipe.eval
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    rows = eval_rows(recipe)
    model, tokenizer, tags = load_trained_head(recipe, run, device)
    rows, rejects = check_test_tags(rows, tags, recipe.tagging.unseen_test_labels)
    if not rows:
        raise ValueError(
            f"{run.split_path('test')} has no rows to score: set data.split.test above 0 or give data.test_path"
        )
    predicted, latencies = [], []
    began = time.perf_counter()
    for start in range(0, len(rows), cfg.batch_size):
        t0 = time.perf_counter()
        predicted += predict_tags(
            model, tokenizer, rows[start : start + cfg.batch_size], tags, uses_echo(recipe), autocast, cfg.batch_size
        )
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - began
    references = [row["tags"] for row in rows]
    scores = entity_metrics(references, predicted)
    words = sum(len(r) for r in references)
    scores["tag_accuracy"] = (
        100.0 * sum(p == r for ps, rs in zip(predicted, references) for p, r in zip(ps, rs)) / max(words, 1)
    )
    predictions = [
        {
            "id": row["id"],
            "system": "tuned",
            "question": " ".join(row["tokens"]),
            "reference": " ".join(row["tags"]),
            "prediction": " ".join(tags_),
            "correct": tags_ == row["tags"],
        }
        for row, tags_ in zip(rows, predicted)
    ]
    report: dict[str, Any] = {
        "task": "tagging",
        "backbone": recipe.tagging.backbone,
        "context": "echo" if uses_echo(recipe) else ("left" if recipe.tagging.backbone == "llm" else "bidirectional"),
        "tags": tags,
        "test_examples": len(rows),
        "skipped_unseen_labels": len(rejects),
        "metrics": ["entities"],
        "systems": {"tuned": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}},
        "efficiency": {"tuned": efficiency_of_batches(latencies, len(rows), wall, device, cfg.price_per_hour)},
        "forgetting": None,
        "training": training_cost(run, cfg.price_per_hour),
    }
    add_intervals(recipe, report, predictions)
    add_overfitting(recipe, run, report, None)
    report["recommendation"] = recommend(report) + risk_sentences(report)
    write_eval(recipe, run, report, predictions, rejects)
    return report


def predict_rows(recipe: Recipe, rows: list[dict[str, Any]], batch_size: int | None = None) -> list[dict[str, Any]]:
    """`afina predict`: each row (its word list, or a text split on spaces) with predicted_tags and entities."""
    from seqeval.metrics.sequence_labeling import get_entities

    from afina.data.schema import SCHEMAS, field_present
    from afina.device import autocast_factory, pick_device, resolve_precision
    from afina.tasks.heads import load_trained_head

    run = RunDir(recipe.run_dir)
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    inputs = []
    for i, row in enumerate(rows):
        name = field_present(row, "tokens", SCHEMAS["tagging"]["tokens"], recipe.data.fields)
        words = row[name] if name else (row["text"].split() if isinstance(row.get("text"), str) else None)
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
            raise ValueError(
                f"row {i + 1}: needs a non-empty list of words (tokens or words; map yours with "
                f"data.fields.tokens=NAME) or a text; it has {sorted(row)}"
            )
        inputs.append({"tokens": words})
    model, tokenizer, tags = load_trained_head(recipe, run, device)
    predicted = []
    size = batch_size or recipe.eval.batch_size
    for start in range(0, len(inputs), size):
        predicted += predict_tags(
            model, tokenizer, inputs[start : start + size], tags, uses_echo(recipe), autocast, size
        )
    out = []
    for row, words, row_tags in zip(rows, inputs, predicted):
        entities = [
            {"type": kind, "start": s, "end": e + 1, "text": " ".join(words["tokens"][s : e + 1])}
            for kind, s, e in get_entities(row_tags)
        ]
        out.append({**row, "predicted_tags": row_tags, "entities": entities})
    return out


def cannot_be_stage(recipe: Recipe, model_spec: str) -> dict[str, Any]:
    raise RecipeError("sequential stages carry one language model from stage to stage; tagging trains its own head")


TASK = TaskType(
    name="tagging",
    training_task=training_task,
    evaluate=evaluate,
    score_model=cannot_be_stage,
    as_chat_rows=lambda recipe, rows: [cannot_be_stage(recipe, "")],
    predict_rows=predict_rows,
    carries_lm=lambda recipe: False,
)
