"""afina vs TRL's SFTTrainer: LoRA fine-tuning throughput on this CPU, side by side in one run.

Same model (SmolLM2-135M-Instruct), same data (the first rows of Dolly open_qa as
user/assistant chats, loss on the answers), LoRA r=16 alpha=32 on all linear layers, packing
to 512 tokens, same batch, learning rate and number of optimizer steps. Each system trains in
its own process (so peak memory is its own); afterwards both are scored with the same
validation loss on the same held-out rows.

    python bench/bench_train.py                       # both, default budget
    python bench/bench_train.py --steps 40 --batch 4  # a bigger budget
    python bench/bench_train.py --afina-compile       # afina with torch.compile
    python bench/bench_train.py --checkpointing off   # both without gradient checkpointing (on: TRL's default)
    python bench/bench_train.py --steps 60 --batch 16 # on a GPU (used when one is visible)
    python bench/bench_train.py --systems afina        # afina alone (e.g. another checkout on PYTHONPATH)
    python bench/bench_train.py --systems afina --afina-set training.batch_size=8   # one lever, a row
    python bench/bench_train.py --model gemma3-270m --method qlora   # another model / method, both systems
    python bench/bench_train.py --json out.json       # the results as JSON too (bench/gpu_session.sh reads it)

--method: lora (r=16 on all linear layers, the default), qlora (the same over a 4-bit NF4 base, TRL's model
loaded with the same BitsAndBytesConfig) or full (every weight; TRL without a peft config).

Needs `pip install trl` (the peer; not a dependency of afina) and ../shared/data (or --data).
--precision auto (the default) is bf16 where the device multiplies bf16 natively (a GPU, a CPU with
AVX512-BF16/AMX) and fp32 elsewhere, for both systems. The weights follow it: TRL's model is loaded
in bf16 under bf16 (as its users load it), afina's model.dtype=auto does the same.
On a GPU peak memory is the GPU's (torch.cuda.max_memory_allocated) and MFU is against a matrix
product of that precision measured on that device.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct_dolly_open_qa.jsonl"
VAL_ROWS = 100


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def chats(n_train: int, data: Path = DATA) -> tuple[list[dict], list[dict]]:
    # Answers short enough for one 512-token row (about 4 characters a token), for both systems.
    rows = [r for r in map(json.loads, data.open()) if len(r["instruction"]) + len(r["response"]) < 1800][
        : n_train + VAL_ROWS
    ]
    conv = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}]}
        for r in rows
    ]
    return conv[:n_train], conv[n_train:]


def resolved_precision(precision: str) -> str:
    import torch

    from afina.device import resolve_precision

    return resolve_precision(precision, torch.device("cuda" if on_gpu() else "cpu"))


def matmul_flops(precision: str, seconds: float = 3.0) -> float:
    import torch

    device = "cuda" if on_gpu() else "cpu"
    size = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    sync()
    return 2 * size**3 * n / (time.perf_counter() - start)


def validation_loss(model, tokenizer, val, precision: str) -> float:
    from afina.data.format import encode_split
    from afina.device import autocast_factory
    from afina.train.loss import mean_label_loss

    model.eval()
    encoded = [e for e in encode_split(tokenizer, val, "assistant") if len(e["input_ids"]) <= 512]
    return mean_label_loss(model, encoded, tokenizer.pad_token_id, 8, autocast_factory(precision, model.device))


def afina_overrides(
    name: str, batch: int, steps: int, precision: str, model: str = "smollm2-135m-instruct", method: str = "lora"
) -> list[str]:
    """The bench's afina recipe (as overrides): LoRA r=16 on all linear layers, packing to 512 tokens."""
    return [
        f"name={name}",
        f"output_dir={tempfile.mkdtemp(prefix=f'{name}-afina-')}",
        f"model.name={model}",
        f"method.type={method}",
        "data.max_length=512",
        "method.r=16",
        "method.alpha=32",
        "method.target_modules=all-linear",
        "training.packing=true",
        "training.pack_length=512",
        f"training.batch_size={batch}",
        f"training.max_steps={steps}",
        "training.learning_rate=2e-4",
        f"training.precision={resolved_precision(precision)}",
        "training.report_to=[]",
        "training.plots=false",
    ]


