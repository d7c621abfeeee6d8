#!/usr/bin/env bash
# One H100: the plain recipe through `clustertune train` with the lean MLP and the planner choosing
# stage and recomputed layers together (session 7). The strongest HF peer on W1 first (warms the
# machine), the loss gate (clustertune's default path vs the peer, same weights, same samples; its
# CLI run is the machine's first), W1 twice, W2 and W3 plain, then W2 and W3 at the settings that
# were fastest by hand in the harness (calls 2-3), which the planner's margins do not allow.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_plain_lean.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=585 . benchmarks/rows.sh
CVH="$CLI_PLAIN --steps 15"
W1=$W1_ARGS; W2=$W2_ARGS; W3=$W3_ARGS
issue13_rows $SUM
row_to $SUM w1_plain_again 90 $CVH $W1 --out /tmp/p/w1b
row_to $SUM w3_z0_n8 100 $CVH $W3 --set zero.stage=0 --set train.checkpoint_every_n_layers=8 --set train.micro_batch_tokens=32768 --out /tmp/p/w3h
row_to $SUM w2_n14 90 $CVH $W2 --set zero.stage=1 --set train.checkpoint_every_n_layers=14 --set train.micro_batch_tokens=32768 --out /tmp/p/w2h
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
