"""The loss math, in one place: training, validation and evaluation all call it.

Only positions that carry a label go through the output layer: with a 49k vocabulary, the
logits of every position would dominate memory, and most positions (system prompt, user turn,
padding) carry no loss.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from afina.data.format import IGNORE_INDEX
from afina.train.batches import pad_batch


def causal_lm_parts(model):
    """The decoder body and output layer of a causal LM, through a peft wrapper if present."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


LOSS_CHUNK_TOKENS = 2048


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy, computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _chunk_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(head(hidden), targets)


def hidden_loss_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed loss of hidden states (n, d) predicting targets (n,), LOSS_CHUNK_TOKENS logits at a time
    (no gradient: for scoring long sequences without holding all their logits)."""
    with torch.no_grad():
        return sum(
            float(_chunk_loss_sum(head, hidden[i : i + LOSS_CHUNK_TOKENS], targets[i : i + LOSS_CHUNK_TOKENS]))
            for i in range(0, len(targets), LOSS_CHUNK_TOKENS)
        )


def label_token_loss(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and how many there are.

    Callers divide by the token count of the whole accumulated batch, so that every label token
    weighs the same however the examples fall into micro-batches. Packed rows pass position_ids
    and no attention mask. Beyond LOSS_CHUNK_TOKENS labelled positions, the logits are computed
    chunk by chunk (with a gradient: recomputed in the backward pass), so the full logits never exist
    at once, in training or in validation.
    """
    decoder, head = causal_lm_parts(model)
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    # Position t predicts token t+1.
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    n_tokens = int(selected.sum())
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0
    hidden, targets = hidden[:, :-1][selected], targets[selected]
    if n_tokens <= LOSS_CHUNK_TOKENS:
        return _chunk_loss_sum(head, hidden, targets), n_tokens
    if not torch.is_grad_enabled():  # validation and scoring: chunk by chunk too, nothing to recompute
        return torch.tensor(hidden_loss_sum(head, hidden, targets), device=hidden.device), n_tokens
    from torch.utils.checkpoint import checkpoint

    loss_sum = sum(
        checkpoint(
            _chunk_loss_sum,
            head,
            hidden[i : i + LOSS_CHUNK_TOKENS],
            targets[i : i + LOSS_CHUNK_TOKENS],
            use_reentrant=False,
        )
        for i in range(0, n_tokens, LOSS_CHUNK_TOKENS)
    )
    return loss_sum, n_tokens


def count_label_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> int:
    """Positions that carry a loss (targets are the labels shifted by one)."""
    return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)


