#!/usr/bin/env bash
# One H100: the planner's accumulation case measured (session 8, call 4). 48 fixed-length samples per step
# = three full 32k rows, so gradients of the first rows live through the later ones: W2 plain (ZeRO-1,
# immediate_grad_update), W2 at the same settings with it off (planned +2.4 GiB), W3 plain (ZeRO-0: its bf16
# gradients are counted whole when a step accumulates).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_accumulation_edge.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=300 . benchmarks/rows.sh
CVH="$CLI_PLAIN --steps 10"
W2B="--shape qwen2.5-1.5b --mode fixed --seq 2048 --batch 48"
W3B="--shape qwen2.5-7b --layers 8 --mode fixed --seq 2048 --batch 48"
row_to $SUM w2_b48_plain 80 $CVH $W2B --out /tmp/p/a
row_to $SUM w2_b48_igu_off 80 $CVH $W2B --set zero.stage=1 --set train.micro_batch_tokens=32768 \
    --set train.checkpoint_every_n_layers=28 --set zero.immediate_grad_update=false --out /tmp/p/b
row_to $SUM w3_b48_plain 90 $CVH $W3B --out /tmp/p/c
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
