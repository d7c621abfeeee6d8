#!/usr/bin/env bash
# One H100, issue 13's last lever never measured alone: cu_seqlens computed on the CPU in collate (the
# default) vs derived from position ids on the GPU (`bench_clustertune.py --cu-seqlens-on-gpu`: two host-device
# syncs per micro-batch). ABAB at fixed settings (ZeRO-1, 32k rows, 1 of 28 layers recomputed, what auto picks):
# W1 (steps of one row: the syncs fall where the GPU already waits) and W2 at 48 samples per step (three rows:
# the syncs of rows 2 and 3 drain the GPU mid-step).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_cu_seqlens_ab.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=480 . benchmarks/rows.sh
FIXED="--stage 1 --gc --every-n 28"
for i in 1 2; do
  row_to $SUM w1_cpu_$i 60 $HARNESS $FIXED $W1_ARGS
  row_to $SUM w1_gpu_$i 60 $HARNESS $FIXED $W1_ARGS --cu-seqlens-on-gpu
done
for i in 1 2; do
  row_to $SUM w2x48_cpu_$i 75 $HARNESS $FIXED $W2_ARGS --batch 48
  row_to $SUM w2x48_gpu_$i 75 $HARNESS $FIXED $W2_ARGS --batch 48 --cu-seqlens-on-gpu
done
harness_table $SUM >> $SUM
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
