#!/usr/bin/env bash
# The 4-GPU points of issue 12's weak scaling (through `clustertune train`, same workloads and
# per-GPU batch as benchmarks/gpu4_lanes.sh), the strongest HF Trainer peer at 4 GPUs for W1 and W3
# (same samples per GPU per step), then (PART=all) issue 11's ZeRO++ comparison in the GPU sandbox.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu4_full.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; LOGS=/tmp/full; mkdir -p $LOGS $OUT
T0=$(date +%s); S=${STEPS:-15}
nvidia-smi -L; date -u
row() { local name=$1 lim=$2; shift 2; echo "== $name (limit ${lim}s, t=$(( $(date +%s) - T0 ))s)"
  timeout $lim "$@" > $LOGS/$name.log 2>&1; echo "rc=$?"; grep -h "^RESULT\|^FAIL" $LOGS/$name.log | cut -c1-1500
  grep -h "first step after" $LOGS/$name.log | tail -1 | cut -c1-300
  grep -m2 -h "Error\|out of memory" $LOGS/$name.log | cut -c1-300; tar czf $OUT/full_logs.tgz -C $LOGS . ; }
CVH="python3 benchmarks/cli_vs_harness.py --steps $S --cli-only --verbose"
W1="--shape qwen2.5-1.5b --seq 4096 --batch 128 --budget 32768 --gc --nproc 4"
W3="--shape qwen2.5-7b --layers 8 --mode fixed --seq 2048 --batch 64 --budget 16384 --gc --nproc 4 --set zero.param_persistence_threshold=100000000"
for st in 2 3; do row w1_z${st}_n4 110 $CVH $W1 --stage $st --out /tmp/sc/w1z${st}n4; done
for st in 2 3; do row w3_z${st}_n4 110 $CVH $W3 --stage $st --out /tmp/sc/w3z${st}n4; done
TR="python3 -m torch.distributed.run --standalone --nproc_per_node 4 benchmarks/hf_trainer.py --gc --steps $S --padfree --liger --fused-adamw"
row peer_w1_z2_n4 110 $TR --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 16 --ga 2
row peer_w3_z3_n4 110 $TR --shape 7b-8l --stage 3 --mode fixed --seq 2048 --mbs 8 --ga 2 --persist 1e8
echo "scaling done t=$(( $(date +%s) - T0 ))s"
if [ "${PART:-all}" = all ]; then
  OUT=$OUT/sandbox bash benchmarks/gpu_sandbox.sh zeropp 2>&1 | tail -15
fi
echo "done t=$(( $(date +%s) - T0 ))s"
