#!/usr/bin/env bash
# One H100: the plain recipe (no packing, row size, checkpointing, ZeRO or accumulation keys) through
# `clustertune train` now that "auto" resolves to ZeRO-1 with fp32 gradient accumulation (DeepSpeed's
# BF16_Optimizer): the strongest HF peer on W1 first (it also warms the machine up), W1 twice, the loss
# gate at ZeRO-1 (clustertune vs the peer from the same weights on the same samples), W2 and W3 plain.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_plain_zero1.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=575 . benchmarks/rows.sh
SUM=$OUT/summary.txt
CVH="python3 benchmarks/cli_vs_harness.py --steps 15 --cli-only --plain --verbose"
W1="--shape qwen2.5-1.5b --seq 4096 --batch 32"
row_to $SUM peer_w1 150 $PEER_W1
row_to $SUM w1_plain 100 $CVH $W1 --out /tmp/p/w1a
row_to $SUM w1_plain_again 100 $CVH $W1 --out /tmp/p/w1b
row_to $SUM loss_gate_zero1 200 python3 benchmarks/loss_gate.py --stage 1 --out /tmp/p/gate
tail -30 $LOGS/loss_gate_zero1.log >> $SUM
row_to $SUM w2_plain 90 $CVH --shape qwen2.5-1.5b --mode fixed --seq 2048 --batch 16 --out /tmp/p/w2
row_to $SUM w3_plain 100 $CVH --shape qwen2.5-7b --layers 8 --mode fixed --seq 2048 --batch 16 --out /tmp/p/w3
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
