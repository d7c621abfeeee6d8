#!/usr/bin/env bash
# One H100: the W1 step's timeline (plain recipe through `clustertune train`, train.profile_step:
# the Chrome trace, gzipped, for benchmarks/trace_gaps.py), then DeepSpeed-free host-overhead A/B in
# the harness: PyTorch's cuBLASLt addmm path (q/k/v projections with bias) on and off
# (DISABLE_ADDMM_CUDA_LT=1), ZeRO-0, full checkpointing, after a warm-up run.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_trace.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/rows.sh; SUM=$OUT/summary.txt
row() { row_to $SUM "$@"; }
row w1_trace 100 python3 benchmarks/cli_vs_harness.py --steps 15 --cli-only --plain --profile --shape qwen2.5-1.5b --seq 4096 --batch 32 --out /tmp/t/prof
gzip -c /tmp/t/prof/cli_run/profile/step_13.trace.json > $OUT/w1_step13.trace.json.gz; ls -la $OUT
H="python3 benchmarks/bench_clustertune.py --shape qwen2.5-1.5b --mode var --seq 4096 --batch 32 --budget 32768 --gc --steps 15 --order shuffled --stage 0"
row h_lt_on 90 $H
row h_lt_off 90 env DISABLE_ADDMM_CUDA_LT=1 $H
row h_lt_on_again 90 $H
row h_lt_off_again 90 env DISABLE_ADDMM_CUDA_LT=1 $H
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