def worker_afina(args, train_rows, val_rows, out: dict) -> None:
    from afina.config import load_recipe
    from afina.pipeline import train
    from afina.rundir import RunDir, write_jsonl

    recipe = load_recipe(
        None,
        [
            *afina_overrides("bench", args.batch, args.steps, args.precision, args.model, args.method),
            "training.scheduler=constant",
            "training.warmup_ratio=0",
            "training.log_every=1",
            "training.load_best_at_end=false",
            f"training.eval_every={10**6}",
            f"training.save_every={10**6}",
            f"training.compile={str(args.afina_compile).lower()}",
            f"training.gradient_checkpointing={str(args.checkpointing == 'on').lower()}",
            *args.afina_set,
        ],
    )
    run = RunDir(recipe.run_dir)
    write_jsonl(run.split_path("train"), train_rows)
    write_jsonl(run.split_path("validation"), val_rows)
    # afina validates before and after training with the same function validation_loss() uses.
    summary = train(recipe, progress=False)
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    out["steps"] = [(r["step"], r["tokens"], r["tokens"] / r["tokens_per_s"]) for r in records]
    out["val_loss"] = summary["val_loss_after"]


def worker_trl(args, train_rows, val_rows, out: dict) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from afina.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    precision = resolved_precision(args.precision)
    # The weights as TRL users load them: bf16 under bf16 training, else fp32; QLoRA's as afina quantizes them.
    options: dict = {}
    if args.method == "qlora":
        import torch
        from transformers import BitsAndBytesConfig

        options = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            ),
            "device_map": {"": "cuda" if on_gpu() else "cpu"},
        }
    model = load_model(args.model, "bfloat16" if precision == "bf16" else "float32", **options)
    prompt_completion = [{"prompt": [r["messages"][0]], "completion": [r["messages"][1]]} for r in train_rows]
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, _args, state, _control, **kwargs):
            times.append(time.perf_counter())

    tmp = tempfile.mkdtemp(prefix="bench-trl-")
    config = SFTConfig(
        output_dir=tmp,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=precision == "bf16",
        use_cpu=not on_gpu(),
        packing=True,
        max_length=512,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=42,
        gradient_checkpointing=args.checkpointing == "on",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(prompt_completion),
        processing_class=tokenizer,
        peft_config=None
        if args.method == "full"
        else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[StepTimes()],
    )
    start = time.perf_counter()
    trainer.train()
    packed = trainer.train_dataset
    # Tokens trained: the packed rows the sampler drew, counted without padding (padding-free packing).
    order = list(trainer.get_train_dataloader().sampler)[: args.steps * args.batch]
    per_step = [
        sum(len(packed[i]["input_ids"]) for i in order[s * args.batch : (s + 1) * args.batch])
        for s in range(args.steps)
    ]
    cumulative, total = [], 0
    for s, n in enumerate(per_step):
        total += n
        cumulative.append((s + 1, total, times[s] - start))
    out["steps"] = cumulative
    out["val_loss"] = validation_loss(trainer.model, tokenizer, val_rows, precision)


def run_worker(name: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_path = fh.name
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--result",
        result_path,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--rows",
        str(args.rows),
        "--data",
        str(args.data),
        "--precision",
        args.precision,
        "--model",
        args.model,
        "--method",
        args.method,
    ]
    cmd += ["--afina-compile"] if args.afina_compile else []
    cmd += ["--checkpointing", args.checkpointing]
    cmd += [f"--afina-set={kv}" for kv in args.afina_set]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    result = json.loads(Path(result_path).read_text())
    result["end_to_end_s"] = time.perf_counter() - start
    return result


