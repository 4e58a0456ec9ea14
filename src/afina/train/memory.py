"""What a training run holds in memory per device, from the model's config alone.

The model is built on the meta device (shapes, no storage, no weights read), the method applied to
it as training applies it, and every tensor's bytes added up by what it is:

    weights      frozen and trained parameters in model.dtype; QLoRA's 4-bit linear layers at
                 0.5 byte a weight plus their quantization constants; adapters in float32
    gradients    one per trained parameter, in its dtype
    optimizer    the optimizer's state (train/optim.py: state_bytes) and, for weights trained in
                 bfloat16/float16, their float32 master copy
    activations  what the backward pass keeps for one micro-batch (a per-token, per-layer model with
                 factors measured per method, weight dtype and precision)
    runtime      on a CPU, the resident memory of the process before any model is loaded
                 (torch, transformers and the tokenizer) and the allocator's slack (a quarter of the
                 activations): the measured peak is resident memory

Under FSDP every parameter, gradient and optimizer state is split across the processes, and the
weights of the groups running (two decoder layers, the embeddings and output layer) are gathered
whole for a while; DDP and a single process hold them whole. Activations belong to each
process's own micro-batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from afina.train.loss import LOSS_CHUNK_TOKENS
from afina.train.optim import state_bytes

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights; double quantization stores it in 8 bits
NF4_DQ_BLOCK = 256  # ... with one float32 scale per 256 of those absmax values


@dataclass(frozen=True)
class MemoryPlan:
    """The settings that decide a run's memory (a recipe gives them; `afina estimate` may override some)."""

    method: Any  # MethodConfig
    weight_dtype: str = "float32"  # resolved model.dtype
    precision: str = "bf16"  # resolved training.precision
    optimizer: str = "adamw"
    processes: int = 1
    strategy: str = "ddp"
    rows: int = 8  # micro-batch rows per process
    tokens: int = 4096  # tokens per micro-batch per process (rows x sequence length, or packed)
    gradient_checkpointing: bool = False
    cpu_allocator: bool = True  # the runtime counts a CPU allocator's slack (measured on CPUs only)

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.processes > 1

    def replace(self, **changes) -> MemoryPlan:
        return dataclasses.replace(self, **changes)


