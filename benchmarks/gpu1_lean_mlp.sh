#!/usr/bin/env bash
# One H100, harness, ZeRO-1 with fp32 accumulation (the default): the lean MLP (silu(gate) * up
# recomputed in backward, not kept: a quarter less memory per non-recomputed 1.5B layer) and the
# fewer recomputed layers it makes room for. Per workload: session 6's default without it, the same
# with it (its own cost), then larger checkpoint_every_n_layers (fewer layers recomputed).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_lean_mlp.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE_S=${DEADLINE_S:-585}
. benchmarks/rows.sh
W1="$HARNESS --gc --stage 1 $W1_ARGS"; W2="$HARNESS --gc --stage 1 $W2_ARGS"; W3="$HARNESS --gc --stage 1 $W3_ARGS"
row_to $SUM warmup 60 $W1 --every-n 2 --lean-mlp on --steps 8
row_to $SUM w1_n2_off 60 $W1 --every-n 2 --lean-mlp off
row_to $SUM w1_n2_on 60 $W1 --every-n 2 --lean-mlp on
row_to $SUM w1_n4_on 60 $W1 --every-n 4 --lean-mlp on
row_to $SUM w1_n7_on 60 $W1 --every-n 7 --lean-mlp on
row_to $SUM w1_n28_on 60 $W1 --every-n 28 --lean-mlp on
row_to $SUM w3_n1_off 60 $W3 --every-n 1 --lean-mlp off
row_to $SUM w3_n1_on 60 $W3 --every-n 1 --lean-mlp on
row_to $SUM w3_n2_on 60 $W3 --every-n 2 --lean-mlp on
row_to $SUM w3_n3_on 60 $W3 --every-n 3 --lean-mlp on
row_to $SUM w3_n3_on_z0 60 $HARNESS --gc --stage 0 $W3_ARGS --every-n 3 --lean-mlp on
row_to $SUM w2_n2_off 60 $W2 --every-n 2 --lean-mlp off
row_to $SUM w2_n2_on 60 $W2 --every-n 2 --lean-mlp on
row_to $SUM w2_n4_on 60 $W2 --every-n 4 --lean-mlp on
row_to $SUM w2_n7_on 60 $W2 --every-n 7 --lean-mlp on
harness_table $SUM
echo "done t=$(( $(date +%s) - T0 ))s"
