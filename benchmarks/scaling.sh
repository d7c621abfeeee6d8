#!/usr/bin/env bash
# Issue 7 (needs a multi-GPU machine; not run yet: only single-GPU kinds were lent on 2026-11-25).
# Weak scaling of clustertune on one host: 1, 2, 4, 8 GPUs, ZeRO-2 and ZeRO-3, Qwen2.5-7B shape,
# SFT-like lengths, 16 samples per GPU per step in 16k-token packed rows, checkpointing on; then
# the HF Trainer + DeepSpeed baseline at the largest GPU count, and the user's 32B shape at
# 4096 tokens per sample under ZeRO-3 for 20+ steps. Results go to $OUT (default bench_out/).
#
#   NCCL_NVLS_ENABLE=0 PYTHONPATH=/tmp/site:$PWD/src bash benchmarks/scaling.sh 8
set -euo pipefail
cd "$(dirname "$0")/.."
MAX=${1:-8}
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
run() {  # name, gpus, args...
  local name=$1 n=$2; shift 2
  python3 -m deepspeed.launcher.runner --num_gpus "$n" --master_port 29631 "$@" 2>&1 | tee "$OUT/$name.log" | grep '^RESULT' || echo "RESULT {\"name\": \"$name\", \"error\": \"failed\"}"
}
for stage in 2 3; do
  for n in 1 2 4 8; do
    [ "$n" -le "$MAX" ] || continue
    run "scale_z${stage}_${n}gpu" "$n" benchmarks/bench_clustertune.py --shape qwen2.5-7b --stage "$stage" \
      --mode var --seq 4096 --batch $((16 * n)) --budget 16384 --gc --steps 20 --tag "scale_z${stage}_${n}"
  done
done
run "baseline_z3_${MAX}gpu" "$MAX" benchmarks/hf_trainer.py --shape 7b --stage 3 --mode var --seq 4096 --mbs 4 --gc --steps 20
# Planner's prediction for the 32B run on this machine, to compare with the measured peak:
clustertune plan configs/r1-distill-32b-2x8-h20.toml --nodes 1 --gpus-per-node "$MAX" --gpu h200 \
  --set train.micro_batch_tokens=8192 > "$OUT/r1_32b_plan.txt" 2>&1 || true
run "r1_32b_z3_${MAX}gpu" "$MAX" benchmarks/bench_clustertune.py --shape deepseek-r1-distill-qwen-32b --stage 3 \
  --mode fixed --seq 4096 --batch $((2 * MAX)) --budget 8192 --gc --steps 20 --tag r1_32b
