"""`task: classification`: one label per text (sentiment, intent, topic), two ways.

generative (classification.mode=generative): each row becomes a chat (instruction + text ->
    the label as the answer) and trains through the chat loss. Prediction is constrained to the
    label set: every label's whole token sequence (with the end-of-turn marker) is scored given
    the prompt, and the most likely label wins; the model cannot answer outside the set.
head (classification.mode=head): a linear head over the backbone (an LLM's last non-padding
    token, or an encoder's [CLS]) trained with cross-entropy, LoRA + head or a full encoder.

Metrics: accuracy, macro-F1, per-class precision/recall, the confusion matrix (scikit-learn),
in eval/metrics.json, eval/predictions.jsonl and eval/report.html.

    from afina.tasks import classification
    report = classification.evaluate(recipe)                       # after prepare + train
    scored = classification.score_rows(model, tokenizer, rows, labels, recipe, autocast)
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import torch

from afina.config import Recipe, RecipeError
from afina.eval.out_of_scope import (
    KEEP_IN_SCOPE,
    THRESHOLD_FILE,
    OosPlan,
    calibrate_threshold,
    oos_plan,
    oos_scores,
)
from afina.eval.outputs import write_eval
from afina.eval.risks import add_classification_risks, risk_sentences
from afina.eval.sample import eval_rows
from afina.eval.summary import efficiency_of_batches, recommend, training_cost
from afina.models import load_trained
from afina.rundir import RunDir, read_jsonl, write_json_atomic
from afina.tasks.base import TaskType
from afina.train.task import TrainingTask

LABELS_FILE = "labels.json"  # <run>/labels.json: the label set training used, in order


class LabelError(ValueError):
    """Labels that would make a metric wrong: unseen in training, or a class without examples."""


# ---- the label set ------------------------------------------------------------------------------


def label_set(recipe: Recipe, train_rows: list[dict[str, Any]]) -> list[str]:
    """The recipe's labels, or the train split's labels sorted; every class must have train rows."""
    counts = Counter(row["label"] for row in train_rows)
    declared = recipe.classification.labels
    if declared is None:
        labels = sorted(counts)
    else:
        if len(set(declared)) != len(declared):
            raise RecipeError("classification.labels lists a label twice")
        labels = list(declared)
        empty = [label for label in labels if counts[label] == 0]
        if empty:
            raise LabelError(
                f"classification.labels: class(es) {', '.join(map(repr, empty))} have no rows in the train "
                "split (an empty class cannot be learned); add rows for them or remove them from the list"
            )
        unknown = sorted(set(counts) - set(labels))
        if unknown:
            raise LabelError(
                f"the train split has label(s) {', '.join(map(repr, unknown[:10]))} that classification.labels "
                "does not list; add them to the list or remove those rows"
            )
    if len(labels) < 2:
        raise LabelError(
            f"the train split has {len(labels)} label(s) ({', '.join(labels)}); a classifier needs two or more"
        )
    return labels


def read_labels(run: RunDir) -> list[str]:
    path = run.require(run.root / LABELS_FILE, "train")
    return json.loads(path.read_text(encoding="utf-8"))["labels"]


def check_test_labels(rows: list[dict[str, Any]], labels: list[str], policy: str, split: str = "test"):
    """Rows whose label training never saw: an error, or (policy skip) left out and listed in eval/rejects.jsonl.

    A model can never predict such a label, so counting those rows as plain mistakes would
    hide that the data, not the model, is at fault.
    """
    known = set(labels)
    unseen = [row for row in rows if row["label"] not in known]
    if not unseen:
        return rows, []
    names = sorted({row["label"] for row in unseen})
    message = (
        f"{len(unseen)} {split} row(s) have label(s) training never saw: {', '.join(map(repr, names[:10]))} "
        f"(first: {unseen[0].get('source', unseen[0].get('id'))})"
    )
    if policy == "error":
        raise LabelError(
            message + "; add train rows with these labels, remove the rows, or set "
            "classification.unseen_test_labels=skip to leave them out of the metrics (or out_of_scope to score "
            "them as out of scope)"
        )
    rejects = [
        {
            "id": row.get("id"),
            "source": row.get("source"),
            "label": row["label"],
            "reason": f"label {row['label']!r} never seen in training; left out of the metrics",
        }
        for row in unseen
    ]
    return [row for row in rows if row["label"] in known], rejects


# ---- generative labels --------------------------------------------------------------------------


def prompt_messages(text: str, labels: list[str], recipe: Recipe) -> list[dict[str, str]]:
    """The chat a generative classifier sees: the instruction (with the labels listed when few) and the text."""
    cfg = recipe.classification
    listed = ", ".join(labels) if len(labels) <= cfg.list_labels_up_to else f"one of the {len(labels)} labels"
    content = f"{cfg.instruction.replace('{labels}', listed)}\n\nText: {text}"
    system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []
    return system + [{"role": "user", "content": content}]


def label_groups(tokenizer, rows: list[dict[str, Any]], labels: list[str], recipe: Recipe) -> list[list[dict]]:
    """Per row (with `text`), its prompt answered with each label, encoded: what constrained scoring compares."""
    from afina.data.format import encode_chat

    return [
        [
            encode_chat(
                tokenizer, prompt_messages(row["text"], labels, recipe) + [{"role": "assistant", "content": label}]
            )
            for label in labels
        ]
        for row in rows
    ]


def score_rows(
    model, tokenizer, rows: list[dict[str, Any]], labels: list[str], recipe: Recipe, autocast, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Constrained generative prediction: for each row (with `text`), the log-probability of each label's
    full token sequence as the answer, the argmax label and its probability within the label set.

    The labels share the prompt, so it runs once per row and each label's tokens read its cached keys and
    values (loss.answer_logprobs), batch_size rows per pass.
    """
    from afina.train.loss import answer_logprobs, choose_label

    groups = label_groups(tokenizer, rows, labels, recipe)
    out = []
    for row_scores in torch.tensor(answer_logprobs(model, groups, tokenizer.pad_token_id, batch_size, autocast)):
        best, probs = choose_label(row_scores)
        out.append(
            {
                "predicted_label": labels[best],
                "label_probability": round(float(probs[best]), 4),
                "label_logprobs": {label: round(float(s), 4) for label, s in zip(labels, row_scores)},
            }
        )
    return out


