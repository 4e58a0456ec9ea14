"""Memory and weight dtype on the default model (SmolLM2-135M-Instruct), each run in its own process.

    python bench/bench_memory.py peak    # `afina estimate` vs measured peak: (lora, qlora, full) x (float32, bfloat16)
    python bench/bench_memory.py dtype   # full fine-tuning: float32 vs bfloat16 + master copy vs plain bfloat16
    python bench/bench_memory.py table   # the estimate for published configs (Llama-3-8B, Qwen2.5-7B, Llama-3-70B)

peak: each run trains a few steps on Dolly open_qa (../shared/data) and records its peak resident
memory (CPU) or peak allocated memory (GPU); the estimate is computed in that process before training
(its runtime term is that process's resident memory then), from the config alone.
dtype: validation loss before/after the same steps, the plain-bfloat16 run being afina with its
master copy switched off (torch AdamW straight on the bfloat16 weights), to show what it answers.
bfloat16 runs multiply in bfloat16 (training.precision=bf16); on a CPU without AVX512-BF16/AMX that is
several times slower than float32, so their steps are few.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct_dolly_open_qa.jsonl"
GIB = 2**30

# Published configs (config.json on the Hugging Face hub), written out: no hub is reachable here.
PUBLISHED = {
    "Llama-3-8B": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    },
    "Qwen2.5-7B": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
        "max_position_embeddings": 32768,
    },
    "Llama-3-70B": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    },
}


def published_config(name: str):
    from transformers import AutoConfig

    values = dict(PUBLISHED[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def chats(n: int, skip: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in DATA.open()]
    rows = [r for r in rows if len(r["instruction"]) + len(r["response"]) < 600][skip : skip + n]
    return [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]}
        for r in rows
    ]


def worker(overrides: list[str], plain_bf16: bool, result: Path) -> None:
    from afina.config import load_recipe
    from afina.pipeline import estimate
    from afina.rundir import RunDir, write_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    recipe = load_recipe(
        None,
        [
            "name=bench",
            f"output_dir={tmp}",
            "training.report_to=[]",
            "training.plots=false",
            "training.load_best_at_end=false",
            "training.log_every=1",
            "training.warmup_ratio=0",
            "training.scheduler=constant",
            *overrides,
        ],
    )
    run = RunDir(recipe.run_dir)
    write_jsonl(run.split_path("train"), chats(400))
    write_jsonl(run.split_path("validation"), chats(int(os.environ.get("BENCH_VAL_ROWS", "8")), skip=400))
    estimated = estimate(recipe, measure=False)
    if plain_bf16:  # the ablation: no float32 master copy
        import torch

        from afina.train import loop

        loop.build_optimizer = lambda groups, cfg: torch.optim.AdamW(
            groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
    from afina.pipeline import train

    summary = train(recipe, progress=False)
    out = {
        "estimate": estimated["memory_bytes"],
        "plan": estimated["plan"],
        "summary": summary,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    import torch

    if torch.cuda.is_available():
        out["peak_gpu"] = torch.cuda.max_memory_allocated()
    result.write_text(json.dumps(out, default=str))


def run_worker(overrides: list[str], plain_bf16: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        path = Path(fh.name)
    cmd = [sys.executable, __file__, "--worker", json.dumps(overrides), "--result", str(path)]
    subprocess.run(
        cmd + (["--plain-bf16"] if plain_bf16 else []),
        check=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    return json.loads(path.read_text())


def bench_peak(steps: int, batch: int, length: int) -> None:
    import torch

    gpu = torch.cuda.is_available()
    print(
        f"{steps} steps of {batch} packed rows x {length} tokens; peak = "
        + ("torch.cuda.max_memory_allocated" if gpu else "peak resident memory (ru_maxrss)")
    )
    print(
        f"{'method':8}{'dtype':10}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'runtime':>9}"
        f"{'estimate':>10}{'measured':>10}{'est/meas':>10}   (MiB)"
    )
    for method in ("lora", "qlora", "full"):
        for dtype in ("float32", "bfloat16"):
            precision = "bf16" if dtype == "bfloat16" or method == "qlora" else "fp32"
            result = run_worker(
                [
                    f"method.type={method}",
                    f"model.dtype={dtype}",
                    f"training.precision={precision}",
                    f"training.max_steps={steps}",
                    f"training.batch_size={batch}",
                    "training.packing=true",
                    f"training.pack_length={length}",
                    f"data.max_length={length}",
                    "training.learning_rate=1e-5" if method == "full" else "training.learning_rate=2e-4",
                ]
            )
            est = result["estimate"]
            if gpu:
                est = {**est, "runtime": 0}
                est["total"] = sum(v for k, v in est.items() if k != "total")
            measured = result["peak_gpu"] if gpu else result["peak_rss"]
            mib = [est[k] / 2**20 for k in ("weights", "gradients", "optimizer", "activations", "runtime", "total")]
            print(
                f"{method:8}{dtype:10}"
                + "".join(f"{v:>{w}.0f}" for v, w in zip(mib, (9, 8, 8, 8, 9, 10), strict=True))
                + f"{measured / 2**20:>10.0f}{est['total'] / measured:>10.2f}",
                flush=True,
            )


def bench_dtype(steps: int, batch: int, length: int, lr: float, seeds: list[int]) -> None:
    common = [
        "method.type=full",
        f"training.max_steps={steps}",
        f"training.batch_size={batch}",
        "training.packing=true",
        f"training.pack_length={length}",
        f"data.max_length={length}",
        f"training.learning_rate={lr}",
    ]
    runs = [
        ("float32 weights, float32 compute", ["model.dtype=float32", "training.precision=fp32"], False),
        ("float32 weights, bf16 autocast", ["model.dtype=float32", "training.precision=bf16"], False),
        ("bfloat16 + float32 master copy", ["model.dtype=bfloat16", "training.precision=bf16"], False),
        ("plain bfloat16 (no master copy)", ["model.dtype=bfloat16", "training.precision=bf16"], True),
    ]
    print(f"full fine-tuning, {steps} steps of {batch} x {length} tokens, AdamW lr {lr} constant, seeds {seeds}")
    print(
        f"{'run':36}{'seed':>5}{'val before':>11}{'val after':>11}{'drop':>9}{'vs fp32':>9}{'peak MiB':>10}{'tok/s':>8}"
    )
    reference: dict[int, float] = {}
    for label, overrides, plain in runs:
        for seed in seeds:
            result = run_worker(common + overrides + [f"seed={seed}"], plain_bf16=plain)
            s = result["summary"]
            after = s["val_loss_after"]
            reference.setdefault(seed, after)
            print(
                f"{label:36}{seed:>5}{s['val_loss_before']:>11.4f}{after:>11.4f}{s['val_loss_before'] - after:>9.4f}"
                f"{100 * (after - reference[seed]) / reference[seed]:>8.2f}%{result['peak_rss'] / 2**20:>10.0f}"
                f"{s['tokens_per_s']:>8.0f}",
                flush=True,
            )


def bench_table(length: int, batch: int) -> None:
    from afina.config import MethodConfig
    from afina.train.memory import MemoryPlan, memory_estimate, meta_model

    print(
        f"per-GPU estimate (GiB), micro-batch {batch} x {length} tokens, bf16 weights and compute, AdamW, one GPU; "
        "LoRA r=16 on all linear layers; gradient checkpointing on"
    )
    print(f"{'model':14}{'params':>8}{'full bf16':>11}{'full 8bit':>11}{'LoRA':>8}{'QLoRA':>8}{'full fsdp x8':>14}")
    for name in PUBLISHED:
        config = published_config(name)
        plan = MemoryPlan(
            method=MethodConfig(type="lora"),
            weight_dtype="bfloat16",
            precision="bf16",
            rows=batch,
            tokens=batch * length,
            gradient_checkpointing=True,
        )
        totals = []
        params = None
        for method, changes in (
            ("full", {}),
            ("full", {"optimizer": "adamw_8bit"}),
            ("lora", {}),
            ("qlora", {}),
            ("full", {"processes": 8, "strategy": "fsdp"}),
        ):
            model = meta_model(config, MethodConfig(type=method))
            params = params or sum({id(p): p.numel() for p in model.parameters()}.values())
            totals.append(
                memory_estimate(config, plan.replace(method=MethodConfig(type=method), **changes), model=model)["total"]
                / GIB
            )
        print(
            f"{name:14}{params / 1e9:>7.2f}B"
            + "".join(f"{t:>{w}.1f}" for t, w in zip(totals, (11, 11, 8, 8, 14), strict=True)),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["peak", "dtype", "table"], default="peak")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--worker")
    parser.add_argument("--result", type=Path)
    parser.add_argument("--plain-bf16", action="store_true")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="dtype: one run per seed")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.plain_bf16, args.result)
    elif args.mode == "peak":
        bench_peak(args.steps, args.batch, args.length)
    elif args.mode == "dtype":
        bench_dtype(args.steps, args.batch, args.length, args.lr, args.seeds)
    else:
        bench_table(args.length, args.batch)


if __name__ == "__main__":
    main()
