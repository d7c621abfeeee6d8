#!/usr/bin/env bash
# One H100: the CLI-vs-harness check on the ZeRO-1 default twice in a row (call 5's first check ran
# the CLI at 0.94x the harness; the first `clustertune train` run of calls 3 and 5 was 6-9% slower than
# the later ones): is it the first CLI run of a machine or the path itself?
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_check_twice.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/rows.sh
SUM=$OUT/summary.txt
CHECK="python3 benchmarks/cli_vs_harness.py --shape qwen2.5-1.5b --seq 4096 --batch 32 --budget 32768 --gc --steps 15 --stage 1"
row_to $SUM check_1 200 $CHECK --out /tmp/c/check1
row_to $SUM check_2 200 $CHECK --out /tmp/c/check2
row_to $SUM check_3 200 $CHECK --out /tmp/c/check3
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