def model_config(spec: str):
    """The model's config without reading its weights: a packaged model's or a .gguf file's metadata,
    a local folder's config.json, or a hub name's config."""
    from transformers import AutoConfig

    from afina.models.loader import PACKAGED_MODELS, ModelError

    path = PACKAGED_MODELS[spec].locate() if spec in PACKAGED_MODELS else Path(spec).expanduser()
    if path is None:
        raise ModelError(
            f"packaged model '{spec}' is not installed; install it with: {PACKAGED_MODELS[spec].pip_install}"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        path = ggufs[0] if len(ggufs) == 1 else path
    if path.suffix.lower() == ".gguf":
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(str(path) if path.exists() else spec)


def meta_model(config, method):
    """The model with the method applied, on the meta device: every parameter's shape, no storage."""
    from transformers import AutoModelForCausalLM

    from afina.train.methods import apply_method

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    method = method.model_copy(update={"type": "lora"}) if method.type == "qlora" else method
    return apply_method(model, method)


def _is_quantized(name: str, param, method_type: str) -> bool:
    """QLoRA quantizes the frozen weight of every linear layer but the output layer."""
    return (
        method_type == "qlora"
        and not param.requires_grad
        and param.dim() == 2
        and "lm_head" not in name
        and "embed" not in name
        and "base_layer" in name
    )


def nf4_bytes(numel: int) -> int:
    """bitsandbytes NF4 with double quantization: half a byte a weight, an 8-bit absmax per 64 weights,
    a float32 scale per 256 absmax values (and 256 float32 code values per tensor)."""
    blocks = -(-numel // NF4_BLOCK)
    return numel // 2 + blocks + 4 * (-(-blocks // NF4_DQ_BLOCK)) + 4 * 256


def parameter_memory(model, plan: MemoryPlan) -> dict[str, int]:
    """Weights, gradients and optimizer state per process, in bytes, of a (meta) model under the plan."""
    weights = gradients = optimizer = 0
    shards = plan.processes if plan.sharded else 1
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # a tied weight is held once
            continue
        seen.add(id(param))
        numel = param.numel()
        if param.requires_grad:
            # Full fine-tuning trains the weights in model.dtype; adapters (and a new head) are float32.
            dtype = plan.weight_dtype if plan.method.type == "full" else "float32"
            if plan.sharded and dtype != "float32":
                dtype = "float32"  # FSDP keeps float32 shards and gathers them in bfloat16 (its mixed precision)
            weights += numel * DTYPE_BYTES[dtype]
            gradients += numel * DTYPE_BYTES[dtype]
            optimizer += state_bytes(plan.optimizer, tuple(param.shape))
            if dtype != "float32":
                optimizer += 4 * numel  # the float32 master copy
        elif _is_quantized(name, param, plan.method.type):
            weights += nf4_bytes(numel)
        else:
            weights += numel * DTYPE_BYTES[plan.weight_dtype]
    memory = {"weights": weights // shards, "gradients": gradients // shards, "optimizer": optimizer // shards}
    if plan.sharded:
        memory["weights"] += gathered_bytes(model, plan)
    return memory


def gathered_bytes(model, plan: MemoryPlan) -> int:
    """FSDP gathers a group's whole weights while it runs: the embeddings/norm/output group and, with the next
    one prefetched, two decoder layers at a time, in the compute dtype (train/fsdp.py: shard_model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(base.get_decoder().layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    rest = sum({id(p): p.numel() for p in base.parameters() if id(p) not in in_layers}.values())
    compute = 4 if plan.weight_dtype == "float32" else 2
    return (2 * largest + rest) * compute


# What the backward pass keeps per token and decoder layer, as a multiple of (24 * hidden + 10 * intermediate)
# bytes, by method, weight dtype and compute precision. Measured on the default model (SmolLM2-135M: hidden 576,
# intermediate 1536; torch 2.13, transformers 5, peft; sdpa attention): the resident memory a training forward
# adds, over 512 tokens in rows of 128, 256 and 512 (the same per token: no square term with fused attention).
# LoRA keeps more than full fine-tuning: each adapted layer's input is kept again for the adapter's own product.
ACTIVATION_FACTORS = {
    ("full", "float32", "fp32"): 1.55,
    ("full", "float32", "bf16"): 1.37,
    ("full", "low", "bf16"): 0.96,
    ("lora", "float32", "fp32"): 2.60,
    ("lora", "float32", "bf16"): 2.31,
    ("lora", "low", "bf16"): 1.30,
    ("qlora", "float32", "bf16"): 1.82,
    ("qlora", "low", "bf16"): 1.47,
}


def activation_factor(plan: MemoryPlan) -> float:
    method = getattr(plan.method, "type", "lora")  # other peft methods and heads: as LoRA
    kind = method if method in ("full", "qlora") else "lora"
    weights = "float32" if plan.weight_dtype == "float32" else "low"
    compute = "fp32" if weights == "float32" and plan.precision == "fp32" and kind != "qlora" else "bf16"
    return ACTIVATION_FACTORS[(kind, weights, compute)]


def activation_bytes(config, plan: MemoryPlan, label_tokens: int | None = None, attention: str = "sdpa") -> int:
    """What the backward pass keeps per micro-batch: per token and layer (24 * hidden + 10 * intermediate) bytes
    times the measured factor for the method, weight dtype and precision (ACTIVATION_FACTORS); gradient
    checkpointing keeps one hidden state per layer and one layer's worth. The labelled positions' logits
    (at most LOSS_CHUNK_TOKENS at a time) and their log-softmax, in float32.

    Long sequences: with eager attention the score matrices (rows x heads x seq^2, fp32 scores and
    probabilities) are kept per layer and grow with the square of the length; fused (sdpa/flash)
    attention keeps only per-token statistics, so memory stays linear in the length.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    tokens = plan.tokens
    per_layer = int(tokens * (hidden * 24 + inter * 10) * activation_factor(plan))
    if attention == "eager":
        seq = tokens // max(plan.rows, 1)
        per_layer += plan.rows * config.num_attention_heads * seq * seq * 4 * 2
    body = tokens * hidden * 4 * layers + per_layer if plan.gradient_checkpointing else per_layer * layers
    label_tokens = tokens if label_tokens is None else label_tokens
    logits = min(label_tokens, LOSS_CHUNK_TOKENS) * config.vocab_size * 4 * 2
    return int(body + logits)


def runtime_bytes(device: torch.device) -> int:
    """What the process holds before a model: on a CPU its resident memory now (torch, transformers, the
    tokenizer); on a GPU nothing (the peak counted there is torch's allocations)."""
    if device.type != "cpu":
        return 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_estimate(
    config, plan: MemoryPlan, runtime: int = 0, label_tokens: int | None = None, model=None
) -> dict[str, int]:
    """Bytes per process: weights, gradients, optimizer, activations, runtime and their total."""
    model = model if model is not None else meta_model(config, plan.method)
    memory = parameter_memory(model, plan)
    memory["activations"] = activation_bytes(
        config, plan, label_tokens, getattr(config, "_attn_implementation", None) or "sdpa"
    )
    # On a CPU (runtime given) the resident peak also holds the allocator's slack: the blocks one step's activations
    # freed are not all reused by the next, and the peak of the second step is ~25% of the activations above the
    # first (measured on the default model, LoRA/QLoRA/full); later steps add little.
    memory["runtime"] = runtime + (memory["activations"] // 4 if runtime and plan.cpu_allocator else 0)
    memory["total"] = sum(memory.values())
    return memory


def alternatives(
    config, plan: MemoryPlan, runtime: int, label_tokens: int | None = None, model=None
) -> list[tuple[str, int]]:
    """Settings that lower the total, each with the total it gives (smallest first)."""
    options: list[tuple[str, MemoryPlan]] = []
    if plan.method.type == "full":
        options.append(("method.type=lora", plan.replace(method=plan.method.model_copy(update={"type": "lora"}))))
    if plan.method.type in ("full", "lora"):
        options.append(("method.type=qlora", plan.replace(method=plan.method.model_copy(update={"type": "qlora"}))))
    if plan.optimizer == "adamw":
        options.append(("training.optimizer=adamw_8bit", plan.replace(optimizer="adamw_8bit")))
    if plan.weight_dtype == "float32":
        options.append(("model.dtype=bfloat16", plan.replace(weight_dtype="bfloat16")))
    if not plan.gradient_checkpointing:
        options.append(("training.gradient_checkpointing=true", plan.replace(gradient_checkpointing=True)))
    if plan.rows > 1:
        half = plan.replace(rows=plan.rows // 2, tokens=plan.tokens // 2)
        options.append((f"training.batch_size={plan.rows // 2} and twice the grad_accum", half))
    if not plan.sharded:
        options.append(("8 processes with training.distributed=fsdp", plan.replace(processes=8, strategy="fsdp")))
    base = meta_model(config, plan.method) if model is None else model
    found = []
    for label, option in options:
        same_model = option.method == plan.method
        labels = label_tokens if label_tokens is None else label_tokens * option.tokens // plan.tokens
        model = base if same_model else None
        found.append((label, memory_estimate(config, option, runtime, labels, model=model)["total"]))
    return sorted(found, key=lambda item: item[1])


def parse_bytes(text: str) -> int:
    """'24GB', '24GiB', '80G', '512MB' or a plain byte count -> bytes (GB and GiB both as 2**30: device memory
    is sold in binary units, an 80 GB GPU shows about 80 GiB)."""
    value = text.strip().upper().replace(" ", "")
    for suffix, factor in (
        ("GIB", GIB),
        ("GB", GIB),
        ("G", GIB),
        ("MIB", 2**20),
        ("MB", 2**20),
        ("M", 2**20),
        ("TIB", 2**40),
        ("TB", 2**40),
        ("T", 2**40),
    ):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--device-memory: '{text}' is not a size; write it like 24GB or 80GiB") from None
