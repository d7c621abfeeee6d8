#!/usr/bin/env bash
# One H100, issue 13 item 4 after gpu1_graphs_profile.sh: that call's profile caught step 13, the step that
# first grows W1's peak (64.9 -> 72.7 GiB, half speed on a fresh machine), with CPU ops recorded. This one
# runs the plain W1 row twice on a warm machine (per-step metrics kept), then profiles a typical step (12)
# kernels-only (`train.profile_kernels_only`, the host barely slowed) and with CPU ops, and repeats the
# CUDA-graphs measurement of W3's decoder stack with twice the iterations.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_w1_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=480 . benchmarks/rows.sh
W1="$CLI_PLAIN --steps 15 $W1_ARGS"
keep_run() { cp $1/cli_run/metrics.jsonl $LOGS/$2.metrics.jsonl 2>/dev/null
  cp $1/cli_run/profile/*.txt $LOGS/ 2>/dev/null; }
for run in a b; do row_to $SUM w1_plain_$run 80 $W1 --out /tmp/p/w1$run; keep_run /tmp/p/w1$run w1_plain_$run; done
row_to $SUM w1_kernels_only 80 $W1 --set train.profile_step=12 --set train.profile_kernels_only=true --out /tmp/p/w1k
keep_run /tmp/p/w1k w1_kernels_only; mv $LOGS/step_12.txt $LOGS/w1_step12_kernels_only.txt 2>/dev/null
row_to $SUM w1_cpu_ops 100 $W1 --set train.profile_step=12 --out /tmp/p/w1c
keep_run /tmp/p/w1c w1_cpu_ops; mv $LOGS/step_12.txt $LOGS/w1_step12_cpu_ops.txt 2>/dev/null
for side in k c; do trace=$(ls /tmp/p/w1$side/cli_run/profile/*.trace.json 2>/dev/null | head -1)
  [ -n "$trace" ] && { python3 benchmarks/trace_gaps.py "$trace" --top 12 > $LOGS/w1_gaps_$side.txt 2>&1
    head -13 $LOGS/w1_gaps_$side.txt >> $SUM; }; done
head -1 $LOGS/w1_step12_*.txt >> $SUM
row_to $SUM w3_graphs_again 150 python3 benchmarks/cuda_graph_layers.py --iterations 20
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
