#!/usr/bin/env bash
# One H100, harness, ZeRO-1 fp32 accumulation unless said: the lean MLP with its backward as one
# Triton kernel (call 1's separate product kernel cost 5-6%), its CUDA correctness test, and the
# fewest recomputed layers each workload fits with it (W3 also at ZeRO-0, whose states are 5 GiB smaller).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_lean_mlp2.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=${DEADLINE_S:-585}
. benchmarks/rows.sh
gpu_unit_tests $SUM tests/unit/test_lean_mlp.py
W3="$HARNESS --stage 1 $W3_ARGS"
W3Z0="$HARNESS --stage 0 $W3_ARGS"
W2="$HARNESS --stage 1 $W2_ARGS"
W1="$HARNESS --stage 1 $W1_ARGS"
row_to $SUM warmup 60 $W1 --gc --every-n 2 --lean-mlp on --steps 8
row_to $SUM w1_n2_off 60 $W1 --gc --every-n 2 --lean-mlp off
row_to $SUM w1_n2_on 60 $W1 --gc --every-n 2 --lean-mlp on
row_to $SUM w1_n28_on 60 $W1 --gc --every-n 28 --lean-mlp on
row_to $SUM w1_nockpt_on 60 $W1 --lean-mlp on
row_to $SUM w3_n1_off 60 $W3 --gc --every-n 1 --lean-mlp off
row_to $SUM w3_n1_on 60 $W3 --gc --every-n 1 --lean-mlp on
row_to $SUM w3z0_n3_on 60 $W3Z0 --gc --every-n 3 --lean-mlp on
row_to $SUM w3z0_n4_on 60 $W3Z0 --gc --every-n 4 --lean-mlp on
row_to $SUM w3z0_n8_on 60 $W3Z0 --gc --every-n 8 --lean-mlp on
row_to $SUM w2_n7_on 60 $W2 --gc --every-n 7 --lean-mlp on
row_to $SUM w2_n14_on 60 $W2 --gc --every-n 14 --lean-mlp on
row_to $SUM w2_nockpt_on 60 $W2 --lean-mlp on
harness_table $SUM
echo "done t=$(( $(date +%s) - T0 ))s"
