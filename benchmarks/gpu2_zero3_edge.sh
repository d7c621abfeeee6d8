#!/usr/bin/env bash
# Two H100s, one host: the recalibrated planner (2% allocator slack with expandable segments, 5% margin)
# checked where it was not measured, ZeRO-3 across ranks (session 8, call 5). 32 fixed 2048-token samples
# per step = one full 32k row per rank. W3 (7B width, 8 layers) and the 32B width cut to 8 layers, stage
# fixed to 3, the rest "auto"; the 32B row again with torch's fixed blocks (the slack without expandable
# segments under ZeRO-3's per-layer gathers).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu2_zero3_edge.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=420 . benchmarks/rows.sh
Z3="$CLI_PLAIN --steps 12 --nproc 2 --mode fixed --seq 2048 --batch 32 --set zero.stage=3"
row_to $SUM w3_z3 120 $Z3 --shape qwen2.5-7b --layers 8 --out /tmp/p/a
row_to $SUM r1w_8l_z3 150 $Z3 --shape deepseek-r1-distill-qwen-32b --layers 8 --out /tmp/p/b
row_to $SUM r1w_8l_z3_fixed_blocks 150 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False \
    $Z3 --shape deepseek-r1-distill-qwen-32b --layers 8 --out /tmp/p/c
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
