"""`task: preference`: tune a chat model towards the answers people preferred (DPO, IPO, ORPO, SimPO, KTO).

Rows are chosen/rejected pairs ({prompt, chosen, rejected}) or KTO's unpaired answers ({prompt,
completion, desirable}); see afina.data.schema. Each answer is scored by its summed log-probability
under the policy (only the answer's tokens), and the losses of afina.train.preference_loss compare
them. DPO, IPO and KTO also need the reference model's log-probabilities (the model before tuning):

    LoRA and other adapters   the same weights with the adapter disabled (one copy in memory)
    full fine-tuning          computed once, before the first update, and kept with each example

The loop normalises by pairs (KTO: examples) of the whole accumulated batch, checkpoints, resumes
and stops early as for any task. Evaluation scores held-out pairs with the base and the tuned model:
preference accuracy (the chosen answer more likely than the rejected one), log-prob and reward
margins, and the forgetting probe.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from afina.config import Recipe, RecipeError
from afina.data.format import IGNORE_INDEX, encode_answer
from afina.device import autocast_factory, pick_device, recipe_weight_dtype, resolve_precision
from afina.eval.forgetting import forgetting_probe
from afina.eval.generative import last_user_text
from afina.eval.outputs import write_eval
from afina.eval.sample import eval_rows
from afina.eval.summary import efficiency_of_batches, recommend, training_cost
from afina.eval.systems import SystemModels
from afina.models import load_tokenizer, recipe_rope_settings
from afina.rundir import RunDir
from afina.tasks.base import TaskType
from afina.train.batches import pad_batch
from afina.train.loss import answer_logprobs
from afina.train.methods import apply_method, load_for_method
from afina.train.preference_loss import DEFAULT_BETA, PreferenceLoss, SequenceLogps, sequence_logps
from afina.train.task import TrainingTask

Rows = list[dict[str, Any]]
Example = dict[str, Any]


def preference_loss(recipe: Recipe) -> PreferenceLoss:
    cfg = recipe.preference
    return PreferenceLoss(
        cfg.loss,
        cfg.beta if cfg.beta is not None else DEFAULT_BETA[cfg.loss],
        cfg.simpo_gamma,
        cfg.desirable_weight,
        cfg.undesirable_weight,
    )


def kto_rows(rows: Rows) -> Rows:
    """Rows as KTO examples: a pair becomes a desirable (chosen) and an undesirable (rejected) example."""
    out: Rows = []
    for row in rows:
        if "chosen" in row:
            out.append({"prompt": row["prompt"], "completion": row["chosen"], "desirable": True})
            out.append({"prompt": row["prompt"], "completion": row["rejected"], "desirable": False})
        else:
            out.append(row)
    return out


def check_rows(loss: PreferenceLoss, rows: Rows, where: str) -> None:
    if loss.paired and any("chosen" not in row for row in rows):
        raise RecipeError(
            f"{where}: preference.loss={loss.name} needs chosen/rejected pairs, and these rows are "
            "unpaired KTO examples (prompt, completion, label); use preference.loss=kto"
        )


# ---- encoding and batches --------------------------------------------------------------------------


def encode_pairs(tokenizer, rows: Rows) -> list[Example]:
    """A pair as one example: the chosen side in input_ids/labels (the loop counts and sorts by it), the
    rejected side beside it."""
    out = []
    for row in rows:
        chosen = encode_answer(tokenizer, row["prompt"], row["chosen"])
        rejected = encode_answer(tokenizer, row["prompt"], row["rejected"])
        out.append(
            {
                "input_ids": chosen["input_ids"],
                "labels": chosen["labels"],
                "rejected_input_ids": rejected["input_ids"],
                "rejected_labels": rejected["labels"],
            }
        )
    return out


def encode_kto(tokenizer, rows: Rows) -> list[Example]:
    """KTO examples, each with a mismatched sequence for the KL estimate: its own prompt followed by the next
    example's answer (a fixed partner, so that a reference computed once stays valid)."""
    encoded = [encode_answer(tokenizer, row["prompt"], row["completion"]) for row in rows]
    out = []
    for i, (row, example) in enumerate(zip(rows, encoded, strict=True)):
        partner = encoded[(i + 1) % len(encoded)]
        p, q = example["prompt_tokens"], partner["prompt_tokens"]
        out.append(
            {
                "input_ids": example["input_ids"],
                "labels": example["labels"],
                "desirable": int(row["desirable"]),
                "kl_input_ids": example["input_ids"][:p] + partner["input_ids"][q:],
                "kl_labels": example["labels"][:p] + partner["labels"][q:],
            }
        )
    return out


