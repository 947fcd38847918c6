#!/usr/bin/env bash
# Issue 18's GPU call (one call on the device machine): the routed-generation benchmark under CUDA graphs, the
# kernel's checks, the projection-stack kernel benchmark and the CUDA-graph replay test. Each step has its own time
# limit (T_INF, T_KERNEL, T_MICRO, T_GRAPH seconds; 0 skips the step) so that one slow step cannot take the others'
# results with it; logs and JSON land in $OUT.
# Usage: OUT=/some/dir bash bench/gpu_issue18.sh   (wheels for pydantic in .whl/, as in bench/gpu_run.sh)
# Run 1 (2026-12-03) showed what the steps take on an H200: kernel tests ~60 s (Triton JIT per configuration),
# the CUDA-graph test 52 s, the projection-stack benchmark 36 s; the inference step needs more than 180 s
# (the base's and MoA's compilation at batch 32), so give it 400 s in a call of its own.
# 2026-12-04: with the 30 kernel cases ~65-70 s, the stack with 5 layouts ~40 s, the graph test ~45 s per case, the
# inference step with base_c, moa_split_c, moa_merged_c ~165 s. Knobs: INF_VARIANTS, INF_BATCH, MICRO_BATCH,
# MICRO_EXPERTS, MERGED_CONFIGS (extra launch configurations of the merged layout), GRAPH_PATHS (a -k expression).
# 2026-12-04 evening: the inference step times the prompt pass too (INF_PREFILL_ROUNDS, 0 = off), ~150 s for base_c
# and moa_merged_c at batch 32; INF_TAG suffixes the step's file names (two inference steps in one call), INF_EXPERTS lists resident expert counts (8,32,64); T_TRAIN (off by default) runs bench_training at TRAIN_SEQ_LEN tokens per row
# (~200 s with peft_par's 8 processes x 5 rounds). The device returns at most 8 files: keep the steps few per call.
# 2026-12-04 late: the whole-step graph decoder (moa_core/graph_decode.py), not yet run on a GPU: its replay test is
# GRAPH_PATHS=decoder, its variants INF_VARIANTS=base_c,moa_eager_route_c,base_g,moa_g,base_gc,moa_gc (BENCHMARKS.md).
# PEFT's best mode (peft_split: 8 sequential eager generate calls per round, ~28 s each at 64 new tokens) fits a call
# with INF_VARIANTS=peft_split,moa INF_NEW_TOKENS=16 INF_PREFILL_ROUNDS=0. The graph test runs last; put it first in a tight call by giving T_INF less time. T_COMPILE (off by default, ~150 s
# each of 2 processes) times the first calls with TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR fresh, in both orders.
# 2026-12-05 afternoon: TRAIN_VARIANTS=moa,moa_gather,peft_one times training in expert-major blocks (moa) against
# the gathered path (moa_gather) and one PEFT job at the same rows; GRAPH_PATHS=trains adds the device test that
# trains MoA through the blocked groups.
# T_PROFILE_TRAIN (off by default, ~60 s) profiles 3 training steps of MoA in blocks and of one PEFT job (bench/profile_training.py).
# PROFILE_VARIANTS=base_gcp,moa_gcp profiles the whole-step graph decoder (the variants of issue 18's 1.28x).
# T_CLIP (off by default, ~20 s) times the per-expert gradient clip alone (bench/bench_clip.py).
# 2026-12-05 evening: the augmented decode layout (DECODE_LAYOUT "augmented"): INF_VARIANTS=base_gcp,moa_gcp,moa_gcpa,
# GRAPH_PATHS=augmented, its kernel's cases among the kernel tests (KERNEL_TESTS, a -k expression), the stack's column.
# TRAIN_COMPILE=1 compiles both sides' model (bench_training.py --compile: torch.compile(model), as PEFT documents for
# training); TRAIN_TAG suffixes the training step's file names, TRAIN_REPEATS its rounds.
# It needs only pydantic and its four dependencies' wheels in .whl (the whole flow's .whl is 58 MB, near the carry limit).
set -uo pipefail
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; date -u;
  python3 -c "import torch,transformers,peft,triton;print(torch.__version__,transformers.__version__,peft.__version__,triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
t0=$SECONDS
if (( ${T_CLIP:-0} > 0 )); then  # the per-expert gradient clip alone: one concatenation against its earlier forms
  timeout ${T_CLIP} python3 bench/bench_clip.py --shape qwen0.5b --device cuda --experts 8 --json "$OUT/clip.json" 2>&1 \
    | grep -v -i "warn" | tee "$OUT/clip.log"
  echo "[clip done at +$((SECONDS - t0)) s]"
fi
if (( ${T_PROFILE_TRAIN:-0} > 0 )); then  # where a training step's time goes, MoA in blocks against one PEFT job
  timeout ${T_PROFILE_TRAIN} python3 bench/profile_training.py --shape qwen0.5b --device cuda --experts 8 --batch 8 \
    --seq-len ${TRAIN_SEQ_LEN:-128} --top 25 --json "$OUT/profile_training.json" 2>&1 | grep -v -i "warn\|USDT" > "$OUT/profile_training.log"
  echo "[training profile done at +$((SECONDS - t0)) s]"
