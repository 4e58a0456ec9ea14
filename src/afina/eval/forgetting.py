"""Forgetting probe: did fine-tuning cost general knowledge?

Each multiple-choice question is scored by the log-likelihood of every choice as the assistant's
answer to the question; the model's pick is the most likely choice (the usual cloze scoring, no
letters to parse). Base and tuned answer the same questions, so the accuracy drop is the forgetting.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from afina.config import Recipe
from afina.data.format import encode_chat
from afina.data.load import iter_json_objects
from afina.device import progress_interval, progress_line
from afina.train.loss import answer_logprobs


def default_probe_path() -> Path:
    return Path(str(resources.files("afina") / "eval" / "data" / "forgetting_probe.jsonl"))


def load_probe(path: Path, max_questions: int | None = None) -> list[dict[str, Any]]:
    """Read a probe file: one {question, choices: [str], answer: 0-based index} per line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: forgetting probe file not found (eval.forgetting.probe)")
    questions = []
    for line_no, row in iter_json_objects(path):
        where = f"{path}:{line_no}"
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ValueError(f"{where}: field 'question' must be a non-empty string")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise ValueError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: field 'answer' must be a 0-based index into 'choices' (0..{len(choices) - 1})")
        questions.append(
            {"id": str(row.get("id", line_no)), "question": row["question"], "choices": choices, "answer": answer}
        )
        if max_questions and len(questions) >= max_questions:
            break
    if not questions:
        raise ValueError(f"{path}: the forgetting probe has no questions")
    return questions


def probe_accuracy(
    model, tokenizer, questions: list[dict[str, Any]], batch_size: int, autocast, desc: str = "", progress: bool = False
) -> dict[str, Any]:
    """Accuracy (%) and each question's pick, choosing the choice of highest log-likelihood (a bar per batch of
    questions when `progress`)."""
    groups = [
        [
            encode_chat(
                tokenizer, [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": choice}]
            )
            for choice in q["choices"]
        ]
        for q in questions
    ]
    scores: list = []
    for start in tqdm(
        range(0, len(groups), batch_size),
        desc=desc or "forgetting probe",
        unit="batch",
        disable=not progress,
        mininterval=progress_interval(),
    ):
        scores += answer_logprobs(
            model, groups[start : start + batch_size], tokenizer.pad_token_id, batch_size, autocast
        )
    picks = [max(range(len(mine)), key=mine.__getitem__) for mine in scores]
    correct = [p == q["answer"] for p, q in zip(picks, questions)]
    return {"accuracy": 100.0 * sum(correct) / len(questions), "picks": picks, "correct": correct}


def forgetting_verdict(base_accuracy: float, tuned_accuracy: float, threshold: float) -> dict[str, Any]:
    drop = base_accuracy - tuned_accuracy
    return {
        "base_accuracy": round(base_accuracy, 2),
        "tuned_accuracy": round(tuned_accuracy, 2),
        "drop": round(drop, 2),
        "threshold": threshold,
        "flagged": drop > threshold,
    }


def forgetting_probe(recipe: Recipe, models, tokenizer, autocast, progress: bool = False) -> dict[str, Any]:
    """The probe for base and tuned (`models`: afina.eval.systems.SystemModels), with the verdict."""
    cfg = recipe.eval.forgetting
    path = recipe.resolve_path(cfg.probe) if cfg.probe else default_probe_path()
    questions = load_probe(path, cfg.max_questions)
    progress_line(f"eval: forgetting probe, {len(questions)} general-knowledge questions for base and tuned", progress)
    base_model, base_context = models.get("base")
    size = recipe.eval.batch_size
    with base_context():
        base = probe_accuracy(base_model, tokenizer, questions, size, autocast, "forgetting probe (base)", progress)
    tuned_result = probe_accuracy(
        models.tuned, tokenizer, questions, size, autocast, "forgetting probe (tuned)", progress
    )
    verdict = forgetting_verdict(base["accuracy"], tuned_result["accuracy"], cfg.threshold)
    lost = [q["id"] for q, b, t in zip(questions, base["correct"], tuned_result["correct"]) if b and not t]
    return {"probe": str(path), "questions": len(questions), **verdict, "lost": lost[:50]}
