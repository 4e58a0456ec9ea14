"""Turn encoded examples into micro-batches: padded rows, or packed rows without padding.

Packed rows hold several examples back to back. Position ids restart at 0 for each example,
and transformers builds a block-diagonal causal mask from them (no attention across examples)
when no attention mask is passed. The first token of every example carries no label, so that
no example learns to predict its neighbour's first token.
"""

from __future__ import annotations

import random

import torch

from afina.data.format import IGNORE_INDEX


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


def pack_examples(examples: list[dict[str, list[int]]], order: list[int], pack_length: int) -> list[list[int]]:
    """Group example indices into packs of at most pack_length tokens (first fit, in the given order)."""
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        for p, free in enumerate(room):
            if n <= free:
                packs[p].append(i)
                room[p] -= n
                break
        else:
            packs.append([i])
            room.append(pack_length - n)
    return packs


def collate_packed(
    examples: list[dict[str, list[int]]], packs: list[list[int]], pad_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """Rows of concatenated examples with restarting position ids; no attention mask.

    Rows are padded to `width` (the pack length) so that every micro-batch has the same shape:
    compiled graphs and oneDNN kernels are then built once.
    """
    rows = []
    for pack in packs:
        ids, labels, positions = [], [], []
        for i in pack:
            e = examples[i]
            ids += e["input_ids"]
            labels += [IGNORE_INDEX] + e["labels"][1:]
            positions += list(range(len(e["input_ids"])))
        rows.append((ids, labels, positions))
    width = max([len(r[0]) for r in rows] + [width or 0])
    out_ids, out_labels, out_pos = [], [], []
    for ids, labels, positions in rows:
        fill = width - len(ids)
        # The padding tail is a separate block of its own (positions restart), with no labels.
        out_ids.append(ids + [pad_id] * fill)
        out_labels.append(labels + [IGNORE_INDEX] * fill)
        out_pos.append(positions + list(range(fill)))
    return {
        "input_ids": torch.tensor(out_ids, dtype=torch.long),
        "position_ids": torch.tensor(out_pos, dtype=torch.long),
        "labels": torch.tensor(out_labels, dtype=torch.long),
    }


def collate_continuous(
    examples: list[dict[str, list[int]]], packs: list[list[int]], pad_id: int, width: int
) -> dict[str, torch.Tensor]:
    """Rows of concatenated documents with positions 0..width-1 running across them (plain causal attention).

    For context extension: the long positions are what the model must learn, so rows are filled
    like pretraining sequences instead of restarting positions per example. Every token keeps its
    label; the padding tail (after the last document) has none.
    """
    rows = []
    for pack in packs:
        ids, labels = [], []
        for i in pack:
            ids += examples[i]["input_ids"]
            labels += examples[i]["labels"]
        rows.append((ids, labels))
    width = max([len(ids) for ids, _ in rows] + [width])  # an example longer than the row gets a row of its own
    out_ids, out_labels = [], []
    for ids, labels in rows:
        fill = width - len(ids)
        out_ids.append(ids + [pad_id] * fill)
        out_labels.append(labels + [IGNORE_INDEX] * fill)
    return {
        "input_ids": torch.tensor(out_ids, dtype=torch.long),
        "position_ids": torch.arange(width).repeat(len(packs), 1),
        "labels": torch.tensor(out_labels, dtype=torch.long),
    }


def epoch_batches(
    examples: list[dict[str, list[int]]], batch_size: int, rng: random.Random, pack_length: int | None
) -> list[list[list[int]]]:
    """One epoch of micro-batches, as lists of example indices per row.

    Unpacked: each row is one example; examples of similar length share a micro-batch (sorted
    within windows of 8 batches), and the batches come in random order.
    Packed: rows are packs of examples in shuffled order; batch_size counts packed rows.
    """
    order = list(range(len(examples)))
    rng.shuffle(order)
    if pack_length:
        packs = pack_examples(examples, order, pack_length)
        return [packs[i : i + batch_size] for i in range(0, len(packs), batch_size)]
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i]["input_ids"]))
        batches += [[[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(
    examples: list[dict[str, list[int]]],
    rows: list[list[int]],
    pad_id: int,
    pack_length: int | None,
    continuous: bool = False,
) -> dict[str, torch.Tensor]:
    """A micro-batch: packed rows of pack_length tokens (positions restarting per example, or
    `continuous` across the row), or padded single examples."""
    if pack_length and continuous:
        return collate_continuous(examples, rows, pad_id, pack_length)
    if pack_length:
        return collate_packed(examples, rows, pad_id, width=pack_length)
    return pad_batch([examples[row[0]] for row in rows], pad_id)


def pack_settings(recipe) -> tuple[int | None, bool]:
    """(tokens per packed row or None when not packing, whether positions run across the row).

    With rope scaling the rows default to the extended window and positions run continuously:
    training at the target length is what teaches the model its new positions.
    """
    cfg, context = recipe.training, recipe.context
    if not cfg.packing:
        return None, False
    extending = context.rope_scaling != "none"
    default = recipe.data.max_length
    if extending and context.target_length:
        default = context.target_length
    return cfg.pack_length or default, extending and context.continuous_positions
