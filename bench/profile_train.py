"""Where a training step's time goes: torch.profiler over afina's own training step, summarised.

The same setup as bench/bench_train.py (the default model, Dolly open_qa chats, LoRA r=16 on all linear
layers, packing to 512 tokens, 4 rows a step), built by afina's training loop (`afina.train.loop.setup`)
and stepped by its own `training_step`; after `--warmup` steps, `--steps` steps run under the profiler.
Two summaries:

- phases (inclusive wall time): batch assembly, forward + loss, backward, gradient clipping, optimizer;
- operators (self CPU time on the calling thread, which waits for each operator's worker threads):
  matrix products, attention, elementwise/normalisation/activations, casts and copies, the loss's
  softmax, the optimizer's foreach kernels, reductions, the rest.

    python bench/profile_train.py                      # 2 warm-up + 4 profiled steps
    python bench/profile_train.py --set training.gradient_checkpointing=true --set training.batch_size=8
    python bench/profile_train.py --trace /tmp/step.json   # also a Chrome trace (chrome://tracing)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import DATA, afina_overrides, chats  # noqa: E402

CATEGORIES = [  # (category, operator-name fragments); the first match wins
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "mkldnn")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_softmax_backward")),
    ("loss (log-softmax, gather)", ("log_softmax", "nll_loss", "cross_entropy", "aten::gather", "logsumexp")),
    ("optimizer kernels", ("_foreach", "_fused_adam", "lerp", "addcdiv", "addcmul")),
    ("casts and copies", ("aten::to", "_to_copy", "aten::copy_", "aten::clone", "contiguous", "aten::cat")),
    ("reductions", ("aten::sum", "aten::mean", "aten::norm", "linalg_vector_norm", "aten::max", "aten::pow")),
    (
        "elementwise, norms, activations",
        ("aten::mul", "aten::add", "aten::sub", "aten::div", "silu", "rsqrt", "aten::neg", "aten::fill_", "aten::zero"),
    ),
]
PHASES = ["batch assembly", "forward + loss", "gradient clipping", "optimizer step"]


def category(name: str) -> str:
    for label, fragments in CATEGORIES:
        if any(f in name for f in fragments):
            return label
    return "other operators"


def build(args):
    import afina.train.loop as loop
    from afina.config import load_recipe
    from afina.rundir import RunDir, write_jsonl
    from afina.tasks import task_for

    train_rows, val_rows = chats(args.rows)
    overrides = afina_overrides("profile", args.batch, args.warmup + args.steps, args.precision)
    recipe = load_recipe(None, [*overrides, *args.set])
    run = RunDir(recipe.run_dir)
    write_jsonl(run.split_path("train"), train_rows)
    write_jsonl(run.split_path("validation"), val_rows[:8])
    task = task_for(recipe).training_task(recipe, run, train_rows)
    return loop, loop.setup(recipe, task, train_rows, val_rows[:8], resume=False)


def labelled(fn, label: str):
    from torch.profiler import record_function

    def wrapped(*a, **k):
        with record_function(label):
            return fn(*a, **k)

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="profiled optimizer steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="packed 512-token rows per optimizer step")
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--set", action="append", default=[], help="a recipe override, e.g. training.compile=true")
    parser.add_argument("--trace", type=Path, help="write a Chrome trace of the profiled steps")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    loop, t = build(args)
    t.collate_fn = labelled(t.collate_fn, "batch assembly")
    t.loss_fn = labelled(t.loss_fn, "forward + loss")
    t.ddp.clip_grad_norm = labelled(t.ddp.clip_grad_norm, "gradient clipping")
    t.optimizer.step = labelled(t.optimizer.step, "optimizer step")
    t.model.train()
    for _ in range(args.warmup):
        loop.training_step(t)
    tokens0 = t.state.tokens
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            with record_function("training step"):
                loop.training_step(t)
        wall = time.perf_counter() - start
    tokens = t.state.tokens - tokens0

    events = prof.key_averages()
    inclusive = {e.key: e.cpu_time_total / 1e6 for e in events}
    step_total = inclusive.get("training step", wall)
    phases = {p: inclusive.get(p, 0.0) for p in PHASES}
    phases["backward"] = step_total - sum(phases.values())
    print(
        f"\n{args.steps} steps x {args.batch} packed rows of 512 ({tokens} tokens) in {wall:.1f} s: "
        f"{tokens / wall:.1f} tokens/s under the profiler, {torch.get_num_threads()} threads, "
        f"{t.precision}, gradient checkpointing {'on' if t.recipe.training.gradient_checkpointing else 'off'}"
    )
    print("\n| phase (wall, inclusive) | seconds | share |\n|---|---:|---:|")
    for name in ["batch assembly", "forward + loss", "backward", "gradient clipping", "optimizer step"]:
        print(f"| {name} | {phases[name]:.2f} | {100 * phases[name] / step_total:.1f}% |")

    by_category: dict[str, float] = defaultdict(float)
    top: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for e in events:
        if e.key in PHASES or e.key == "training step" or not e.key.startswith("aten::"):
            continue  # labels and wrappers (autograd nodes, record_functions) own no compute themselves
        by_category[category(e.key)] += e.self_cpu_time_total / 1e6
        top[category(e.key)].append((e.self_cpu_time_total / 1e6, e.key))
    total = sum(by_category.values())
    print("\n| operators (self CPU time) | share | largest |\n|---|---:|---|")
    for name, seconds in sorted(by_category.items(), key=lambda kv: -kv[1]):
        heaviest = sorted(top[name], reverse=True)[:3]
        largest = ", ".join(f"{k.removeprefix('aten::')} {100 * s / total:.1f}%" for s, k in heaviest)
        print(f"| {name} | {100 * seconds / total:.1f}% | {largest} |")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
        print(f"\nChrome trace: {args.trace}")


if __name__ == "__main__":
    main()
