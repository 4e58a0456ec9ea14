"""The loss math, in one place: training, validation and evaluation all call it.

Only positions that carry a label go through the output layer: with a 49k vocabulary, the
logits of every position would dominate memory, and most positions (system prompt, user turn,
padding) carry no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afina.data.format import IGNORE_INDEX


def _causal_lm_parts(model):
    """The decoder body and output layer of a causal LM, through a peft wrapper if present."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def label_token_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and how many there are.

    Callers divide by the token count of the whole accumulated batch, so that every label token
    weighs the same however the examples fall into micro-batches.
    """
    decoder, head = _causal_lm_parts(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # Position t predicts token t+1.
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    n_tokens = int(selected.sum())
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0
    logits = head(hidden[:, :-1][selected])
    loss_sum = F.cross_entropy(logits.float(), targets[selected], reduction="sum")
    return loss_sum, n_tokens


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Stack token lists into padded tensors; labels are IGNORE_INDEX on padding."""
    width = max(len(e["input_ids"]) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        fill = width - n
        row_labels = e.get("labels", [IGNORE_INDEX] * n)
        if side == "right":
            ids.append(e["input_ids"] + [pad_id] * fill)
            mask.append([1] * n + [0] * fill)
            labels.append(row_labels + [IGNORE_INDEX] * fill)
        else:
            ids.append([pad_id] * fill + e["input_ids"])
            mask.append([0] * fill + [1] * n)
            labels.append([IGNORE_INDEX] * fill + row_labels)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def accumulate_gradients(model, micro_batches: list[dict[str, torch.Tensor]], autocast) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; return (mean loss, label tokens).

    The loss is normalised by the label tokens of all micro-batches together, so the gradient
    equals that of one big batch, however the examples are split (the accumulation bug that
    averaging per micro-batch introduces when micro-batches hold different token counts).
    """
    n_label = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    denominator = max(n_label, 1)
    total = 0.0
    for batch in micro_batches:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with autocast():
            loss_sum, _ = label_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        (loss_sum / denominator).backward()
        total += float(loss_sum.detach())
    return total / denominator, n_label


@torch.no_grad()
def mean_label_loss(model, encoded: list[dict[str, list[int]]], pad_id: int, batch_size: int, autocast) -> float:
    """Mean per-token loss over labelled tokens of a dataset (validation / test loss)."""
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = pad_batch(encoded[start : start + batch_size], pad_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with autocast():
            loss_sum, n = label_token_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total += float(loss_sum)
        count += n
    return total / max(count, 1)


@torch.no_grad()
def label_logprobs(model, encoded: list[dict[str, list[int]]], pad_id: int, batch_size: int, autocast) -> list[float]:
    """Per example, the summed log-probability of its labelled tokens (multiple-choice scoring)."""
    scores: list[float] = []
    decoder, head = _causal_lm_parts(model)
    for start in range(0, len(encoded), batch_size):
        batch = pad_batch(encoded[start : start + batch_size], pad_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with autocast():
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = batch["labels"][:, 1:]
        selected = targets != IGNORE_INDEX
        logits = head(hidden[:, :-1][selected]).float()
        token_logprob = -F.cross_entropy(logits, targets[selected], reduction="none")
        rows = selected.nonzero()[:, 0]  # which example each selected position belongs to
        sums = torch.zeros(len(targets), device=token_logprob.device).index_add_(0, rows, token_logprob)
        scores += sums.tolist()
    return scores
