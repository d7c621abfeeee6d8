#!/usr/bin/env bash
# Four H100s, one host: the 32B width cut to 24 layers, ZeRO-3, everything else "auto" (session 8, call 6).
# The recalibrated planner (gather slack of 7 layers, 5% margin) puts this at 75.6 of a 75.6 GiB budget:
# the check is that it runs and that allocated and reserved stay within the plan. 64 fixed 2048-token
# samples per step = 32k tokens per rank.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu4_zero3_edge.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=330 . benchmarks/rows.sh
row_to $SUM r1w_24l_z3 300 $CLI_PLAIN --steps 10 --nproc 4 --mode fixed --seq 2048 --batch 64 --set zero.stage=3 \
    --shape deepseek-r1-distill-qwen-32b --layers 24 --out /tmp/p/a
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
