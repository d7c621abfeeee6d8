#!/usr/bin/env bash
# One H100: the product-path check on the new one-GPU default (ZeRO-1, fp32 gradient accumulation):
# `clustertune train` vs the harness on the same rows (tolerance 5%), after a warm-up row; then the
# plain W1 recipe twice more (call 3's two runs differed by 9%: 33,958 first, 37,239 second).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_check_zero1.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/rows.sh
SUM=$OUT/summary.txt
W1="--shape qwen2.5-1.5b --seq 4096 --batch 32"
row_to $SUM warmup 100 python3 benchmarks/bench_clustertune.py $W1 --mode var --budget 32768 --gc --every-n 2 --steps 10 --stage 1
row_to $SUM check_zero1 200 python3 benchmarks/cli_vs_harness.py $W1 --budget 32768 --gc --steps 15 --stage 1 --out /tmp/c/check
row_to $SUM w1_plain 100 python3 benchmarks/cli_vs_harness.py --steps 15 --cli-only --plain $W1 --out /tmp/c/w1a
row_to $SUM w1_plain_again 100 python3 benchmarks/cli_vs_harness.py --steps 15 --cli-only --plain $W1 --out /tmp/c/w1b
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