# Inputs that carry no content: what a model answers to them is its prior over the labels under this prompt.
CONTENT_FREE = ("N/A", "", "[MASK]")


def label_prior(model, tokenizer, labels: list[str], recipe: Recipe, autocast) -> dict[str, float]:
    """The model's probability of each label for content-free texts under the classification prompt, averaged:
    a zero-shot model's preference that no input earned (the first listed label, the shortest one)."""
    scored = score_rows(model, tokenizer, [{"text": text} for text in CONTENT_FREE], labels, recipe, autocast)
    probs = torch.stack([torch.softmax(torch.tensor(list(s["label_logprobs"].values())), dim=-1) for s in scored])
    return {label: float(p) for label, p in zip(labels, probs.mean(dim=0))}


def calibrated(predicted: list[dict[str, Any]], prior: dict[str, float]) -> list[dict[str, Any]]:
    """Contextual calibration: each row's label probabilities divided by the prior and renormalised, the
    prediction their argmax (raw log-probabilities kept beside them)."""
    from afina.train.loss import choose_label

    labels = list(prior)
    log_prior = torch.log(torch.tensor([max(prior[label], 1e-12) for label in labels]))
    out = []
    for p in predicted:
        raw = torch.tensor([p["label_logprobs"][label] for label in labels])
        best, probs = choose_label(torch.log_softmax(raw, dim=-1) - log_prior)
        out.append({**p, "predicted_label": labels[best], "label_probability": round(float(probs[best]), 4)})
    return out


# ---- head ---------------------------------------------------------------------------------------


def encode_for_head(tokenizer, rows: list[dict[str, Any]], labels: list[str]) -> list[dict[str, list[int]]]:
    """Token ids of each text; the class id sits at position 0 of `labels` (the rest are ignored)."""
    from afina.data.format import IGNORE_INDEX

    index: dict[Any, int] = {label: i for i, label in enumerate(labels)}
    examples = []
    for row in rows:
        ids = tokenizer(row["text"])["input_ids"]
        target = index.get(row.get("label"), IGNORE_INDEX)
        examples.append({"input_ids": ids, "labels": [target] + [IGNORE_INDEX] * (len(ids) - 1)})
    return examples


