#!/usr/bin/env bash
# One H100, harness, ZeRO-1 fp32 accumulation unless said. Call 2's lean MLP still cost 4-5% at the
# same recompute: is it the allocator (a new [T, i] buffer per layer in backward; the product now
# goes into grad_product's storage) and does expandable_segments change either side?
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_lean_mlp3.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=${DEADLINE_S:-585}
. benchmarks/rows.sh
gpu_unit_tests $SUM tests/unit/test_lean_mlp.py
W3="$HARNESS --stage 1 $W3_ARGS"
W3Z0="$HARNESS --stage 0 $W3_ARGS"
W1="$HARNESS --stage 1 $W1_ARGS"
EXP="env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
row_to $SUM warmup 60 $W1 --gc --every-n 2 --lean-mlp on --steps 8
row_to $SUM w1_n2_off 60 $W1 --gc --every-n 2 --lean-mlp off
row_to $SUM w1_n2_on 60 $W1 --gc --every-n 2 --lean-mlp on
row_to $SUM w1_n2_off_exp 60 $EXP $W1 --gc --every-n 2 --lean-mlp off
row_to $SUM w1_n2_on_exp 60 $EXP $W1 --gc --every-n 2 --lean-mlp on
row_to $SUM w1_nockpt_on 60 $W1 --lean-mlp on
row_to $SUM w1_nockpt_on_exp 60 $EXP $W1 --lean-mlp on
row_to $SUM w3_n1_off 60 $W3 --gc --every-n 1 --lean-mlp off
row_to $SUM w3_n1_on 60 $W3 --gc --every-n 1 --lean-mlp on
row_to $SUM w3_n1_on_exp 60 $EXP $W3 --gc --every-n 1 --lean-mlp on
row_to $SUM w3z0_n8_on 60 $W3Z0 --gc --every-n 8 --lean-mlp on
row_to $SUM w3z0_n8_on_exp 60 $EXP $W3Z0 --gc --every-n 8 --lean-mlp on
harness_table $SUM
echo "done t=$(( $(date +%s) - T0 ))s"