def collate_pairs(
    examples: list[Example], rows: list[list[int]], pad_id: int, _pack_length=None
) -> dict[str, torch.Tensor]:
    """Chosen sides then rejected sides, padded into one batch of 2n rows (one forward pass for both)."""
    chosen = [examples[row[0]] for row in rows]
    rejected = [{"input_ids": e["rejected_input_ids"], "labels": e["rejected_labels"]} for e in chosen]
    batch = pad_batch([*chosen, *rejected], pad_id)
    if all("ref" in e for e in chosen):
        batch["ref"] = torch.tensor([e["ref"] for e in chosen], dtype=torch.float32)
    return batch


def collate_kto(
    examples: list[Example], rows: list[list[int]], pad_id: int, _pack_length=None
) -> dict[str, torch.Tensor]:
    """The answers, their desirable flags, and the mismatched sequences of the KL estimate."""
    chosen = [examples[row[0]] for row in rows]
    batch = pad_batch(chosen, pad_id)
    mismatched = pad_batch([{"input_ids": e["kl_input_ids"], "labels": e["kl_labels"]} for e in chosen], pad_id)
    batch.update({f"kl_{key}": value for key, value in mismatched.items()})
    batch["desirable"] = torch.tensor([e["desirable"] for e in chosen], dtype=torch.long)
    if all("ref" in e for e in chosen):
        batch["ref"] = torch.tensor([e["ref"] for e in chosen], dtype=torch.float32)
    return batch


def reference_logps(model, input_ids, labels, attention_mask) -> torch.Tensor:
    """The reference model's summed answer log-probabilities: the adapter switched off (no copy of the model)."""
    if not hasattr(model, "disable_adapter"):
        raise RuntimeError(
            "full fine-tuning needs reference log-probabilities computed before training; "
            "the batch has none (build the model through the preference task)"
        )
    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, input_ids, labels, attention_mask).total


def make_loss_fn(loss: PreferenceLoss):
    """loss_fn(model, **batch) -> (sum of per-pair or per-example losses, how many), as the loop expects."""

    def pair_loss(model, input_ids, labels, attention_mask=None, ref=None):
        n = len(input_ids) // 2
        chosen, rejected = sequence_logps(model, input_ids, labels, attention_mask).split(n)
        ref_chosen = ref_rejected = None
        if loss.needs_reference:
            if ref is None:
                both = reference_logps(model, input_ids, labels, attention_mask)
                ref_chosen, ref_rejected = both[:n], both[n:]
            else:
                ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        return loss.pair_losses(chosen, rejected, ref_chosen, ref_rejected).sum(), n

    def kto_loss(
        model,
        input_ids,
        labels,
        desirable,
        kl_input_ids,
        kl_labels,
        attention_mask=None,
        kl_attention_mask=None,
        ref=None,
    ):
        answer = sequence_logps(model, input_ids, labels, attention_mask)
        with torch.no_grad():  # the KL estimate is a detached reference point
            kl_policy = sequence_logps(model, kl_input_ids, kl_labels, kl_attention_mask).total
        if ref is None:
            ref_answer = reference_logps(model, input_ids, labels, attention_mask)
            ref_kl = reference_logps(model, kl_input_ids, kl_labels, kl_attention_mask)
        else:
            ref_answer, ref_kl = ref[:, 0], ref[:, 1]
        kl = (kl_policy - ref_kl).mean()
        return loss.example_losses(answer, ref_answer, desirable, kl).sum(), len(input_ids)

    return pair_loss if loss.paired else kto_loss


