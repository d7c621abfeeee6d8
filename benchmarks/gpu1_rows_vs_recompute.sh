#!/usr/bin/env bash
# One H100, harness, ZeRO-1 with fp32 accumulation (the default now): with the GPU 95-97% busy, does
# recomputing less pay for more, smaller rows? Per workload: the default (one 32k row, n = 2 for W1/W2,
# every layer for W3) against 16k rows with fewer or no recomputed layers. W3 first (warm-up row).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_rows_vs_recompute.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/rows.sh
SUM=$OUT/summary.txt
B="python3 benchmarks/bench_clustertune.py --steps 12 --order shuffled --stage 1"
W3="$B --shape qwen2.5-7b --layers 8 --mode fixed --seq 2048 --batch 16"
W2="$B --shape qwen2.5-1.5b --mode fixed --seq 2048 --batch 16"
W1="$B --shape qwen2.5-1.5b --mode var --seq 4096 --batch 32"
row_to $SUM warmup 100 $W3 --budget 32768 --gc
row_to $SUM w3_32k_n1 100 $W3 --budget 32768 --gc
row_to $SUM w3_16k_n2 100 $W3 --budget 16384 --gc --every-n 2
row_to $SUM w3_16k_nockpt 100 $W3 --budget 16384
row_to $SUM w2_32k_n2 80 $W2 --budget 32768 --gc --every-n 2
row_to $SUM w2_16k_nockpt 80 $W2 --budget 16384
row_to $SUM w1_32k_n2 80 $W1 --budget 32768 --gc --every-n 2
row_to $SUM w1_16k_nockpt 80 $W1 --budget 16384
row_to $SUM w3_32k_n1_again 100 $W3 --budget 32768 --gc
harness_table $SUM
echo "done t=$(( $(date +%s) - T0 ))s"
