#!/usr/bin/env bash
# One H100, issue 13's closing rows on the final commit: the strongest peer, the loss gate, W1-W3 through
# `clustertune train` with no speed keys (rows.sh issue13_rows), then W1 again over 30 steps (the one
# two-row step, 13, weighs half as much in the steady-state figure).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_final_rows.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=560 . benchmarks/rows.sh
issue13_rows $SUM
row_to $SUM w1_plain_30_steps 110 $CLI_PLAIN --steps 30 $W1_ARGS --out /tmp/p/w1l
cp /tmp/p/w1a/cli_run/metrics.jsonl $LOGS/w1_plain.metrics.jsonl 2>/dev/null
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
