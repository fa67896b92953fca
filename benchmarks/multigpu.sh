#!/usr/bin/env bash
# The multi-GPU measurements of one host in one command (issues 8 and 19), written under $OUT:
#   sweeps  a GEMM/attention/elementwise sweep of the training model's own shapes -> gemm.csv, and
#           nccl-tests-format sweeps through torch.distributed/NCCL (all-reduce, all-gather,
#           reduce-scatter; 8 B … MAXBYTES) -> nccl-<op>.txt
#   fit     the collective model fitted to the sweeps, busbw before/after -> calibrate-ring.json
#   train   the native engine (FSDP2 / DTensor TP+SP / pipelining, bf16) on a ~1.1 B Llama-style
#           model: one GPU eager and compiled, then dp=2, tp=2, pp=2; telemetry A/B in each run;
#           the simulator before (catalogue) and after calibration from the sweeps -> native.json
#   transport  the transport between GPUs (cuda_ipc, and tcp with CUDA tensors) -> transport-*.json
#   kernels    the MoE / KV / FP8 kernels that feed it -> kernels.json
#   dispatch   this host's CPU cost per eager / DTensor op, compiled block call and NCCL launch, and
#              the eager elementwise kernels (benchmarks/host_dispatch.py) -> dispatch/*.csv
#
# Usage, from the repository root on the GPU host (no install needed; the image's python3
# with torch, numpy, pandas, pyyaml, numba, tokenizers, safetensors):
#   OUT=/tmp/mg bash benchmarks/multigpu.sh                       # everything, every GPU of the host
#   OUT=/tmp/mg PARTS="sweeps train" bash benchmarks/multigpu.sh  # issue 19's measurements only
#   ONLY=tp2-sp,tp2-sp-compiled PROFILE=tp2-sp-compiled ...       # some plans; profile one step of some
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0 …): on shared hosts it can take GPUs down.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
OUT=${OUT:-benchmarks/results/multigpu}
PARTS=${PARTS:-sweeps fit train transport kernels dispatch}
MAXBYTES=${MAXBYTES:-1G}
STEPS=${STEPS:-16}
MODEL=${MODEL:-llama3-8b:layers=16,hidden=2048,heads=16,kv_heads=4,head_dim=128,ffn=8192,vocab=32000,seq=2048}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
status=0
step() { echo "== $* ($(date +%T))"; }
fail() { echo "FAILED: $*"; status=1; }
want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv > "$OUT/gpus.csv" || fail nvidia-smi

if want sweeps; then
  step "sweeps: the model's GEMM/attention shapes on one GPU"
  timeout 300 $PY benchmarks/gemm_sweep.py --model "$MODEL" --tp 1,2 --mbs 2,8 --budget-s 90 --out "$OUT/gemm.csv" \
    || fail "gemm sweep"
  if [ "$GPUS" -ge 2 ]; then
    step "sweeps: nccl-tests on $GPUS GPUs, 8 B … $MAXBYTES"
    for op in all_reduce all_gather reduce_scatter; do
      timeout 300 $PY -m torch.distributed.run --nproc-per-node "$GPUS" --master-port 29531 \
        benchmarks/nccl_sweep.py --op "$op" -b 8 -e "$MAXBYTES" -f 4 -n 10 > "$OUT/nccl-$op.txt" 2> "${TMPDIR:-/tmp}/nccl-$op.err" \
        || { fail "nccl sweep $op"; tail -5 "${TMPDIR:-/tmp}/nccl-$op.err"; }
      tail -2 "$OUT/nccl-$op.txt"
    done
  fi
fi

if want fit && [ "$GPUS" -ge 2 ]; then
  step "fit: the collective model to the sweeps (busbw before/after)"
  $PY -m workbench.cli calibrate nccl-tests "$OUT"/nccl-all_reduce.txt "$OUT"/nccl-all_gather.txt \
    "$OUT"/nccl-reduce_scatter.txt --cluster local --gpus "$GPUS" --algo ring --json \
    > "$OUT/calibrate-ring.json" || fail "calibrate ring"
fi

if want train; then
  step "train: the native engine, telemetry A/B, simulator before/after calibration"
  timeout 1500 $PY benchmarks/native_train.py --out "$OUT" --sweeps "$OUT" --model "$MODEL" --steps "$STEPS" \
    ${ONLY:+--only "$ONLY"} ${PROFILE:+--profile "$PROFILE"} || fail "native training"
fi

if want transport; then
  step "transport between GPUs"
  dst=$([ "$GPUS" -ge 2 ] && echo cuda:1 || echo cuda:0)
  for backend in cuda_ipc tcp; do
    timeout 600 $PY -m workbench.cli bench transport --backend "$backend" --device cuda:0 --target-device "$dst" \
      --lanes 4 --quick --soak 0 --json > "$OUT/transport-$backend.json" || fail "transport $backend"
  done
fi

if want kernels; then
  step "kernels feeding the transport"
  timeout 600 $PY -m kernels.bench --device gpu --json --out "$OUT/kernels.json" > /dev/null || fail kernels
fi

if want dispatch; then
  step "dispatch: host cost per op on this host (the simulator's host-bound term)"
  timeout 300 $PY benchmarks/host_dispatch.py --out "$OUT/dispatch" || fail "host dispatch"
fi

echo "exit status $status; results in $OUT"
exit $status