def accumulate_gradients(
    model,
    micro_batches: list[dict[str, torch.Tensor]],
    autocast,
    denominator: int | None = None,
    loss_fn=None,
    count_fn=None,
    no_sync=None,
) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; return (loss, label count).

    The loss is normalised by the labels of all micro-batches of the step together (pass
    `denominator` when the step spans several processes), so the gradient equals that of one big
    batch, however the examples are split (averaging per micro-batch instead weighs tokens
    unequally when micro-batches hold different token counts). `loss_fn(model, **batch)` returns
    (loss sum, label count) and `count_fn(micro_batches)` counts labels; both default to next-token
    loss over labelled tokens (the head tasks pass sequence_label_loss or token_label_loss).
    `no_sync()`: a context under which the backward keeps gradients local (DDP's); every micro-batch but
    the last runs under it, so the processes exchange gradients once per step.
    """
    loss_fn = loss_fn or label_token_loss
    n_label = (count_fn or count_label_tokens)(micro_batches)
    denominator = max(denominator if denominator is not None else n_label, 1)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with autocast():
                loss_sum, _ = loss_fn(model, **batch)
            (loss_sum / denominator).backward()
        total += float(loss_sum.detach())
    return total / denominator, n_label


@torch.no_grad()
def mean_label_loss(
    model, encoded: list[dict[str, Any]], pad_id: int, batch_size: int, autocast, loss_fn=None, collate=None
) -> float:
    """Mean loss per label over a dataset (validation / test loss; perplexity is its exp): per token
    for causal LM targets, per example or per tagged word with a head's loss_fn, per pair with a
    preference loss (`collate`: the task's own micro-batches, as in training)."""
    total, count = label_loss_sum(model, encoded, pad_id, batch_size, autocast, loss_fn, collate)
    return total / max(count, 1)


@torch.no_grad()
def label_loss_sum(
    model, encoded: list[dict[str, Any]], pad_id: int, batch_size: int, autocast, loss_fn=None, collate=None
) -> tuple[float, int]:
    """Summed loss over the labels of a dataset, and their count (to combine parts label-weighted)."""
    loss_fn = loss_fn or label_token_loss
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        end = min(start + batch_size, len(encoded))
        batch = (
            collate(encoded, [[i] for i in range(start, end)], pad_id, None)
            if collate is not None
            else pad_batch(encoded[start:end], pad_id)
        )
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with autocast():
            loss_sum, n = loss_fn(model, **batch)
        total += float(loss_sum)
        count += n
    return total, count


# ---- heads: one label per sequence (classification) or per word (tagging) ----------------------


def sequence_label_loss(
    model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy of a sequence-classification model's logits against one class id per row.

    `labels` holds the class id at position 0 of each row (pad_batch pads the rest with
    IGNORE_INDEX). The model pools its own way: an LLM's last non-padding token
    (AutoModelForSequenceClassification), an encoder's [CLS].
    """
    targets = labels[:, 0]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    # A row whose label is outside the label set (IGNORE_INDEX) adds nothing and is not counted.
    return F.cross_entropy(logits, targets, reduction="sum"), int((targets != IGNORE_INDEX).sum())


def token_label_loss(
    model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy over tagged positions (the first sub-token of each word), and how many."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    selected = labels != IGNORE_INDEX
    n = int(selected.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits[selected].float(), labels[selected], reduction="sum"), n


def count_sequences(micro_batches: list[dict[str, torch.Tensor]]) -> int:
    return sum(int((b["labels"][:, 0] != IGNORE_INDEX).sum()) for b in micro_batches)


def count_tagged_tokens(micro_batches: list[dict[str, torch.Tensor]]) -> int:
    return sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)


@torch.no_grad()
def head_logits(
    model, encoded: list[dict[str, list[int]]], pad_id: int, batch_size: int, autocast
) -> list[torch.Tensor]:
    """A head model's logits per example: [classes] for sequence heads, [tokens, tags] for token heads."""
    out: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        batch = pad_batch(chunk, pad_id)
        with autocast():
            logits = (
                model(
                    input_ids=batch["input_ids"].to(model.device),
                    attention_mask=batch["attention_mask"].to(model.device),
                )
                .logits.float()
                .cpu()
            )
        for i, example in enumerate(chunk):
            out.append(logits[i] if logits.dim() == 2 else logits[i, : len(example["input_ids"])])
    return out


def choose_label(label_scores: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Constrained prediction over a label set: the argmax of per-label log-probabilities, and the
    probabilities renormalised over the label set (sequence scores of different labels compete)."""
    return int(label_scores.argmax()), torch.softmax(label_scores, dim=-1)


@torch.no_grad()
def label_logprobs(model, encoded: list[dict[str, list[int]]], pad_id: int, batch_size: int, autocast) -> list[float]:
    """Per example, the summed log-probability of its labelled tokens (multiple-choice scoring)."""
    scores: list[float] = []
    decoder, head = causal_lm_parts(model)
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


def split_at_answer(example: dict[str, list[int]]) -> tuple[list[int], dict[str, list[int]]]:
    """An encoded example cut where its labelled tokens begin: (prompt ids, continuation with its labels)."""
    first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    return example["input_ids"][:first], {
        "input_ids": example["input_ids"][first:],
        "labels": example["labels"][first:],
    }


def fork_cache(cache):
    """A cache that starts from `cache`'s keys and values and grows on its own, leaving `cache` as it was. A
    dynamic layer replaces its tensors when it grows (concatenation; a sliding window slices) and never writes
    into them, so shallow copies of the cache and its layers share the prompt's tensors at no cost; any other
    kind of layer is deep-copied (a crop would not do: sliding-window layers drop states as they grow)."""
    import copy

    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # transformers before the per-layer caches
        DynamicLayer = None  # noqa: N806
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or layers is None or not all(isinstance(layer, DynamicLayer) for layer in layers):
        return copy.deepcopy(cache)
    fork = copy.copy(cache)
    fork.layers = [copy.copy(layer) for layer in layers]
    return fork


@torch.no_grad()
def continuation_logprobs(
    model, prompts: list[list[int]], continuations: list[list[dict[str, list[int]]]], pad_id: int, autocast
) -> list[list[float]]:
    """For each prompt, the summed log-probability of the labelled tokens of each of its continuations: equal to
    label_logprobs on prompt + continuation, at a fraction of the cost when prompts are long and continuations
    short (a classifier's labels). Each prompt runs once; its keys and values are cached and every continuation
    reads them through a fork of the cache (fork_cache: nothing copied). The prompts form one batch, left-padded
    (a sliding-window cache keeps a prompt's last states, which must be its own tokens), positions counted from
    each prompt's first token."""
    from transformers import DynamicCache

    decoder, head = causal_lm_parts(model)
    # transformers renamed the decoder's past_key_values to cache (5.2x; the old name warns, then goes in 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    device = model.device
    batch = pad_batch([{"input_ids": p} for p in prompts], pad_id, side="left")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    lengths = mask.sum(dim=1)
    cache = DynamicCache()
    with autocast():
        hidden = decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
            use_cache=True,
            **{cache_arg: cache},
        ).last_hidden_state
    last = hidden[:, -1]  # each prompt's final state: it predicts the continuation's first token
    scores: list[list[float]] = [[] for _ in prompts]
    labels = max(len(c) for c in continuations)
    for k in range(labels):  # a prompt with fewer continuations repeats its last (that score is not kept)
        tail = pad_batch([c[min(k, len(c) - 1)] for c in continuations], pad_id)
        tail_ids, tail_mask = tail["input_ids"].to(device), tail["attention_mask"].to(device)
        positions = lengths[:, None] + torch.arange(tail_ids.shape[1], device=device)[None]
        with autocast():
            tail_hidden = decoder(
                input_ids=tail_ids,
                attention_mask=torch.cat([mask, tail_mask], dim=1),
                position_ids=positions,
                use_cache=True,
                **{cache_arg: cache if k == labels - 1 else fork_cache(cache)},
            ).last_hidden_state
        states = torch.cat([last[:, None].to(tail_hidden.dtype), tail_hidden[:, :-1]], dim=1)
        targets = tail["labels"].to(device)
        selected = targets != IGNORE_INDEX
        token_logprob = -F.cross_entropy(head(states[selected]).float(), targets[selected], reduction="none")
        sums = torch.zeros(len(prompts), device=device).index_add_(0, selected.nonzero()[:, 0], token_logprob)
        for i, value in enumerate(sums.tolist()):
            if k < len(continuations[i]):
                scores[i].append(value)
    return scores


def answer_logprobs(
    model, groups: list[list[dict[str, list[int]]]], pad_id: int, batch_size: int, autocast
) -> list[list[float]]:
    """Multiple-choice scoring: each group holds encoded examples that differ only in their answer (a classifier's
    labels, a question's choices); per group, each answer's summed labelled-token log-probability. A group whose
    examples share the prompt runs it once (continuation_logprobs, batch_size groups per pass); one whose chat
    template renders the prompt differently per answer is scored whole (label_logprobs)."""
    out: list[list[float]] = [[] for _ in groups]
    for start in range(0, len(groups), batch_size):
        chunk = groups[start : start + batch_size]
        split = [[split_at_answer(e) for e in group] for group in chunk]
        shared = [i for i, parts in enumerate(split) if all(prompt == parts[0][0] for prompt, _ in parts)]
        if shared:
            prompts = [split[i][0][0] for i in shared]
            tails = [[tail for _, tail in split[i]] for i in shared]
            scored = continuation_logprobs(model, prompts, tails, pad_id, autocast)
            for i, values in zip(shared, scored):
                out[start + i] = values
        whole = sorted(set(range(len(chunk))) - set(shared))
        if whole:
            flat = label_logprobs(model, [e for i in whole for e in chunk[i]], pad_id, batch_size, autocast)
            for i in whole:
                out[start + i], flat = flat[: len(chunk[i])], flat[len(chunk[i]) :]
    return out
