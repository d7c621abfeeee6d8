#!/usr/bin/env bash
# One H100: where the card's memory really ends, through `clustertune train` (session 8). Each row fixes
# stage, rows and recomputed layers by hand (--set) at or past what the planner allows, and records
# max allocated, max reserved, the memory resident between steps, or the error. With the worker's new
# defaults (expandable_segments, bf16.immediate_grad_update) and, for two rows, without each of them.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_memory_edge.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=585 . benchmarks/rows.sh
CVH="$CLI_PLAIN --steps 14"
Z1="--set zero.stage=1 --set train.micro_batch_tokens=32768"
Z0="--set zero.stage=0 --set train.micro_batch_tokens=32768"
NOEXP="env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False"
row_to $SUM w1_n14 90 $CVH $W1_ARGS $Z1 --set train.checkpoint_every_n_layers=14 --out /tmp/p/a
row_to $SUM w1_n14_igu_off 90 $CVH $W1_ARGS $Z1 --set train.checkpoint_every_n_layers=14 --set zero.immediate_grad_update=false --out /tmp/p/b
row_to $SUM w2_n14 90 $CVH $W2_ARGS $Z1 --set train.checkpoint_every_n_layers=14 --out /tmp/p/c
row_to $SUM w2_n14_noexp 90 $NOEXP $CVH $W2_ARGS $Z1 --set train.checkpoint_every_n_layers=14 --out /tmp/p/d
row_to $SUM w3_z0_n8 90 $CVH $W3_ARGS $Z0 --set train.checkpoint_every_n_layers=8 --out /tmp/p/e
row_to $SUM w3_z0_n8_noexp 90 $NOEXP $CVH $W3_ARGS $Z0 --set train.checkpoint_every_n_layers=8 --out /tmp/p/f
row_to $SUM w1_n28 90 $CVH $W1_ARGS $Z1 --set train.checkpoint_every_n_layers=28 --out /tmp/p/g
row_to $SUM w2_n28 90 $CVH $W2_ARGS $Z1 --set train.checkpoint_every_n_layers=28 --out /tmp/p/h
row_to $SUM w3_z1_n2 90 $CVH $W3_ARGS $Z1 --set train.checkpoint_every_n_layers=2 --out /tmp/p/i
row_to $SUM w2_nockpt 90 $CVH $W2_ARGS $Z1 --set train.gradient_checkpointing=false --out /tmp/p/j
row_to $SUM w3_z0_nockpt 90 $CVH $W3_ARGS $Z0 --set train.gradient_checkpointing=false --out /tmp/p/k
row_to $SUM w1_nockpt 90 $CVH $W1_ARGS $Z1 --set train.gradient_checkpointing=false --out /tmp/p/l
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
