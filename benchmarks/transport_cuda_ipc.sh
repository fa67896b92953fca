#!/usr/bin/env bash
# cuda_ipc on a GPU host in one command: the GPU transport tests, then the fast path and the legacy
# one on one GPU (cuda:0 -> cuda:0) and, where a second GPU exists, across two (cuda:0 -> cuda:1),
# within a time budget. With BEFORE=<dir> holding an earlier tree's transport/, kernels/ and
# benchmarks/transport_cuda_ipc.py, that tree's fast path runs too (before/after in the same run).
#   OUT=/tmp/ipc BUDGET=160 bash benchmarks/transport_cuda_ipc.sh
#   git archive <commit> transport kernels benchmarks/transport_cuda_ipc.py | tar -x -C /tmp/before
#   OUT=/tmp/ipc BEFORE=/tmp/before bash benchmarks/transport_cuda_ipc.sh
# LEGACY=0 skips the legacy path; RESIDENT=1 adds the launch-vs-resident paged-write comparison on one GPU;
# PAGES="launch graph" runs the fast path once per way of starting a paged write (fast-<mode>-1gpu.json);
# REPEAT=2 runs the one-GPU fast and before runs twice, in turn (fast2-…, before2-…: the order of runs matters).
# SWEEP_MODES="launch,hostidx,devidx" gives each fast run's paged sweep one engine per way, interleaved (page
# indices read from the default's place, the pinned ring slot, device memory); INDEX_PROBE=1 adds the page kernel's
# GPU time with its indices in host memory, in device memory and copied there first, to the probed run.
# Writes $OUT/env.txt, $OUT/tests.log, $OUT/bench.log and $OUT/{fast,before,legacy}-{1gpu,2gpu}.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/cuda_ipc}
BUDGET=${BUDGET:-160}
TEST_BUDGET=${TEST_BUDGET:-$((BUDGET / 2))}
ITERS=${ITERS:-60}
PY=${PY:-python3}
BEFORE=${BEFORE:-}
LEGACY=${LEGACY:-1}
RESIDENT=${RESIDENT:-0}
PAGES=${PAGES:-}
REPEAT=${REPEAT:-1}
SWEEP_MODES=${SWEEP_MODES:-}
INDEX_PROBE=${INDEX_PROBE:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; nvidia-smi topo -m
  $PY -c "import sys, torch, cupy; print(sys.version.split()[0], torch.__version__, cupy.__version__, torch.cuda.device_count())"
  lscpu | grep -E "Model name|^CPU\(s\)"; uptime; } > "$OUT/env.txt" 2>&1
gpus=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
X=""
$PY -c "import xdist" 2>/dev/null && X="-n 4"
if [ "$TEST_BUDGET" -gt 0 ]; then
  timeout "$TEST_BUDGET" $PY -m pytest -v -p no:cacheprovider $X -m "gpu and not slow" -k cuda_ipc -rfE \
    tests/test_transport_cuda_ipc.py tests/test_transport_batch.py tests/test_transport.py > "$OUT/tests.log" 2>&1
  echo "tests rc=$? at ${SECONDS}s"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
fi
runs=()
for r in $(seq 1 "$REPEAT"); do
  sfx=""; [ "$r" -gt 1 ] && sfx=$r
  for m in ${PAGES:--}; do runs+=("fast cuda:0 1gpu $m $sfx"); done
  [ -n "$BEFORE" ] && runs+=("before cuda:0 1gpu - $sfx")
done
[ "$RESIDENT" = 1 ] && runs+=("resident cuda:0 1gpu")
[ "$LEGACY" = 1 ] && runs+=("legacy cuda:0 1gpu")
if [ "$gpus" -ge 2 ]; then
  runs+=("fast cuda:1 2gpu")
  [ -n "$BEFORE" ] && runs+=("before cuda:1 2gpu")
  [ "$LEGACY" = 1 ] && runs+=("legacy cuda:1 2gpu")
fi
probed=""
for run in "${runs[@]}"; do
  set -- $run
  mode=${4:--} sfx=${5:-}
  left=$((BUDGET - SECONDS))
  if [ $left -lt 15 ]; then echo "skip $run: ${left}s left"; continue; fi
  echo "== $run (${SECONDS}s)" >> "$OUT/bench.log"
  name="$1$sfx"
  if [ "$1" = before ]; then
    script="$BEFORE/benchmarks/transport_cuda_ipc.py" path=fast extra=""
  else
    script=benchmarks/transport_cuda_ipc.py path=$1 extra=""
    [ -z "$probed" ] && [ "$1" = fast ] && extra="--probe" && probed="$2"  # the probe once per GPU pair
    [ "$probed" != "$2" ] && [ "$1" = fast ] && extra="--probe" && probed="$2"
    [ "$INDEX_PROBE" = 1 ] && [ "$extra" = --probe ] && extra="$extra --index-probe"
    [ -n "$SWEEP_MODES" ] && [ "$1" = fast ] && extra="$extra --sweep-modes $SWEEP_MODES"
    [ "$mode" != - ] && extra="$extra --pages $mode" && name="$1-$mode$sfx"
  fi
  [ "$1" = resident ] && path=fast extra="--resident"
  PYTHONPATH="$( [ "$1" = before ] && echo "$BEFORE:" )$PYTHONPATH" timeout $left $PY "$script" --path "$path" \
    --target-device "$2" --machine "h200-$3" --iters "$ITERS" --out "$OUT/$name-$3.json" $extra >> "$OUT/bench.log" 2>&1
  echo "$run rc=$? at ${SECONDS}s"
done
uptime >> "$OUT/env.txt"
