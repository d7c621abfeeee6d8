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
CVH="python3 benchmarks/cli_vs_harness.py --steps 15 --cli-only --plain --verbose"
row_to $SUM peer_w1 150 python3 -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/hf_trainer.py \
    --gc --steps 15 --padfree --liger --fused-adamw --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 16 --ga 2
row_to $SUM loss_gate 200 python3 benchmarks/loss_gate.py --stage 1 --out /tmp/p/gate
tail -3 $LOGS/loss_gate.log >> $SUM
row_to $SUM w1_plain 80 $CVH $W1_ARGS --out /tmp/p/w1a
row_to $SUM w2_plain 80 $CVH $W2_ARGS --out /tmp/p/w2
row_to $SUM w3_plain 80 $CVH $W3_ARGS --out /tmp/p/w3
row_to $SUM w1_igu_off 80 $CVH $W1_ARGS --set zero.immediate_grad_update=false --out /tmp/p/w1b
row_to $SUM w1_plain_again 80 $CVH $W1_ARGS --out /tmp/p/w1c
row_to $SUM w1_igu_off_again 80 $CVH $W1_ARGS --set zero.immediate_grad_update=false --out /tmp/p/w1d
row_to $SUM check_zero1 200 python3 benchmarks/cli_vs_harness.py $W1_ARGS --budget 32768 --gc --steps 15 --stage 1 --out /tmp/p/check
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
