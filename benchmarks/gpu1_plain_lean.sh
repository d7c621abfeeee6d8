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
CVH="python3 benchmarks/cli_vs_harness.py --steps 15 --cli-only --plain --verbose"
W1=$W1_ARGS; W2=$W2_ARGS; W3=$W3_ARGS
row_to $SUM peer_w1 150 python3 -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/hf_trainer.py \
    --gc --steps 15 --padfree --liger --fused-adamw --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 16 --ga 2
row_to $SUM loss_gate_lean 200 python3 benchmarks/loss_gate.py --stage 1 --out /tmp/p/gate
tail -12 $LOGS/loss_gate_lean.log >> $SUM
row_to $SUM w1_plain 90 $CVH $W1 --out /tmp/p/w1a
row_to $SUM w1_plain_again 90 $CVH $W1 --out /tmp/p/w1b
row_to $SUM w2_plain 90 $CVH $W2 --out /tmp/p/w2
row_to $SUM w3_plain 100 $CVH $W3 --out /tmp/p/w3
row_to $SUM w3_z0_n8 100 $CVH $W3 --set zero.stage=0 --set train.checkpoint_every_n_layers=8 --set train.micro_batch_tokens=32768 --out /tmp/p/w3h
row_to $SUM w2_n14 90 $CVH $W2 --set zero.stage=1 --set train.checkpoint_every_n_layers=14 --set train.micro_batch_tokens=32768 --out /tmp/p/w2h
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