@torch.no_grad()
def add_reference_logps(model, examples: list[Example], collate, pad_id: int, batch_size: int, autocast) -> None:
    """Full fine-tuning: each example's reference log-probabilities (chosen, rejected; or answer, mismatched),
    computed once with the weights as they are before training, stored in the example as `ref`."""
    model.eval()
    todo = [i for i, e in enumerate(examples) if "ref" not in e]
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        batch = {k: v.to(model.device) for k, v in collate(examples, [[i] for i in idx], pad_id).items()}
        with autocast():
            first = sequence_logps(model, batch["input_ids"], batch["labels"], batch.get("attention_mask")).total
            if "kl_input_ids" in batch:
                second = sequence_logps(
                    model, batch["kl_input_ids"], batch["kl_labels"], batch.get("kl_attention_mask")
                ).total
            else:
                first, second = first[: len(idx)], first[len(idx) :]
        for i, a, b in zip(idx, first.tolist(), second.tolist(), strict=True):
            examples[i]["ref"] = [a, b]
    model.train()


def training_task(recipe: Recipe, run: RunDir, train_rows: Rows) -> TrainingTask:
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)
    loss = preference_loss(recipe)
    check_rows(loss, train_rows, str(run.split_path("train")))
    collate = collate_pairs if loss.paired else collate_kto
    encoded_sets: list[list[Example]] = []  # what build_model adds reference log-probs to (full fine-tuning)
    full = recipe.method.type == "full"

    def encode(rows: Rows) -> list[Example]:
        examples = encode_pairs(tokenizer, rows) if loss.paired else encode_kto(tokenizer, kto_rows(rows))
        encoded_sets.append(examples)
        return examples

    def build_model(device):
        model = apply_method(
            load_for_method(recipe.model.name, recipe.method, device, recipe_rope_settings(recipe)), recipe.method
        )
        if full and loss.needs_reference:
            autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
            for examples in encoded_sets:
                add_reference_logps(model, examples, collate, tokenizer.pad_token_id, recipe.eval.batch_size, autocast)
        return model

    def count(micro_batches: list[dict[str, torch.Tensor]]) -> int:
        return sum(len(b["input_ids"]) // (2 if loss.paired else 1) for b in micro_batches)

    reference = (
        "none (reference-free)"
        if not loss.needs_reference
        else "computed once before training"
        if full
        else "the base model (adapter disabled)"
    )
    return TrainingTask(
        tokenizer=tokenizer,
        encode=encode,
        build_model=build_model,
        output_dir=run.model if full else run.adapter,
        method=recipe.method.type,
        collate=collate,
        loss_fn=make_loss_fn(loss),
        count_fn=count,
        supports_packing=False,
        extra_summary={"preference_loss": loss.name, "beta": loss.beta, "reference": reference},
    )


# ---- evaluation ------------------------------------------------------------------------------------


def pair_scores(model, tokenizer, rows: Rows, batch_size: int, autocast) -> tuple[SequenceLogps, SequenceLogps]:
    """The chosen and the rejected answer's summed log-probabilities after their prompt, and token counts: the
    prompt runs once per pair and both answers read its cached keys and values (loss.answer_logprobs)."""
    groups = [[encode_answer(tokenizer, row["prompt"], row[side]) for side in ("chosen", "rejected")] for row in rows]
    sums = torch.tensor(answer_logprobs(model, groups, tokenizer.pad_token_id, batch_size, autocast))
    tokens = torch.tensor([[sum(t != IGNORE_INDEX for t in e["labels"]) for e in group] for group in groups])
    return SequenceLogps(sums[:, 0], tokens[:, 0]), SequenceLogps(sums[:, 1], tokens[:, 1])


def preference_metrics(chosen: SequenceLogps, rejected: SequenceLogps) -> dict[str, float]:
    """Preference accuracy (chosen more likely than rejected: summed, and per token) and the mean log-prob margin."""
    margin = chosen.total - rejected.total
    return {
        "preference_accuracy": round(100.0 * float((margin > 0).float().mean()), 2),
        "preference_accuracy_per_token": round(100.0 * float((chosen.mean > rejected.mean).float().mean()), 2),
        "logp_margin": round(float(margin.mean()), 4),
    }


def reward_metrics(
    tuned: tuple[SequenceLogps, SequenceLogps], base: tuple[SequenceLogps, SequenceLogps], beta: float
) -> dict[str, float]:
    """The implied rewards beta * (log pi - log ref) of the tuned model against the base as reference: the mean
    reward of chosen and rejected answers, their margin, and the share of pairs whose margin is positive."""
    chosen_reward = beta * (tuned[0].total - base[0].total)
    rejected_reward = beta * (tuned[1].total - base[1].total)
    margin = chosen_reward - rejected_reward
    return {
        "chosen_reward": round(float(chosen_reward.mean()), 4),
        "rejected_reward": round(float(rejected_reward.mean()), 4),
        "reward_margin": round(float(margin.mean()), 4),
        "reward_accuracy": round(100.0 * float((margin > 0).float().mean()), 2),
    }


def evaluate(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Base and tuned score the held-out pairs; rewards of tuned against base; forgetting; eval/ written."""
    run = RunDir(recipe.run_dir)
    rows = [row for row in eval_rows(recipe) if "chosen" in row]
    if not rows:
        raise ValueError(
            f"{run.split_path('test')} has no chosen/rejected pairs to evaluate (KTO rows are unpaired): "
            "give a test file of pairs with data.test_path"
        )
    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.chat_template)
    models = SystemModels.load(recipe, device, with_tuned=True)
    loss = preference_loss(recipe)
    scores: dict[str, tuple[SequenceLogps, SequenceLogps]] = {}
    systems: dict[str, dict[str, Any]] = {}
    efficiency: dict[str, dict[str, float]] = {}
    for system in ("base", "tuned"):
        model, context = models.get(system)
        start = time.perf_counter()
        with context():
            scores[system] = pair_scores(model, tokenizer, rows, recipe.eval.batch_size, autocast)
        wall = time.perf_counter() - start
        systems[system] = preference_metrics(*scores[system])
        efficiency[system] = efficiency_of_batches(
            [wall / max(1, len(rows))], len(rows), wall, device, recipe.eval.price_per_hour
        )
    systems["tuned"].update(reward_metrics(scores["tuned"], scores["base"], loss.beta))
    task_test = (
        task_metrics(recipe, models, tokenizer, autocast, systems, progress) if recipe.preference.task_test else None
    )
    report: dict[str, Any] = {
        "task": "preference",
        "test_examples": len(rows),
        "metrics": ["preference_accuracy", "preference_accuracy_per_token", "logp_margin"],
        "preference_loss": loss.name,
        "beta": loss.beta,
        "systems": systems,
        "efficiency": efficiency,
        **({"task_test": task_test} if task_test else {}),
    }
    report["forgetting"] = (
        forgetting_probe(recipe, models, tokenizer, autocast, progress) if recipe.eval.forgetting.enabled else None
    )
    report["training"] = training_cost(run, recipe.eval.price_per_hour)
    report["recommendation"] = recommend(report)
    write_eval(recipe, run, report, prediction_rows(rows, scores))
    return report


def task_metrics(
    recipe: Recipe, models: SystemModels, tokenizer, autocast, systems: dict[str, dict[str, Any]], progress: bool
) -> dict[str, Any]:
    """preference.task_test: base and tuned answer a chat test file; its chat metrics join each system's scores.
    Returns what identifies that file (path, sha256, rows), for `afina promote`."""
    from afina.eval.generate import answer_budget, generate_timed
    from afina.eval.generative import resolve_metrics, score_system
    from afina.rundir import file_sha256, read_jsonl

    path = recipe.resolve_path(recipe.preference.task_test or "")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: preference.task_test names no file (a chat test split, e.g. runs/NAME/data/test.jsonl)"
        )
    rows = [row for row in read_jsonl(path) if "messages" in row]
    if not rows:
        raise ValueError(f"{path}: preference.task_test holds no chat rows (with `messages`)")
    metrics = [m for m in resolve_metrics(recipe.eval.metrics, rows) if m != "perplexity"]
    budget = answer_budget(
        recipe.eval.max_new_tokens, tokenizer, [str(r["messages"][-1].get("content") or "") for r in rows]
    )
    for system in ("base", "tuned"):
        model, context = models.get(system)
        with context():
            generation = generate_timed(
                model,
                tokenizer,
                [row["messages"][:-1] for row in rows],
                budget.tokens,
                recipe.eval.batch_size,
                autocast,
                desc=f"eval {system}",
                progress=progress,
            )
        systems[system].update(score_system(rows, generation.answers, None, metrics, recipe.eval.sandbox)[0])
    return {"path": str(path), "sha256": file_sha256(path), "rows": len(rows), "metrics": metrics}


def prediction_rows(rows: Rows, scores: dict[str, tuple[SequenceLogps, SequenceLogps]]) -> Rows:
    """eval/predictions.jsonl: per pair and system, both answers' log-probabilities and whether chosen won
    (`reference` is the chosen answer, `prediction` the rejected one, as the report's tables show them)."""
    out = []
    for system, (chosen, rejected) in scores.items():
        for i, row in enumerate(rows):
            out.append(
                {
                    "id": row["id"],
                    "system": system,
                    "question": last_user_text(row["prompt"]),
                    "reference": row["chosen"],
                    "prediction": row["rejected"],
                    "logp_chosen": round(float(chosen.total[i]), 4),
                    "logp_rejected": round(float(rejected.total[i]), 4),
                    "correct": bool(chosen.total[i] > rejected.total[i]),
                }
            )
    return out


# ---- sequential stages and replay --------------------------------------------------------------------


def score_model(recipe: Recipe, model_spec: str) -> dict[str, Any]:
    """A plain causal LM's preference accuracy on this stage's test pairs (higher is better)."""
    from afina.models import load_model

    device = pick_device()
    autocast = autocast_factory(resolve_precision(recipe.training.precision, device), device)
    tokenizer = load_tokenizer(model_spec)
    rows = [row for row in eval_rows(recipe) if "chosen" in row]
    model = load_model(model_spec, recipe_weight_dtype(recipe, device)).to(device).eval()
    metrics = preference_metrics(*pair_scores(model, tokenizer, rows, recipe.eval.batch_size, autocast))
    return {
        "metric": "preference_accuracy",
        "value": metrics["preference_accuracy"],
        "lower_is_better": False,
        "examples": len(rows),
    }


def as_chat_rows(recipe: Recipe, rows: Rows) -> Rows:
    """The preferred answers as chats (pairs: the chosen answer; KTO: the desirable ones)."""
    out = []
    for row in rows:
        answer = row.get("chosen") or (row["completion"] if row.get("desirable") else None)
        if answer is not None:
            out.append({"id": row.get("id"), "messages": [*row["prompt"], {"role": "assistant", "content": answer}]})
    return out


TASK = TaskType(
    name="preference",
    training_task=training_task,
    evaluate=evaluate,
    score_model=score_model,
    as_chat_rows=as_chat_rows,
    schemas=("preference", "kto"),
)
