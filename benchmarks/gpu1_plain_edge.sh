#!/usr/bin/env bash
# One H100: the plain recipe through `clustertune train` after the planner's recalibration (session 8:
# measured allocator slack with expandable segments, a 5% margin, one-row steps without accumulation).
# The strongest HF peer on W1 (warms the machine), the loss gate on the new default path
# (immediate_grad_update, expandable segments), W1/W2/W3 plain, the immediate_grad_update A/B on W1
# (ABAB, same resolved settings), and the CLI-vs-harness check (same work, tolerance 5%).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_plain_edge.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=585 . benchmarks/rows.sh
CVH="$CLI_PLAIN --steps 15"
issue13_rows $SUM
row_to $SUM w1_igu_off 80 $CVH $W1_ARGS --set zero.immediate_grad_update=false --out /tmp/p/w1b
row_to $SUM w1_plain_again 80 $CVH $W1_ARGS --out /tmp/p/w1c
row_to $SUM w1_igu_off_again 80 $CVH $W1_ARGS --set zero.immediate_grad_update=false --out /tmp/p/w1d
row_to $SUM check_zero1 200 python3 benchmarks/cli_vs_harness.py $W1_ARGS --budget 32768 --gc --steps 15 --stage 1 --out /tmp/p/check
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
