#!/usr/bin/env bash
# One H100: the fused loss's chunk size (plan.LIGER_CHUNK_MEM_CONST) A/B through the harness (same
# GPU, one after the other, --diagnose), then W1 through `clustertune train` at ZeRO-0 with every
# 2nd layer recomputed (the chunk constant's new default) beside the strongest HF peer, same call.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_chunks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/rows.sh; SUM=$OUT/summary.txt
row() { row_to $SUM "$@"; }
H="python3 benchmarks/bench_clustertune.py --shape qwen2.5-1.5b --mode var --seq 4096 --batch 32 --budget 32768 --gc --steps 15 --order shuffled --stage 0 --diagnose"
row harness_c1 120 $H --liger-chunk-mem-const 1
row harness_c16 120 $H --liger-chunk-mem-const 16
row harness_c1_again 120 $H --liger-chunk-mem-const 1
row cli_z0_sel2 120 python3 benchmarks/cli_vs_harness.py --shape qwen2.5-1.5b --seq 4096 --batch 32 --budget 32768 --gc \
    --steps 15 --stage 0 --cli-only --verbose --out /tmp/c5/cli --set train.checkpoint_every_n_layers=2
row peer_w1 150 python3 -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/hf_trainer.py --gc --steps 15 \
    --padfree --liger --fused-adamw --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 16 --ga 2
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
