#!/usr/bin/env bash
# DDP on the GPU machine, in one call: tests/ddp_worker.py (a PEFT LoRA and a MoA stage 2 on a tiny model)
# as one process, then as 2 torchrun processes, and the loss curves / weights compared.
# With one GPU, the 2 ranks share it over gloo (NCCL refuses two ranks on one device): that checks the CUDA
# code path, not multi-GPU speed. With 2+ GPUs the ranks get a GPU each over NCCL.
# Usage: OUT=/some/dir bash bench/gpu_ddp_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/ddp-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then  # the image has no pydantic (moa_core.config needs it)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$gpus" -ge 2 ] || export MOA_DIST_BACKEND=gloo
echo "GPUs: $gpus, backend: ${MOA_DIST_BACKEND:-nccl}" | tee "$OUT/env.txt"
python3 -c "from moa_core.base_model import build_tiny_model; build_tiny_model('$OUT/tiny')" >/dev/null 2>&1
for n in 1 2; do
  python3 -m torch.distributed.run --standalone --nproc-per-node $n tests/ddp_worker.py "$OUT/tiny" "$OUT/world$n" \
    2>&1 | grep -E "^(peft|moa):|Error|error" | tee -a "$OUT/ddp.log"
done
python3 - "$OUT" <<'PY' | tee -a "$OUT/ddp.log"
import json, sys
from safetensors.torch import load_file
o = sys.argv[1]
for r in ("peft", "moa"):
    a, b = (json.load(open(f"{o}/world{n}/{r}/history.json")) for n in (1, 2))
    la, lb = [h["loss"] for h in a["history"]], [h["loss"] for h in b["history"]]
    wa, wb = (load_file(f"{o}/world{n}/{r}/params.safetensors") for n in (1, 2))
    print(f"{r}: 1 process on {a['device']} vs 2 on {b['device']}: max relative loss difference "
          f"{max(abs(x - y) / abs(x) for x, y in zip(la, lb)):.2e}, max weight difference "
          f"{max(float((wa[k] - wb[k]).abs().max()) for k in wa):.2e}")
PY
rm -rf "$OUT/tiny" "$OUT"/world*/*/params.safetensors "$OUT"/world*/peft/adapter
