#!/usr/bin/env bash
# cuda_ipc on a GPU host in one command: the GPU transport tests, then the fast path and the legacy
# one on two GPUs (cuda:0 -> cuda:1) and on one (cuda:0 -> cuda:0), within a time budget.
#   OUT=/tmp/ipc BUDGET=160 bash benchmarks/transport_cuda_ipc.sh
# Writes $OUT/env.txt, $OUT/tests.log, $OUT/bench.log and $OUT/{fast,legacy}-{2gpu,1gpu}.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/cuda_ipc}
BUDGET=${BUDGET:-160}
ITERS=${ITERS:-60}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; nvidia-smi topo -m
  $PY -c "import sys, torch, cupy; print(sys.version.split()[0], torch.__version__, cupy.__version__, torch.cuda.device_count())"
  uptime; } > "$OUT/env.txt" 2>&1
gpus=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
X=""
$PY -c "import xdist" 2>/dev/null && X="-n 4"
timeout $((BUDGET / 2)) $PY -m pytest -v -p no:cacheprovider $X -m "gpu and not slow" -k cuda_ipc -rfE \
  tests/test_transport_cuda_ipc.py tests/test_transport_batch.py tests/test_transport.py > "$OUT/tests.log" 2>&1
echo "tests rc=$? at ${SECONDS}s"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
runs=("fast cuda:1 2gpu" "fast cuda:0 1gpu" "legacy cuda:1 2gpu" "legacy cuda:0 1gpu")
for run in "${runs[@]}"; do
  set -- $run
  left=$((BUDGET - SECONDS))
  if [ "$2" = cuda:1 ] && [ "$gpus" -lt 2 ]; then echo "skip $run: one GPU"; continue; fi
  if [ $left -lt 15 ]; then echo "skip $run: ${left}s left"; continue; fi
  echo "== $run (${SECONDS}s)" >> "$OUT/bench.log"
  timeout $left $PY benchmarks/transport_cuda_ipc.py --path "$1" --target-device "$2" --machine "h200-$3" \
    --iters "$ITERS" --out "$OUT/$1-$3.json" >> "$OUT/bench.log" 2>&1
  echo "$run rc=$? at ${SECONDS}s"
done
uptime >> "$OUT/env.txt"
