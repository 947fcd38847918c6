#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md, in one call on the device machine (H100/H200; no network there).
# Usage: OUT=/some/dir bash bench/gpu_run.sh [inference|compile|training|profile|all ...]
# The image has torch, transformers and peft but no pydantic (moa_core.train imports it): wheels carried in .whl/.
set -uo pipefail
what=" ${*:-all} "
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; date -u;
  python3 -c "import torch,transformers,peft;print(torch.__version__,transformers.__version__,peft.__version__)"; } 2>&1 | tee "$OUT/env.txt"
if [[ $what == *" all "* || $what == *" inference "* ]]; then
  python3 bench/bench_inference.py --shape qwen0.5b --device cuda --experts 1,2,4,8,16 --batch 16 --prompt-len 128 \
    --new-tokens 32 --repeats ${INF_REPEATS:-3} --warmup 1 --variants ${INF_VARIANTS:-base,peft,moa,moa_norc,moa_off,moa_forced} \
    --json "$OUT/inference_gpu.json" 2>&1 | tee "$OUT/inference_gpu.log"
fi
if [[ $what == *" compile "* ]]; then
  python3 bench/bench_inference.py --shape qwen0.5b --device cuda --experts ${COMPILE_EXPERTS:-8} --batch 16 --prompt-len 128 \
    --new-tokens 32 --repeats ${INF_REPEATS:-3} --warmup 1 --variants ${COMPILE_VARIANTS:-base,moa,moa_forced,base_c,moa_c,moa_norc_c,moa_forced_c} \
    --json "$OUT/inference_compile_gpu.json" 2>&1 | tee "$OUT/inference_compile_gpu.log"
fi
if [[ $what == *" all "* || $what == *" training "* ]]; then
  python3 bench/bench_training.py --shape qwen0.5b --device cuda --experts 1,2,4,8 --steps 8 --batch 8 --seq-len 128 \
    --repeats ${TRAIN_REPEATS:-2} --json "$OUT/training_gpu.json" 2>&1 | tee "$OUT/training_gpu.log"
fi
if [[ $what == *" profile "* ]]; then
  python3 bench/profile_decode.py --shape qwen0.5b --device cuda --experts 8 --batch 16 --prompt-len 128 --new-tokens 32 \
    --json "$OUT/profile_gpu.json" 2>&1 | tee "$OUT/profile_gpu.log"
fi
