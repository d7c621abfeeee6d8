#!/usr/bin/env bash
# One H100, after the harness took the workers' allocator default (expandable segments): issue 13 item 0's
# check (same W1 work, ZeRO-1, every layer recomputed, tolerance 5%) and the harness at the plain recipe's
# settings (ZeRO-1, 32k rows, 1 of 28 recomputed), where without it the allocator retried (gpu1_cu_seqlens_ab.sh).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_check_alloc.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=300 . benchmarks/rows.sh
row_to $SUM check_zero1 150 python3 benchmarks/cli_vs_harness.py $W1_ARGS --budget 32768 --gc --steps 15 --stage 1 --out /tmp/p/check
row_to $SUM w1_harness_n28 60 $HARNESS --stage 1 --gc --every-n 28 $W1_ARGS
harness_table $SUM >> $SUM
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