def model_parameters(spec: str) -> float:
    """The model's parameters from its config (tied embeddings counted once), no weights read."""
    from afina.config import MethodConfig
    from afina.train.memory import meta_model, model_config

    model = meta_model(model_config(spec), MethodConfig(type="full"))
    return float(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))


def summarize(result: dict, params: float, peak_flops: float) -> dict:
    steps = result["steps"]
    warm = max(1, len(steps) // 4)  # steady state: after the first quarter of the steps
    (_, tok0, t0), (_, tok1, t1) = steps[warm - 1], steps[-1]
    steady = (tok1 - tok0) / (t1 - t0)
    return {
        "steady_tok_s": steady,
        "tokens": tok1,
        "end_to_end_tok_s": tok1 / result["end_to_end_s"],
        "end_to_end_s": result["end_to_end_s"],
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_gpu_mb": result.get("peak_gpu_mb", 0.0),
        "val_loss": result["val_loss"],
        "mfu": 6 * params * steady / peak_flops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4, help="packed 512-token rows per optimizer step")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--afina-compile", action="store_true")
    parser.add_argument(
        "--checkpointing",
        choices=["on", "off"],
        default="on",
        help="gradient checkpointing for both systems (on: TRL's SFTConfig default)",
    )
    parser.add_argument("--worker", choices=["afina", "trl"])
    parser.add_argument("--result")
    parser.add_argument("--data", type=Path, default=DATA, help="Dolly open_qa JSONL (default: ../shared/data)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--systems", default="trl,afina", help="comma-separated: trl, afina")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an afina model spec (default: the default)")
    parser.add_argument("--method", choices=["lora", "qlora", "full"], default="lora")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--afina-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for afina's run, a lever to measure (e.g. training.pack_length=1024)",
    )
    args = parser.parse_args()
    train_rows, val_rows = chats(args.rows, args.data)
    if args.worker:
        out: dict = {}
        (worker_afina if args.worker == "afina" else worker_trl)(args, train_rows, val_rows, out)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if on_gpu():
            import torch

            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        Path(args.result).write_text(json.dumps(out))
        return

    precision = resolved_precision(args.precision)
    peak = matmul_flops(precision)
    params = model_parameters(args.model)
    systems = [name.strip() for name in args.systems.split(",")]
    results = {name: summarize(run_worker(name, args), params, peak) for name in systems}
    if args.json:
        args.json.write_text(
            json.dumps({"model": args.model, "method": args.method, "precision": precision, "results": results})
        )
    where = "GPU " + __import__("torch").cuda.get_device_name() if on_gpu() else "CPU"
    print(
        f"\n{where}: {precision} matmul peak measured in this run: {peak / 1e9:.0f} GFLOP/s; "
        f"{args.steps} steps x {args.batch} packed rows of 512, {precision}, "
        f"gradient checkpointing {args.checkpointing}"
    )
    if len(systems) == 1:
        for key, value in results[systems[0]].items():
            print(f"{systems[0]} {key}: {value:.4g}")
        return
    trl, ours = results["trl"], results["afina"]
    print(f"{'':28}{'TRL SFTTrainer':>16}{'afina':>12}{'afina/TRL':>11}")
    rows = [
        ("steady tokens/s", "steady_tok_s", "{:.0f}"),
        ("end-to-end tokens/s", "end_to_end_tok_s", "{:.0f}"),
        ("end-to-end seconds", "end_to_end_s", "{:.0f}"),
        ("peak resident memory (MB)", "peak_rss_mb", "{:.0f}"),
        *([("peak GPU memory (MB)", "peak_gpu_mb", "{:.0f}")] if on_gpu() else []),
        ("validation loss", "val_loss", "{:.4f}"),
        (f"MFU ({precision})", "mfu", "{:.1%}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:28}{fmt.format(trl[key]):>16}{fmt.format(ours[key]):>12}{ours[key] / trl[key]:>10.2f}x")
    print(f"tokens trained: TRL {trl['tokens']}, afina {ours['tokens']}")


if __name__ == "__main__":
    main()
