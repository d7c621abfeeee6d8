#!/usr/bin/env bash
# One H100, issue 13's two open measurements (prepared in session 8, not yet run): the CUDA-graphs lever
# on W3's fixed-shape decoder stack (benchmarks/cuda_graph_layers.py: eager vs graphed, same weights and
# row) and a profile of the final W1 step through `clustertune train` (plain recipe, the GPU busy share
# by benchmarks/trace_gaps.py), beside the plain W1 row unprofiled.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_graphs_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=420 . benchmarks/rows.sh
row_to $SUM w3_graphs 150 python3 benchmarks/cuda_graph_layers.py
row_to $SUM w1_plain 80 $CLI_PLAIN --steps 15 $W1_ARGS --out /tmp/p/w1
row_to $SUM w1_plain_profiled 120 $CLI_PLAIN --steps 15 $W1_ARGS --profile --out /tmp/p/w1p
trace=$(ls /tmp/p/w1p/cli_run/profile/*.trace.json* 2>/dev/null | head -1)
[ -n "$trace" ] && { python3 benchmarks/trace_gaps.py "$trace" --top 8 > $LOGS/w1_trace_gaps.txt 2>&1
  head -12 $LOGS/w1_trace_gaps.txt >> $SUM; }
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
