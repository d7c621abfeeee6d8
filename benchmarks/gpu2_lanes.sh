#!/usr/bin/env bash
# Issue 13 on a 2-GPU host, two independent 1-GPU lanes at once (nothing shared but the host's
# cores), every clustertune row through `clustertune train` on a JSONL (benchmarks/cli_vs_harness.py):
#   lane A, GPU 0: the product path vs the harness on W1 (ZeRO-1, 32k rows; the check, 5%), then W1
#                  with selective checkpointing every 3rd / 4th layer, then ZeRO-0 (plain DeepSpeed
#                  bf16 optimizer, no partitioning) with every 2nd layer;
#   lane B, GPU 1: W2 (Qwen2.5-1.5B shape, fixed 2048-token samples, 16 per step, ZeRO-3) through the
#                  CLI and the strongest HF peer, W2 at ZeRO-1 (what `plan` ranks first on one GPU),
#                  W1 with expandable CUDA segments, then the seed's padded peer on W2.
# W1 = Qwen2.5-1.5B shape, SFT-like lengths capped at 4096, 32 samples per step, 32k-token rows.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out DEADLINE_S=570 bash benchmarks/gpu2_lanes.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=/tmp/lanes; source benchmarks/rows.sh
S=${STEPS:-15}
# row LANE NAME LIMIT cmd...: a row of that lane (its summary: $LOGS/LANE.sum)
row() { local lane=$1; shift; row_to $LOGS/$lane.sum "$@"; }
CVH="python3 benchmarks/cli_vs_harness.py --steps $S --verbose"
W1="--shape qwen2.5-1.5b --seq 4096 --batch 32 --budget 32768 --gc"
W2="--shape qwen2.5-1.5b --mode fixed --seq 2048 --batch 16 --budget 32768 --gc"
P3="--set zero.param_persistence_threshold=100000000"
TR="python3 -m torch.distributed.run --standalone --nproc_per_node 1"
PEER="benchmarks/hf_trainer.py --gc --steps $S"
lane_a() { export CUDA_VISIBLE_DEVICES=0
  row A check_w1_z1 230 $CVH $W1 --stage 1 --out /tmp/i13/check
  for n in 3 4; do row A w1_sel${n} 100 $CVH $W1 --stage 1 --cli-only --out /tmp/i13/sel$n --set train.checkpoint_every_n_layers=$n; done
  row A w1_z0_sel2 100 $CVH $W1 --stage 0 --cli-only --out /tmp/i13/z0 --set train.checkpoint_every_n_layers=2; }
lane_b() { export CUDA_VISIBLE_DEVICES=1
  row B w2_z3 100 $CVH $W2 --stage 3 --cli-only --out /tmp/i13/w2z3 $P3
  row B peer_w2_z3 130 $TR $PEER --padfree --liger --fused-adamw --shape 1.5b --stage 3 --mode fixed --seq 2048 --mbs 8 --ga 2 --persist 1e8
  row B w2_z1_sel2 100 $CVH $W2 --stage 1 --cli-only --out /tmp/i13/w2z1 --set train.checkpoint_every_n_layers=2
  row B w1_sel2_expandable 100 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $CVH $W1 --stage 1 --cli-only \
      --out /tmp/i13/exp --set train.checkpoint_every_n_layers=2
  row B seed_w2_z3 130 $TR $PEER --shape 1.5b --stage 3 --mode fixed --seq 2048 --mbs 4 --ga 4 --persist 1e8; }
lane_a & A=$!; lane_b & B=$!
while kill -0 $A 2>/dev/null || kill -0 $B 2>/dev/null; do sleep 15; tar czf $OUT/logs.tgz -C $LOGS . 2>/dev/null; done
wait
for l in A B; do echo "######## lane $l"; cat $LOGS/$l.sum; done | tee $OUT/summary.txt
tar czf $OUT/logs.tgz -C $LOGS .
echo "done t=$(( $(date +%s) - T0 ))s"
