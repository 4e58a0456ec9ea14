"""What the training loop needs from a task type (the task types themselves live in afina/tasks/)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainingTask:
    """The examples, model and loss of one task type, handed to `train()` and `estimate()`.

    encode: canonical rows -> examples (each a dict with `input_ids` and `labels` lists)
    build_model: device -> the model, with exactly the trainable weights requiring grad
    collate(examples, rows, pad_id, pack_length): a micro-batch of tensors (None: the causal-LM default)
    loss_fn(model, **batch) -> (loss sum, label count); count_fn(micro_batches) -> label count
    """

    tokenizer: Any
    encode: Callable[[list[dict[str, Any]]], list[dict[str, list[int]]]]
    build_model: Callable[[Any], Any]
    output_dir: Path
    method: str
    collate: Callable[..., dict] | None = None
    loss_fn: Callable[..., tuple] | None = None
    count_fn: Callable[[list[dict]], int] | None = None
    supports_packing: bool = True
    param_groups: Callable[[Any], list[dict[str, Any]]] | None = None
    on_save: Callable[[Path], None] | None = None  # writes what prediction needs beside the weights (labels)
    builds_on_meta: bool = False  # build_model(meta device) builds from the config: FSDP then loads only its shards
    extra_summary: dict[str, Any] = field(default_factory=dict)
