#!/usr/bin/env bash
# One H100: which DeepSpeed optimizer wrapper runs the one-GPU step fastest (harness, 32k rows, n = 2 as
# `auto` picks on W1). ZeRO-0 in bf16 is DeepSpeed's FP16_UnfusedOptimizer (a host sync per parameter for
# its overflow check, per-parameter fp32 grad copies); ZeRO-1 with zero.grad_accum_dtype = "fp32" is its
# BF16_Optimizer (flat fp32 buffers, one norm, one fused AdamW). --busy: GPU busy share of one step from a
# kernels-only profile. W1 ABAB, then W2 and W3 once each.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_optim.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/rows.sh
SUM=$OUT/summary.txt
H="python3 benchmarks/bench_clustertune.py --mode var --seq 4096 --batch 32 --budget 32768 --gc --steps 12 --order shuffled"
FP32=(--stage 1 --set zero.grad_accum_dtype='"fp32"')
row_to $SUM warmup 100 $H --every-n 2 --stage 0
row_to $SUM w1_s0 100 $H --every-n 2 --stage 0 --busy
row_to $SUM w1_s1_bf16 100 $H --every-n 2 --stage 1
row_to $SUM w1_s1_fp32 100 $H --every-n 2 "${FP32[@]}" --busy
row_to $SUM w1_s0_again 100 $H --every-n 2 --stage 0
row_to $SUM w1_s1_fp32_again 100 $H --every-n 2 "${FP32[@]}"
W2="python3 benchmarks/bench_clustertune.py --mode fixed --seq 2048 --batch 16 --budget 32768 --gc --steps 12 --order shuffled"
row_to $SUM w2_s0 100 $W2 --every-n 2 --stage 0
row_to $SUM w2_s1_fp32 100 $W2 --every-n 2 "${FP32[@]}"
W3="python3 benchmarks/bench_clustertune.py --shape qwen2.5-7b --layers 8 --mode fixed --seq 2048 --batch 16 --budget 32768 --gc --steps 12 --order shuffled"
row_to $SUM w3_s0 120 $W3 --stage 0 --busy
row_to $SUM w3_s1_fp32 120 $W3 "${FP32[@]}" --busy
harness_table $SUM
echo "done t=$(( $(date +%s) - T0 ))s"
