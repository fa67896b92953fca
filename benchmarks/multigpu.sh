#!/usr/bin/env bash
# The multi-GPU measurements of one host in one command (issue 8), written under $OUT:
#   1. nccl-tests-format sweeps through torch.distributed/NCCL (all-reduce, all-gather,
#      reduce-scatter, all-to-all; 8 B … MAXBYTES) -> nccl-<op>.txt
#   2. the NVLink/NVSwitch collective model fitted to them, simulated vs measured busbw
#      before and after -> calibrate.json (needs 2+ GPUs: busbw is 0 at one rank)
#   3. the sharded training workload over NCCL at DP / TP / PP with telemetry, measured
#      step time against the simulator's -> train-<plan>.json
#   4. the transport between GPUs (cuda_ipc, and tcp with CUDA tensors) -> transport-*.json
#   5. the MoE / KV / FP8 kernels that feed it -> kernels.json
#
# Usage, from the repository root on the GPU host (no install needed; the image's python3
# with torch, CuPy, numpy, pandas, pyyaml):
#   OUT=/tmp/mg bash benchmarks/multigpu.sh            # every GPU of the host
#   OUT=/tmp/mg GPUS=1 QUICK=1 bash benchmarks/multigpu.sh   # the world-size-1 rehearsal
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0 …): on shared hosts it can take GPUs down.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
OUT=${OUT:-benchmarks/results/multigpu}
QUICK=${QUICK:-0}
MAXBYTES=${MAXBYTES:-$([ "$QUICK" = 1 ] && echo 256M || echo 4G)}
STEPS=${STEPS:-$([ "$QUICK" = 1 ] && echo 10 || echo 30)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
status=0
step() { echo "== $*"; }
fail() { echo "FAILED: $*"; status=1; }

nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/gpus.csv" || fail nvidia-smi
$PY -m workbench.cli topology discover --json > "$OUT/topology.json" || fail discover

step "1. nccl-tests sweeps on $GPUS GPU(s), 8 B … $MAXBYTES"
for op in all_reduce all_gather reduce_scatter all_to_all; do
  timeout 900 $PY -m torch.distributed.run --nproc-per-node "$GPUS" --master-port 29531 \
    benchmarks/nccl_sweep.py --op "$op" -b 8 -e "$MAXBYTES" -f 2 > "$OUT/nccl-$op.txt" 2> "$OUT/nccl-$op.err" \
    || fail "nccl sweep $op"
  tail -2 "$OUT/nccl-$op.txt"
done

if [ "$GPUS" -ge 2 ]; then
  step "2. fit the collective model to the sweeps (busbw before/after)"
  for algo in ring; do
    $PY -m workbench.cli calibrate nccl-tests "$OUT"/nccl-all_reduce.txt "$OUT"/nccl-all_gather.txt \
      "$OUT"/nccl-reduce_scatter.txt --cluster local --gpus "$GPUS" --algo "$algo" --json \
      > "$OUT/calibrate-$algo.json" || fail "calibrate $algo"
  done
else
  step "2. skipped: busbw is 0 with one rank, nothing to fit"
fi

step "3. sharded training over NCCL with telemetry"
plans="dp=$GPUS"
if [ "$GPUS" -ge 2 ]; then plans="$plans tp=$GPUS pp=2,dp=$((GPUS / 2)) tp=2,dp=$((GPUS / 2))"; fi
for plan in $plans; do
  timeout 600 $PY -m workbench.cli run train --backend nccl --plan "$plan,mbs=2,gbs=$((GPUS * 8))" \
    --steps "$STEPS" --json > "$OUT/train-${plan//[=,]/_}.json" || fail "train $plan"
done

step "4. transport between GPUs"
dst=$([ "$GPUS" -ge 2 ] && echo cuda:1 || echo cuda:0)
for backend in cuda_ipc tcp; do
  timeout 600 $PY -m workbench.cli bench transport --backend "$backend" --device cuda:0 --target-device "$dst" \
    --lanes 4 $([ "$QUICK" = 1 ] && echo --quick) --soak 0 --json > "$OUT/transport-$backend.json" \
    || fail "transport $backend"
done

step "5. kernels feeding the transport"
timeout 600 $PY -m kernels.bench --device gpu $([ "$QUICK" = 1 ] && echo --gpu-sizes 256MiB) --json --out "$OUT/kernels.json" > /dev/null || fail kernels

echo "exit status $status; results in $OUT"
exit $status