def head_predict(
    model, tokenizer, rows: list[dict[str, Any]], labels: list[str], autocast, batch_size: int = 16
) -> list[dict[str, Any]]:
    from afina.train.loss import head_logits

    encoded = encode_for_head(tokenizer, [{"text": row["text"]} for row in rows], labels)
    out = []
    for logits in head_logits(model, encoded, tokenizer.pad_token_id, batch_size, autocast):
        probs = torch.softmax(logits, dim=-1)
        best = int(probs.argmax())
        out.append(
            {
                "predicted_label": labels[best],
                "label_probability": round(float(probs[best]), 4),
                "label_probabilities": {label: float(p) for label, p in zip(labels, probs)},
            }
        )
    return out


# ---- training -----------------------------------------------------------------------------------


def training_task(recipe: Recipe, run: RunDir, train_rows: list[dict[str, Any]]) -> TrainingTask:
    # Rows replayed from earlier stages of a sequential run arrive as finished chats (generative only).
    replayed = [row for row in train_rows if "messages" in row and "replay_from" in row]
    if replayed and recipe.classification.mode != "generative":
        raise RecipeError("replay of earlier stages needs classification.mode=generative (a head has no chat turns)")
    train_rows = [row for row in train_rows if not ("messages" in row and "replay_from" in row)]
    bad = next((row for row in train_rows if "label" not in row or "text" not in row), None)
    if bad is not None:
        raise RecipeError(
            f"task: classification needs rows with text and label; {bad.get('source', bad.get('id'))} "
            f"has fields {sorted(bad)} (set data.schema=classification and map data.fields)"
        )
    labels = label_set(recipe, train_rows)
    cfg = recipe.classification

    def save_labels(folder):
        for path in (run.root / LABELS_FILE, folder / LABELS_FILE):
            write_json_atomic(path, {"task": "classification", "mode": cfg.mode, "labels": labels})

    if cfg.mode == "generative":
        from afina.tasks.chat import chat_task

        def messages_of(row):
            if "messages" in row:  # replayed from an earlier stage, already in its own task's form
                return row["messages"]
            return prompt_messages(row["text"], labels, recipe) + [{"role": "assistant", "content": row["label"]}]

        task = chat_task(recipe, run, messages_of=messages_of)
        task.on_save = save_labels
        task.extra_summary = {"mode": "generative", "labels": len(labels)}
        return task

    from afina.tasks.heads import head_training_task
    from afina.train.loss import count_sequences, sequence_label_loss

    task = head_training_task(
        recipe,
        run,
        "sequence",
        labels,
        cfg.backbone,
        cfg.encoder,
        cfg.head_learning_rate,
        encode=lambda tokenizer, rows: encode_for_head(tokenizer, rows, labels),
        loss_fn=sequence_label_loss,
        count_fn=count_sequences,
    )
    write_head_info = task.on_save

    def on_save(folder):
        write_head_info(folder)
        save_labels(folder)

    task.on_save = on_save
    task.extra_summary = {**task.extra_summary, "mode": "head"}
    return task


# ---- prediction and evaluation ------------------------------------------------------------------


def load_classifier(recipe: Recipe, run: RunDir, device):
    """(model, tokenizer, labels) of the trained run; generative: the LoRA model (adapter switchable)."""
    if recipe.classification.mode == "head":
        from afina.tasks.heads import load_trained_head

        return load_trained_head(recipe, run, device)
    from afina.device import recipe_weight_dtype
    from afina.models import load_tokenizer

    dtype = recipe_weight_dtype(recipe, device)
    model = load_trained(run.root, recipe.model.name, device, dtype, full=recipe.method.type == "full")
    return model, load_tokenizer(recipe.model.name, recipe.model.chat_template), read_labels(run)


