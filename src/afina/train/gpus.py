"""`afina estimate --gpu NAME`: will the run fit, and about how long will it take, on a GPU you do not have yet.

Memory is the same model of what training holds as on the device at hand (train/memory.py), against the
GPU's memory, with the CUDA context and allocator reserve in place of a CPU process's resident memory.
Time is arithmetic, not a measurement: the run's training FLOPs (from the model's config and the tokens it
trains on) over the GPU's dense peak for the compute dtype at an MFU (model FLOPs utilisation). The MFU is
an assumption until afina's own GPU runs calibrate it (none had run when this table was written); pass
--mfu to use your own. Every number printed from here is labelled an estimate.

Peak numbers are dense (without 2:4 sparsity, which training does not use), from each vendor's datasheet;
float32 is the plain (non-TF32) rate, since torch multiplies float32 without TF32 by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 2**30
# The CUDA context, cuBLAS workspaces and the caching allocator's reserve: memory a process holds on the GPU
# before and beside its tensors (0.5-1 GiB on current drivers; the upper end is used).
CUDA_RUNTIME_BYTES = 1 * GIB


@dataclass(frozen=True)
class GpuSpec:
    name: str  # what --gpu takes
    label: str
    memory_gib: float
    bf16_tflops: float | None  # dense tensor-core bfloat16 (float32 accumulate); None: no bfloat16
    fp32_tflops: float  # plain float32
    source: str

    @property
    def has_bf16(self) -> bool:
        return self.bf16_tflops is not None

    def peak_flops(self, precision: str) -> float:
        tflops = self.bf16_tflops if precision == "bf16" and self.bf16_tflops else self.fp32_tflops
        return tflops * 1e12


GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec("h100", "NVIDIA H100 SXM 80GB", 80, 989.4, 66.9, "NVIDIA H100 datasheet (SXM)"),
        GpuSpec("h100-pcie", "NVIDIA H100 PCIe 80GB", 80, 756.5, 51.2, "NVIDIA H100 datasheet (PCIe)"),
        GpuSpec("h200", "NVIDIA H200 SXM 141GB", 141, 989.4, 66.9, "NVIDIA H200 datasheet (SXM)"),
        GpuSpec("a100", "NVIDIA A100 80GB", 80, 312.0, 19.5, "NVIDIA A100 datasheet"),
        GpuSpec("a100-40gb", "NVIDIA A100 40GB", 40, 312.0, 19.5, "NVIDIA A100 datasheet"),
        GpuSpec("l40s", "NVIDIA L40S 48GB", 48, 362.1, 91.6, "NVIDIA L40S datasheet"),
        GpuSpec("l4", "NVIDIA L4 24GB", 24, 121.0, 30.3, "NVIDIA L4 datasheet (242 bf16 with sparsity)"),
        GpuSpec("a10", "NVIDIA A10 24GB", 24, 125.0, 31.2, "NVIDIA A10 datasheet"),
        GpuSpec("rtx4090", "NVIDIA GeForce RTX 4090 24GB", 24, 165.2, 82.6, "NVIDIA Ada whitepaper (fp32 accumulate)"),
        GpuSpec("rtx3090", "NVIDIA GeForce RTX 3090 24GB", 24, 71.0, 35.6, "NVIDIA Ampere GA102 whitepaper"),
        GpuSpec("t4", "NVIDIA T4 16GB", 16, None, 8.1, "NVIDIA T4 datasheet (no bfloat16)"),
        GpuSpec("v100", "NVIDIA V100 32GB", 32, None, 15.7, "NVIDIA V100 datasheet (SXM2; no bfloat16)"),
    )
}


def find_gpu(name: str) -> GpuSpec:
    key = name.strip().lower().replace(" ", "").replace("_", "-")
    if key in GPUS:
        return GPUS[key]
    raise ValueError(f"--gpu: unknown GPU '{name}'; known: {', '.join(GPUS)}")


def assumed_mfu(parameters: int) -> float:
    """The MFU assumed when none is given: large models keep a GPU's tensor cores busy, small ones are bound
    by kernel launches and memory traffic. Round figures from published fine-tuning runs, not afina's own
    measurements (none on a GPU yet): 40% from 7B up, 30% from 1B, 15% below."""
    if parameters >= 7e9:
        return 0.40
    if parameters >= 1e9:
        return 0.30
    return 0.15


def training_flops_per_token(config, method: str, checkpointing: bool, attention_share: float) -> float:
    """Matrix FLOPs per trained token. A forward pass is 2 FLOPs per weight (embeddings excluded, the output
    layer included) plus attention; the backward pass computes the inputs' gradients (2 per weight) and, for
    full fine-tuning, the weights' (2 more); LoRA's adapter gradients are negligible. Gradient checkpointing
    runs the forward twice."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    weights = layers * per_layer + hidden * config.vocab_size
    forward = 2 * weights / (1 - attention_share)  # attention's share of the forward's matrix FLOPs
    passes = (3 if method == "full" else 2) + (1 if checkpointing else 0)
    return forward * passes


