"""FSDP that never holds the whole model in one process.

    1. build the model on the meta device from its config (shapes only; the method applied, as
       training applies it: LoRA modules or every weight trainable);
    2. shard it with FSDP2 (`fully_shard`): every decoder layer, then the rest (embeddings, final
       norm, output layer) at the root; `to_empty` then allocates only this process's shards;
    3. fill each shard from the safetensors files, reading only this process's rows of every
       tensor (`safe_open(...).get_slice`); adapter matrices start from lora_a_start (a function
       of the seed and the parameter's name, as in an unsharded run); rotary tables are recomputed;
    4. train; checkpoints are sharded (torch.distributed.checkpoint, train/sharded_checkpoint.py);
    5. the result is written whole but streamed one tensor at a time (write_streamed_safetensors):
       each tensor is gathered, written by rank 0 and dropped, so no process ever holds the model.

Weights trained in bfloat16 keep float32 shards and FSDP's mixed precision gathers them in
bfloat16 (its master copy); a LoRA base is sharded in model.dtype as it is.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from afina.models.saved import require_tensors


def shard_model(model, param_dtype: torch.dtype | None = None) -> None:
    """fully_shard every decoder layer, then the embeddings, final norm and output layer as one group (the
    output layer may share the embedding's weight; the loss calls it apart from the decoder, train/loss.py).
    Gradients are reduce-scattered as a plain sum (the loss is already normalised over the global batch).
    param_dtype: gather the (float32) shards in this dtype for compute (FSDP mixed precision)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    options: dict[str, Any] = {"mp_policy": policy} if policy else {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    layers = list(decoder.layers)
    for layer in layers:
        fully_shard(layer, **options)
    claimed = {id(p) for layer in layers for p in layer.parameters()}
    rest = [
        m
        for m in (decoder.get_input_embeddings(), getattr(decoder, "norm", None), base.get_output_embeddings())
        if m is not None and any(id(p) not in claimed for p in m.parameters())
    ]
    leftover = [
        n
        for n, p in base.named_parameters()
        if id(p) not in claimed and not any(p is q for m in rest for q in m.parameters())
    ]
    if leftover:
        raise ValueError(
            f"FSDP: parameters outside the decoder layers, embeddings, norm and output layer ({leftover[0]}, "
            "...) are not sharded by afina; use training.distributed=ddp for this model"
        )
    fully_shard(rest, **options)
    # A root over them all, with no parameters of its own: the loss calls the decoder and the output layer
    # apart (train/loss.py), never the root's forward, so start_root() initialises it once the weights are in.
    fully_shard(model, **options)
    for module in [*layers, rest[0], model]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def start_root(model) -> None:
    """Initialise the FSDP root (what its first forward would do) once every shard holds its values."""
    model._get_fsdp_state()._lazy_init()


def checkpoint_key(name: str) -> str:
    """A parameter's name in the sharded (peft-wrapped) model -> its key in the base model's safetensors."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class SafetensorsFolder:
    """The tensors of a Hugging Face folder (model.safetensors or sharded with an index), read in slices."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
                weight_map = dict.fromkeys(fh.keys(), "model.safetensors")
        else:
            raise FileNotFoundError(
                f"{folder}: no model.safetensors (or index); FSDP loads its shards from safetensors "
                "files: convert the model to safetensors or use training.distributed=ddp"
            )
        self.folder, self.weight_map = folder, weight_map
        self._open: dict[str, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (dimension 0) of a tensor, reading only those bytes; a 0-d tensor whole."""
        from safetensors import safe_open

        file = self.weight_map[key]
        if file not in self._open:
            self._open[file] = safe_open(str(self.folder / file), framework="pt")
        piece = self._open[file].get_slice(key)
        return piece[start:stop] if len(piece.get_shape()) else piece[:]


def shard_rows(param) -> tuple[int, int]:
    """The rows (dimension 0) of the whole tensor that this process's shard holds (FSDP2 splits as torch.chunk)."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 0
    rows = param.shape[0]
    per_rank = math.ceil(rows / param.device_mesh.size())
    start = min(per_rank * param.device_mesh.get_local_rank(), rows)
    return start, min(start + per_rank, rows)


def load_shards(model, folder: Path, seed: int) -> None:
    """Fill a sharded model that `to_empty` allocated: each shard from its rows in the safetensors files,
    LoRA A from lora_a_start and LoRA B with zeros, the rotary tables recomputed."""
    from afina.train.methods import lora_a_start

    files = SafetensorsFolder(folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            start, stop = shard_rows(param)
            key = checkpoint_key(name)
            if key in files:
                value = files.rows(key, start, stop)
            elif ".lora_A." in name:
                value = lora_a_start(name, tuple(param.shape), seed)[start:stop]
            elif ".lora_B." in name:
                value = torch.zeros(stop - start, *param.shape[1:])
            else:
                raise ValueError(
                    f"{folder}: no tensor {key} for parameter {name}; the folder does not match the config"
                )
            local.copy_(value.to(local.dtype))
        for module in model.modules():
            if type(module).__name__.endswith("RotaryEmbedding"):  # non-persistent buffers: computed, not stored
                fresh = type(module)(module.config)
                for buffer_name, buffer in fresh.named_buffers(recurse=False):
                    getattr(module, buffer_name).copy_(buffer)
        for name, buffer in model.named_buffers():
            key = checkpoint_key(name)
            if key in files:
                buffer.copy_(files.rows(key, 0, buffer.shape[0] if buffer.dim() else 0))


def build_sharded_model(build_model, spec: str, device: torch.device, weight_dtype: str, full: bool, seed: int):
    """The model on `device` with only this process's shards ever allocated.

    build_model(device) is the task's builder; called with the meta device it builds from the config."""
    from afina.models import resolve_model

    model = build_model(torch.device("meta"))
    mixed = full and weight_dtype != "float32"
    if mixed:  # float32 shards (the master copy), gathered in bfloat16/float16 for compute
        model.float()
    shard_model(model, getattr(torch, weight_dtype) if mixed else None)
    model.to_empty(device=device)
    load_shards(model, Path(resolve_model(spec)), seed)
    start_root(model)
    return model


def held_bytes(model, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this process holds (its shards, or whole tensors)."""

    def local_bytes(t) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = {id(p): p for p in model.parameters()}.values()
    state = 0
    seen: set[int] = set()
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if torch.is_tensor(value) and value.dim() > 0:
                local = value.to_local() if isinstance(value, DTensor) else value
                if local.untyped_storage().data_ptr() not in seen:
                    seen.add(local.untyped_storage().data_ptr())
                    state += local.numel() * local.element_size()
    for master in getattr(optimizer, "master", []):
        state += local_bytes(master)
    return {
        "parameters": sum(local_bytes(p) for p in params),
        "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": state,
    }


def max_over_processes(values: dict[str, int], device: torch.device) -> dict[str, int]:
    """The largest of each value over the processes; `device`: the one the backend takes tensors on."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {key: int(v) for key, v in zip(values, t.tolist(), strict=True)}


SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float64: "F64",
}


def write_streamed_safetensors(
    path: Path,
    tensors: list[tuple[str, Any]],
    write: bool,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write (name, parameter) pairs as one safetensors file, one tensor at a time.

    Every process calls this (each sharded tensor is gathered with full_tensor(), a collective); the
    process with write=True writes it and drops it before the next. The header (names, dtypes, shapes,
    offsets) is known from the shapes alone, so it goes first. dtype: cast floating tensors to it."""

    require_tensors(tensors, str(path))  # a header without weights would load as an untrained model

    def out_dtype(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors:
        size = math.prod(t.shape) * torch.empty((), dtype=out_dtype(t)).element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[out_dtype(t)],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") if write else contextlib.nullcontext() as fh:
        if fh:
            fh.write(struct.pack("<Q", len(encoded)) + encoded)
        for _, t in tensors:
            whole = t.full_tensor().detach() if isinstance(t, DTensor) else t.detach()
            if fh:
                data = whole.to("cpu", out_dtype(t)).contiguous()
                fh.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            del whole


def adapter_names(model, names: list[str]) -> dict[str, str]:
    """peft's own file names for the adapter's parameters (`...lora_A.default.weight` -> `...lora_A.weight`),
    by parameter name.

    peft's get_peft_model_state_dict picks and renames the adapter's entries of a state dict; it is given
    one small integer tag per name (plain tensors: peft 0.22+ gathers DTensors into new tensors, so neither the
    sharded parameters nor their identities may go in) and the tags it returns say which name became which.
    Every trainable parameter must come back, exactly once: a parameter peft would not save, or a name
    it returns twice, is an error here rather than an adapter file that silently lacks it."""
    from peft import get_peft_model_state_dict

    tags = {name: torch.tensor(i, dtype=torch.int64) for i, name in enumerate(names)}
    renamed = get_peft_model_state_dict(model, state_dict=tags)
    found: dict[str, str] = {}
    for file_name, tag in renamed.items():
        name = names[int(tag)]
        if name in found:
            raise RuntimeError(f"peft saves parameter {name} twice ({found[name]}, {file_name})")
        found[name] = file_name
    missing = [name for name in names if name not in found]
    if missing:
        raise RuntimeError(
            f"peft does not save {len(missing)} of the {len(names)} trainable parameters "
            f"(first: {missing[0]}); the adapter would be incomplete"
        )
    return found


def save_streamed_result(model, out_dir: Path, method_type: str, write: bool, dtype: torch.dtype | None) -> None:
    """The trained adapter (peft layout) or full model (transformers layout) written whole from shards,
    one tensor at a time; rank 0 (write=True) also writes the config."""
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
    if method_type == "full":
        params = list(model.named_parameters())  # a tied output layer is the embedding's parameter: listed once
        write_streamed_safetensors(out_dir / "model.safetensors", params, write, dtype)
        if write:
            model.config.save_pretrained(out_dir)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(out_dir)
        return
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    file_names = adapter_names(model, list(trainable))
    ordered = [(file_names[name], p) for name, p in trainable.items()]
    write_streamed_safetensors(out_dir / "adapter_model.safetensors", ordered, write)
    if write:
        import copy

        config = copy.copy(model.peft_config["default"])
        config.inference_mode = True  # as peft's save_pretrained writes it
        config.save_pretrained(str(out_dir))