def predict_batches(model, tokenizer, rows, labels, recipe: Recipe, autocast, batch_size: int):
    """Predictions for rows (each with `text`), batch by batch, and each batch's wall time."""
    predictions, latencies = [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        began = time.perf_counter()
        if recipe.classification.mode == "head":
            predictions += head_predict(model, tokenizer, chunk, labels, autocast, batch_size)
        else:
            predictions += score_rows(model, tokenizer, chunk, labels, recipe, autocast, batch_size)
        latencies.append(time.perf_counter() - began)
    return predictions, latencies


def evaluate(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Score the trained classifier (and, generative, the base model zero-shot) on the test split."""
    import contextlib

    from afina.device import autocast_factory, pick_device, resolve_precision
    from afina.eval.metrics import label_metrics

    run = RunDir(recipe.run_dir)
    cfg = recipe.eval
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    rows = eval_rows(recipe)
    model, tokenizer, labels = load_classifier(recipe, run, device)
    plan = oos_plan(recipe.classification.out_of_scope, labels)
    oos_rows: list[dict[str, Any]] = []
    policy = recipe.classification.unseen_test_labels
    if policy == "out_of_scope":  # test rows of labels training never saw: what out-of-scope detection should catch
        if plan.kind == "off":
            raise RecipeError(
                "classification.unseen_test_labels=out_of_scope needs out-of-scope detection; "
                "set classification.out_of_scope=auto (or a label)"
            )
        if plan.kind == "threshold":
            oos_rows = [row for row in rows if row["label"] not in labels]
            rows = [row for row in rows if row["label"] in labels]
        else:
            rows = [row if row["label"] in labels else {**row, "label": plan.label} for row in rows]
        policy = "error"
    rows, rejects = check_test_labels(rows, labels, policy)
    if not rows:
        raise ValueError(
            f"{run.split_path('test')} has no rows to score: set data.split.test above 0 or give data.test_path"
        )

    # The base model zero-shot is a fair baseline only for generative labels (a new head starts random).
    systems = ["tuned"]
    if recipe.classification.mode == "generative" and "base" in cfg.systems and hasattr(model, "disable_adapter"):
        systems = ["base", "tuned"]
    results, efficiency, predictions = {}, {}, []
    oos_report: dict[str, Any] = {}
    oos_predictions: list[dict[str, Any]] = []
    calibration: dict[str, Any] = {}
    references = [row["label"] for row in rows]
    for system in systems:
        context = model.disable_adapter if system == "base" else contextlib.nullcontext
        began = time.perf_counter()
        with context():
            predicted, latencies = predict_batches(model, tokenizer, rows, labels, recipe, autocast, cfg.batch_size)
            if system == "base" and recipe.classification.calibrate_zero_shot:
                prior = label_prior(model, tokenizer, labels, recipe, autocast)
                calibration["base"] = {"method": "contextual", "inputs": list(CONTENT_FREE), "prior": prior}
                predicted = calibrated(predicted, prior)
        wall = time.perf_counter() - began
        scores = label_metrics(references, [p["predicted_label"] for p in predicted], labels)
        results[system] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}
        efficiency[system] = efficiency_of_batches(latencies, len(rows), wall, device, cfg.price_per_hour)
        flags: list[bool | None] = [None] * len(rows)
        if plan.kind != "off":
            with context():
                oos = out_of_scope_scores(
                    plan, model, tokenizer, labels, recipe, autocast, run, rows, predicted, oos_rows
                )
            results[system].update(oos["scores"])
            flags = oos["flags"][: len(rows)]
            oos_report[system] = oos["summary"]
            if system == "tuned" and oos.get("threshold") is not None:
                write_json_atomic(run.root / THRESHOLD_FILE, {"threshold": oos["threshold"], "keep": KEEP_IN_SCOPE})
            oos_predictions += [  # written with the others, kept out of the in-scope error bars
                {
                    "id": row["id"],
                    "system": system,
                    "question": row["text"],
                    "reference": row["label"],
                    "prediction": pred["predicted_label"],
                    "correct": False,
                    "label_probability": pred["label_probability"],
                    "out_of_scope": flag,
                }
                for row, pred, flag in zip(oos_rows, oos["oos_predicted"], oos["flags"][len(rows) :])
                if pred is not None
            ]
        for row, pred, flag in zip(rows, predicted, flags):
            predictions.append(
                {
                    "id": row["id"],
                    "system": system,
                    "question": row["text"],
                    "reference": row["label"],
                    "prediction": pred["predicted_label"],
                    "correct": pred["predicted_label"] == row["label"],
                    "label_probability": pred["label_probability"],
                    **({"out_of_scope": flag} if flag is not None else {}),
                }
            )

    report: dict[str, Any] = {
        "task": "classification",
        "mode": recipe.classification.mode,
        "backbone": recipe.classification.backbone if recipe.classification.mode == "head" else "llm",
        "labels": labels,
        "test_examples": len(rows),
        "skipped_unseen_labels": len(rejects),
        "out_of_scope": {"method": plan.kind, "label": plan.label, "systems": oos_report}
        if plan.kind != "off"
        else None,
        "metrics": ["classification"],
        "systems": results,
        "efficiency": efficiency,
        "forgetting": None,
        "training": training_cost(run, cfg.price_per_hour),
        **({"calibration": calibration} if calibration else {}),
    }
    classification_risks(recipe, run, report, predictions, model, tokenizer, labels, autocast, systems, rows)
    report["recommendation"] = recommend(report) + risk_sentences(report)
    write_eval(recipe, run, report, predictions + oos_predictions, rejects)
    return report


def out_of_scope_scores(
    plan: OosPlan, model, tokenizer, labels, recipe: Recipe, autocast, run: RunDir, rows, predicted, oos_rows
) -> dict[str, Any]:
    """The out-of-scope flag of every test row (in-scope rows, then the unseen-label rows) under one system,
    and its precision and recall; threshold: calibrated on the validation split with the same system."""
    batch = recipe.eval.batch_size
    if plan.kind == "label":
        flags = [p["predicted_label"] == plan.label for p in predicted]
        references = [row["label"] == plan.label for row in rows]
        return {
            "flags": flags,
            "scores": _present(oos_scores(flags, references)),
            "summary": {"label": plan.label},
            "oos_predicted": [],
        }
    val_path = run.split_path("validation")
    val_rows = [r for r in read_jsonl(val_path) if r.get("label") in labels] if val_path.is_file() else []
    if not val_rows:  # nothing to calibrate on: said in the report, never a guessed threshold
        return {
            "flags": [None] * (len(predicted) + len(oos_rows)),
            "scores": {},
            "summary": {"skipped": "no validation rows to calibrate the threshold on; give data.split.validation"},
            "oos_predicted": [None] * len(oos_rows),
        }
    val_predicted, _ = predict_batches(model, tokenizer, val_rows, labels, recipe, autocast, batch)
    threshold = calibrate_threshold([p["label_probability"] for p in val_predicted])
    oos_predicted, _ = predict_batches(model, tokenizer, oos_rows, labels, recipe, autocast, batch)
    flags = [p["label_probability"] < threshold for p in predicted + oos_predicted]
    references = [False] * len(predicted) + [True] * len(oos_rows)
    return {
        "flags": flags,
        "scores": _present(oos_scores(flags, references)),
        "summary": {"threshold": round(threshold, 4), "validation_rows": len(val_rows), "keep_in_scope": KEEP_IN_SCOPE},
        "threshold": threshold,
        "oos_predicted": oos_predicted,
    }


def _present(scores: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items() if v is not None}


def label_distributions(
    model, tokenizer, texts: list[str], labels: list[str], recipe: Recipe, autocast
) -> list[dict[str, float]]:
    """Each text's probability of every label (generative: renormalised over the label set)."""
    import math

    predicted, _ = predict_batches(
        model, tokenizer, [{"text": t} for t in texts], labels, recipe, autocast, recipe.eval.batch_size
    )
    if recipe.classification.mode == "head":
        return [p["label_probabilities"] for p in predicted]
    out = []
    for p in predicted:
        top = max(p["label_logprobs"].values())
        weights = {label: math.exp(v - top) for label, v in p["label_logprobs"].items()}
        total = sum(weights.values())
        out.append({label: w / total for label, w in weights.items()})
    return out


def classification_risks(
    recipe: Recipe,
    run: RunDir,
    report: dict[str, Any],
    predictions,
    model,
    tokenizer,
    labels,
    autocast,
    systems: list[str],
    rows,
) -> None:
    """Error bars, train vs test accuracy and the counterfactual bias probe (afina.eval.risks), given how this
    classifier predicts: labels of rows, and each text's label probabilities under a system."""
    import contextlib

    def predict_labels(sample: list[dict[str, Any]]) -> list[str]:
        predicted, _ = predict_batches(model, tokenizer, sample, labels, recipe, autocast, recipe.eval.batch_size)
        return [p["predicted_label"] for p in predicted]

    def distributions(system: str, texts: list[str]) -> list[dict[str, float]]:
        with (model.disable_adapter if system == "base" else contextlib.nullcontext)():
            return label_distributions(model, tokenizer, texts, labels, recipe, autocast)

    add_classification_risks(recipe, run, report, predictions, labels, rows, systems, predict_labels, distributions)


def predict_rows(recipe: Recipe, rows: list[dict[str, Any]], batch_size: int | None = None) -> list[dict[str, Any]]:
    """`afina predict`: each row (its text field as data.fields maps it) with predicted_label and label_probability."""
    from afina.data.schema import SCHEMAS, field_present
    from afina.device import autocast_factory, pick_device, resolve_precision

    run = RunDir(recipe.run_dir)
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    texts = []
    for i, row in enumerate(rows):
        name = field_present(row, "text", SCHEMAS["classification"]["text"], recipe.data.fields)
        if name is None or not isinstance(row[name], str):
            raise ValueError(
                f"row {i + 1}: no text field ({recipe.data.fields.get('text', 'text or sentence')}); "
                f"it has {sorted(row)}; map yours with data.fields.text=NAME"
            )
        texts.append({"text": row[name]})
    model, tokenizer, labels = load_classifier(recipe, run, device)
    predicted, _ = predict_batches(
        model, tokenizer, texts, labels, recipe, autocast, batch_size or recipe.eval.batch_size
    )
    threshold_file = run.root / THRESHOLD_FILE  # written by `afina eval` when a threshold was calibrated
    threshold = json.loads(threshold_file.read_text())["threshold"] if threshold_file.is_file() else None
    plan = oos_plan(recipe.classification.out_of_scope, labels)
    out = []
    for row, pred in zip(rows, predicted):
        kept = {k: v for k, v in pred.items() if k not in ("label_logprobs", "label_probabilities")}
        if plan.kind == "label":
            kept["out_of_scope"] = pred["predicted_label"] == plan.label
        elif plan.kind == "threshold" and threshold is not None:
            kept["out_of_scope"] = pred["label_probability"] < threshold
        out.append({**row, **kept})
    return out


# ---- sequential stages --------------------------------------------------------------------------


def as_chat_rows(recipe: Recipe, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train rows of this (generative) classification stage as finished chats, to replay in a later stage."""
    if recipe.classification.mode != "generative":
        raise RecipeError("replay from a classification stage needs classification.mode=generative")
    labels = label_set(recipe, read_jsonl(RunDir(recipe.run_dir).split_path("train")))
    return [
        {
            "id": row.get("id"),
            "messages": prompt_messages(row["text"], labels, recipe) + [{"role": "assistant", "content": row["label"]}],
        }
        for row in rows
    ]


def score_model(recipe: Recipe, model_spec: str) -> dict[str, Any]:
    """Accuracy of a plain causal LM (a stage's merged weights) on this stage's test split, labels constrained."""
    from afina.device import autocast_factory, pick_device, recipe_weight_dtype, resolve_precision
    from afina.eval.metrics import label_metrics
    from afina.models import load_model, load_tokenizer

    if recipe.classification.mode != "generative":
        raise RecipeError("sequential stages score classification with classification.mode=generative")
    run = RunDir(recipe.run_dir)
    labels = label_set(recipe, [r for r in read_jsonl(run.split_path("train")) if "replay_from" not in r])
    rows, _ = check_test_labels(eval_rows(recipe), labels, recipe.classification.unseen_test_labels)
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    model = load_model(model_spec, recipe_weight_dtype(recipe, device)).to(device).eval()
    with torch.no_grad():
        predicted = score_rows(
            model, load_tokenizer(model_spec), rows, labels, recipe, autocast, recipe.eval.batch_size
        )
    scores = label_metrics([r["label"] for r in rows], [p["predicted_label"] for p in predicted], labels)
    return {
        "metric": "accuracy",
        "value": round(scores["accuracy"], 2),
        "macro_f1": round(scores["macro_f1"], 2),
        "lower_is_better": False,
        "examples": len(rows),
    }


TASK = TaskType(
    name="classification",
    training_task=training_task,
    evaluate=evaluate,
    score_model=score_model,
    as_chat_rows=as_chat_rows,
    predict_rows=predict_rows,
    carries_lm=lambda recipe: recipe.classification.mode == "generative",
)
