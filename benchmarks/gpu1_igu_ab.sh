#!/usr/bin/env bash
# One H100: zero.immediate_grad_update on vs off at the same resolved settings (session 8, call 3). Call 2's
# A/B let the planner choose n for each side (28 vs 13 layers), so it measured the recipe, not the switch.
# Here n, stage and rows are fixed; ABAB x3 on W1 (steps of 1-2 rows), x1 on W2 (one row per step).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_igu_ab.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=420 . benchmarks/rows.sh
CVH="$CLI_PLAIN --steps 15 --set zero.stage=1 --set train.micro_batch_tokens=32768 --set train.checkpoint_every_n_layers=28"
OFF="--set zero.immediate_grad_update=false"
for i in 1 2 3; do
  row_to $SUM w1_on_$i 70 $CVH $W1_ARGS --out /tmp/p/on$i
  row_to $SUM w1_off_$i 70 $CVH $W1_ARGS $OFF --out /tmp/p/off$i
done
row_to $SUM w2_on 70 $CVH $W2_ARGS --out /tmp/p/w2on
row_to $SUM w2_off 70 $CVH $W2_ARGS $OFF --out /tmp/p/w2off
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