def gpu_time(
    config, result: dict[str, Any], gpu: GpuSpec, method: str, mfu: float | None, tokens_per_step: int
) -> dict[str, Any]:
    """Seconds per optimizer step and for the run on `gpu` (processes from the plan), as arithmetic."""
    plan = result["plan"]
    mfu = mfu if mfu is not None else assumed_mfu(result["total_parameters"])
    per_token = training_flops_per_token(
        config, method, plan["gradient_checkpointing"], result["attention_flops_share"]
    )
    throughput = gpu.peak_flops(plan["precision"]) * mfu * plan["processes"] / per_token  # tokens/s, all processes
    out = {
        "gpu": gpu.label,
        "gpu_source": gpu.source,
        "mfu": mfu,
        "mfu_assumed": mfu == assumed_mfu(result["total_parameters"]),
        "flops_per_token": per_token,
        "tokens_per_s": round(throughput, 1),
        "seconds_per_step": round(tokens_per_step / throughput, 4),
    }
    if "total_steps" in result:
        out["expected_seconds"] = round(out["seconds_per_step"] * result["total_steps"], 1)
        out["until_converged"] = bool(result.get("until_converged"))  # total_steps is then the epoch cap
    return out


def format_gpu_time(time: dict[str, Any]) -> str:
    how = "assumed, not yet calibrated on a GPU run; --mfu sets it" if time["mfu_assumed"] else "as given"
    line = (
        f"time on {time['gpu']} (an estimate: {time['flops_per_token'] / 1e9:.2f} GFLOPs per trained token at "
        f"{100 * time['mfu']:.0f}% MFU, {how}; peak from the {time['gpu_source']}): "
        f"{time['tokens_per_s']:,.0f} tokens/s, {time['seconds_per_step']} s/step"
    )
    if "expected_seconds" in time:
        bound = "at most" if time.get("until_converged") else "about"
        line += f", {bound} {time['expected_seconds'] / 60:.1f} min for the run"
    return line


def gpu_named(device_name: str) -> GpuSpec | None:
    """The table's entry for a device name as CUDA reports it ('NVIDIA H100 80GB HBM3'), or None."""
    name = device_name.lower()
    rules: list[tuple[str, str | None]] = [
        ("a10g", None),  # AWS's A10 variant: lower tensor rates than the A10's datasheet, not published
        ("h100", "h100-pcie" if "pcie" in name else "h100"),
        ("h200", "h200"),
        ("a100", "a100-40gb" if "40gb" in name else "a100"),
        ("l40s", "l40s"),
        ("4090", "rtx4090"),
        ("3090", "rtx3090"),
        ("v100", "v100"),
        (" l4", "l4"),
        (" a10", "a10"),
        (" t4", "t4"),
    ]
    key = next((key for part, key in rules if part in name), None)
    return GPUS[key] if key else None
