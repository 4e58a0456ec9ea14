"""Context-window extension, measured: base vs extended passkey retrieval by length, wall time, peak memory.

Runs `afina prepare`, `afina train` and the long-context part of `afina eval` on
examples/context_extension.yaml, each stage in its own process (so each peak memory is its own),
and writes <out>/results.json plus a table.

On a CPU the default model's real window (8,192 tokens) is too long to fine-tune, so --window
makes a reduced-window copy of it first: rope_theta is lowered NTK-style (theta / s^(d/(d-2)),
s = 8192 / window) so that the slowest rotary dimensions turn as far over `window` positions as
they did over 8,192; max_position_embeddings = window. The bench then checks that this base
fails beyond `window` and extends it by --factor. With --window 0 the real model is extended
(a GPU job; see bench/gpu_context_extension.sh).

    flock /tmp/afina-bench.lock python bench/bench_context.py --window 256 --factor 4 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "context_extension.yaml"
SHARED = ROOT.parent / "shared" / "data"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def reduced_window_model(window: int, out: Path) -> Path:
    """The default model with its rotary window reduced to `window` tokens (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from afina.models.loader import DEFAULT_MODEL, resolve_model

    target = out / f"smollm2-135m-w{window}"
    if (target / "config.json").is_file():
        return target
    source = resolve_model(DEFAULT_MODEL)
    config = AutoConfig.from_pretrained(source)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shrink = config.max_position_embeddings / window
    config.rope_parameters = {
        **config.rope_parameters,
        "rope_theta": config.rope_parameters["rope_theta"] / shrink ** (head_dim / (head_dim - 2)),
    }
    config.max_position_embeddings = window
    model = AutoModelForCausalLM.from_pretrained(source, config=config)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    log(f"reduced-window base: {target} (rope_theta {config.rope_parameters['rope_theta']:.1f}, window {window})")
    return target


def generated_documents(path: Path, count: int = 400) -> Path:
    """Fallback training text when ../shared/data is absent: documents of generated prose."""
    from afina.eval.haystack import generated_sentences

    sentences = generated_sentences(count * 10, seed=11)
    path.write_text(
        "".join(
            json.dumps({"text": " ".join(sentences[i : i + 10]), "title": f"doc{i // 100}"}) + "\n"
            for i in range(0, len(sentences), 10)
        ),
        encoding="utf-8",
    )
    return path


def mixed_documents(path: Path) -> Path:
    """Long-run training text from every prose file in ../shared/data (for GPU runs of 16k-token rows:
    XQuAD's Wikipedia paragraphs alone fill only two rows). Each source row becomes one document."""
    sources = [
        ("qa_xquad_en_passages.jsonl", lambda r: r["text"]),
        ("summarization_dialogsum_dev.jsonl", lambda r: r["document"]),
        ("summarization_dialogsum_test.jsonl", lambda r: r["document"]),
        ("instruct_dolly_open_qa.jsonl", lambda r: f"{r['instruction']}\n{r['response']}"),
    ]
    with path.open("w", encoding="utf-8") as out:
        for name, text_of in sources:
            for number, line in enumerate((SHARED / name).read_text(encoding="utf-8").splitlines()):
                out.write(json.dumps({"text": text_of(json.loads(line)), "title": f"{name}:{number // 50}"}) + "\n")
    return path


def afina(stage: str, overrides: list[str], env: dict) -> float:
    """Run one stage in its own process; return its wall time."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "afina", stage, str(RECIPE), *overrides]
    log("$ " + " ".join(command[2:]))
    subprocess.run(command, check=True, env=env)
    return round(time.perf_counter() - started, 1)


def control_run(args, overrides: list[str], window: int, target: int, env: dict) -> dict:
    """The same fine-tune without extension: rows of the original window (the rope is left as it is:
    linear x1), as many tokens per step (batch x factor) and the same retrieval share; passkey at
    the main run's lengths. Documents longer than the window are rejected by its prepare (it cannot
    train on them without going past the window), so its text differs a little; perplexity is skipped."""
    lengths = args.lengths or f"{window},{2 * window},{4 * window}"
    control = [
        o for o in overrides if not o.startswith(("name=", "data.max_length=", "training.pack_length=", "context."))
    ]
    control += [
        "name=control",
        "context.rope_scaling=linear",
        "context.factor=1",
        f"data.max_length={window}",
        f"training.pack_length={window}",
        f"training.batch_size={max(1, round(target / window))}",
        f"context.retrieval.fraction={args.retrieval}",
        f"context.eval.trials={args.trials}",
        f"context.eval.lengths=[{lengths}]",
        "context.eval.systems=[tuned]",
        "context.eval.perplexity=false",
    ]
    log(f"control: the same fine-tune in rows of {window} tokens, no extension")
    timings = {stage: afina(stage, control, env) for stage in ("prepare", "train", "eval")}
    run = Path(next(o for o in overrides if o.startswith("output_dir="))[len("output_dir=") :]) / "control"
    result = json.loads((run / "eval" / "long_context.json").read_text())
    return {
        "overrides": control,
        "stage_wall_time_s": timings,
        "train": json.loads((run / "manifest.json").read_text()).get("train"),
        "passkey_by_length": result["systems"]["tuned"]["passkey"]["accuracy_by_length"],
        "long_context": result,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=256, help="reduced window to extend from (0: the model's own)")
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--scaling", default="yarn", choices=["linear", "dynamic", "yarn"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lengths", default="", help="comma-separated passkey lengths (default 1x,2x,4x the window)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/bench-context"))
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="cpu hides any GPU; cuda fails at once when none is usable",
    )
    parser.add_argument(
        "--stages", default="prepare,train,eval", help="none: only the --control run (after a main run)"
    )
    parser.add_argument(
        "--mixed-data",
        action="store_true",
        help="train on XQuAD paragraphs + DialogSum dialogues + Dolly answers (more text for long rows)",
    )
    parser.add_argument(
        "--retrieval",
        type=float,
        default=0.0,
        help="context.retrieval.fraction: share of training rows that are synthetic retrieval rows",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also train a control without extension: the same steps, tokens and retrieval share in rows "
        "of the original window (rope unchanged), evaluated at the same lengths",
    )
    parser.add_argument("--set", nargs="*", default=[], help="more recipe overrides")
    args = parser.parse_args()

    import torch

    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no usable GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"output_dir={out}",
        "name=run",
        f"training.max_steps={args.steps}",
        f"training.learning_rate={args.lr}",
        f"context.rope_scaling={args.scaling}",
        f"context.factor={args.factor}",
        f"context.eval.trials={args.trials}",
        f"context.retrieval.fraction={args.retrieval}",
    ]
    window = args.window
    if window:
        overrides.append(f"model.name={reduced_window_model(window, out)}")
    else:
        from transformers import AutoConfig

        from afina.models.loader import DEFAULT_MODEL, resolve_model

        window = AutoConfig.from_pretrained(resolve_model(DEFAULT_MODEL)).max_position_embeddings
    target = int(window * args.factor)
    overrides += [f"data.max_length={target}", f"training.pack_length={target}"]
    if args.lengths:
        overrides.append(f"context.eval.lengths=[{args.lengths}]")
    if not (SHARED / "qa_xquad_en_passages.jsonl").is_file():
        log(f"{SHARED} not found: training on generated prose documents, generated haystack")
        overrides += [f"data.path={generated_documents(out / 'generated_docs.jsonl')}", "context.eval.haystack=null"]
    elif args.mixed_data:
        overrides.append(f"data.path={mixed_documents(out / 'mixed_docs.jsonl')}")
    overrides += args.set
    log(f"extending window {window} -> {target} with {args.scaling} x{args.factor:g}, {args.steps} steps")

    stages = [] if args.stages == "none" else args.stages.split(",")
    timings = {stage: afina(stage, overrides, env) for stage in stages}
    run = out / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    long_context = (
        json.loads((run / "eval" / "long_context.json").read_text())
        if (run / "eval" / "long_context.json").is_file()
        else None
    )
    results = {
        "window": window,
        "target": target,
        "scaling": args.scaling,
        "factor": args.factor,
        "steps": args.steps,
        "retrieval_fraction": args.retrieval,
        "learning_rate": args.lr,
        "overrides": overrides,
        "stage_wall_time_s": timings,
        "train": manifest.get("train"),
        "long_context": long_context,
        "torch": torch.__version__,
        "device": "cuda" if env.get("CUDA_VISIBLE_DEVICES") != "" and torch.cuda.is_available() else "cpu",
    }
    if args.control and args.window:
        results["control"] = control_run(args, overrides, window, target, env)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if long_context:
        from afina.eval.long_context import format_long_context

        print(format_long_context(long_context))
        for system, entry in long_context["systems"].items():
            print(f"  {system}: eval wall {entry['wall_time_s']} s, peak memory {entry['peak_memory_mb']:.0f} MiB")
    if results.get("control"):
        by_length = results["control"]["passkey_by_length"]
        print(
            f"{'control: same training, no extension':<40}"
            + "".join(f"{by_length[str(n)]:>14.1f}" for n in sorted(map(int, by_length)))
        )
    if manifest.get("train"):
        t = manifest["train"]
        print(
            f"train: {t['steps']} steps, {t['tokens']} tokens, {t['tokens_per_s']} tok/s, peak "
            f"{t['peak_memory_mb']:.0f} MiB, "
            f"wall {timings.get('train')} s; val loss {t['val_loss_before']} -> {t['val_loss_after']}"
        )
    log(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