fi
if (( ${T_PROFILE:-0} > 0 )); then  # where a decode step's time goes: one profiled call per variant (host and GPU tables)
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout ${T_PROFILE} python3 bench/profile_generate.py --shape qwen0.5b --device cuda \
    --experts 8 --batch ${PROFILE_BATCH:-32} --prompt-len 128 --new-tokens 64 --routing-pass ${PROFILE_ROUTING:-eager} \
    --variants ${PROFILE_VARIANTS:-base_c,moa_c} --top 25 --gpu-top 30 --json "$OUT/profile.json" 2>&1 | grep -v -i "warn" > "$OUT/profile.log"
  echo "[profile done at +$((SECONDS - t0)) s]"
fi
if (( ${T_INF:-400} > 0 )); then  # INF_BATCH may list several batches (one process, JSON and log each; T_INF each)
  batches=${INF_BATCH:-32}
  for b in ${batches//,/ }; do
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout ${T_INF:-400} python3 bench/bench_inference.py --shape qwen0.5b --device cuda \
      --experts ${INF_EXPERTS:-8} --prompt-len 128 --new-tokens ${INF_NEW_TOKENS:-64} --repeats ${INF_REPEATS:-5} --warmup 1 --router-steps 40 \
      --variants ${INF_VARIANTS:-base_c,moa_eager_route_c} --batch $b --prefill-rounds ${INF_PREFILL_ROUNDS:-5} \
      --json "$OUT/inference_b$b${INF_TAG:-}.json" 2>&1 | grep -v -i "warn" | tee "$OUT/inference_b$b${INF_TAG:-}.log"
    echo "[inference batch $b done at +$((SECONDS - t0)) s]"
  done
fi
if (( ${T_COMPILE:-0} > 0 )); then  # compile time, firm: both caches fresh per process, both warm-up orders
  for order in base_c,moa_eager_route_c moa_eager_route_c,base_c; do
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) timeout ${T_COMPILE} python3 bench/bench_inference.py \
      --shape qwen0.5b --device cuda --experts 8 --prompt-len 128 --new-tokens 64 --repeats 5 --warmup 1 --router-steps 40 \
      --batch ${COMPILE_BATCH:-32} --variants $order --given-order --json "$OUT/compile_${order%%,*}_first.json" 2>&1 \
      | grep -v -i "warn" | tail -12 | tee "$OUT/compile_${order%%,*}_first.log"
    echo "[compile, $order, done at +$((SECONDS - t0)) s]"
  done
fi
if (( ${T_TRAIN:-0} > 0 )); then  # one MoA pass against one PEFT job at its rows and 8 PEFT processes (bf16 adapters)
  timeout ${T_TRAIN} python3 bench/bench_training.py --shape qwen0.5b --device cuda --experts 8 --batch 8 --steps 8 \
    --repeats ${TRAIN_REPEATS:-5} --seq-len ${TRAIN_SEQ_LEN:-128} --variants ${TRAIN_VARIANTS:-moa,peft_one,peft_par} \
    ${TRAIN_COMPILE:+--compile} --json "$OUT/training${TRAIN_TAG:-}.json" 2>&1 | grep -v -i "warn" | tee "$OUT/training${TRAIN_TAG:-}.log"
  echo "[training done at +$((SECONDS - t0)) s]"
fi
if (( ${T_KERNEL:-150} > 0 )); then
  timeout ${T_KERNEL:-150} python3 -m pytest -q -x -p no:cacheprovider tests/test_lora_kernels.py -k "${KERNEL_TESTS:-triton or merged_kernel or augment_kernel}" 2>&1 | tail -5 | tee "$OUT/tests.log"
  echo "[kernel tests done at +$((SECONDS - t0)) s]"
fi
if (( ${T_MICRO:-120} > 0 )); then
  timeout ${T_MICRO:-120} python3 bench/bench_lora_kernel.py --device cuda --batch ${MICRO_BATCH:-1,4,8,32} --experts ${MICRO_EXPERTS:-8,32,64} \
    --merged-configs "${MERGED_CONFIGS:-}" --json "$OUT/lora_kernel.json" 2>&1 | tee "$OUT/lora_kernel.log"
  echo "[kernel bench done at +$((SECONDS - t0)) s]"
fi
if (( ${T_GRAPH:-90} > 0 )); then
  timeout ${T_GRAPH:-90} python3 -m pytest -q -x -p no:cacheprovider tests/test_device.py -k "(cuda_graphs or graph_decoder or on_the_device) and (${GRAPH_PATHS:-kernels})" 2>&1 \
    | tail -15 | tee -a "$OUT/tests.log"
  echo "[graph test done at +$((SECONDS - t0)) s]"
fi
