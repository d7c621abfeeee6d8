#!/usr/bin/env bash
# Two GPUs of one host, W1 data-parallel (64 samples per step, 32k rows, every 2nd layer recomputed):
# ZeRO-1 accumulating in bf16 (DeepSpeedZeroOptimizer) vs in fp32 (BF16_Optimizer, what "auto" now
# resolves to), ABAB after a warm-up row; then ZeRO-2 once (what the planner ranks next).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu2_zero1_accum.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/rows.sh
SUM=$OUT/summary.txt
H="python3 -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/bench_clustertune.py --mode var --seq 4096 --batch 64 --budget 32768 --gc --every-n 2 --steps 12 --order shuffled --stage 1"
BF16=(--set zero.grad_accum_dtype='"bf16"'); FP32=(--set zero.grad_accum_dtype='"fp32"')
row_to $SUM warmup 120 $H "${FP32[@]}"
row_to $SUM z1_bf16 120 $H "${BF16[@]}"
row_to $SUM z1_fp32 120 $H "${FP32[@]}"
row_to $SUM z1_bf16_again 120 $H "${BF16[@]}"
row_to $SUM z1_fp32_again 120 $H "${FP32[@]}"
harness_table $SUM
echo "done t=$(( $(date +%s) - T0 ))s"
