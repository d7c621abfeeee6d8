#!/usr/bin/env bash
# One call on a 4-GPU host, three independent lanes at once (each on its own GPUs; nothing is shared
# but the host's 64 cores), every clustertune row through `clustertune train` on a JSONL:
#   lane A, GPU 0:    weak scaling at 1 GPU  (W1 ZeRO-2/3, W3 ZeRO-2/3), then the W1 profile step
#   lane B, GPUs 1,2: weak scaling at 2 GPUs (the same four), then W1 + train.compile on GPU 1
#   lane C, GPU 3:    issue 13's W1 levers (benchmarks/issue13_levers.sh rows)
# W1 = Qwen2.5-1.5B shape, SFT-like lengths capped at 4096, 32 samples per GPU per step, 32k-token
# rows, checkpointing. W3 = Qwen2.5-7B width cut to 8 layers (model.num_layers), fixed 2048-token
# samples, 16 per GPU per step, 16k-token rows, persistence threshold 1e8, checkpointing.
# The 4-GPU points and the HF peers at 4 GPUs: benchmarks/gpu4_full.sh (needs the whole machine).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out DEADLINE_S=570 bash benchmarks/gpu4_lanes.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=/tmp/lanes; source benchmarks/rows.sh
S=${STEPS:-15}
# row LANE NAME LIMIT cmd...: a row of that lane (its summary: $LOGS/LANE.sum)
row() { local lane=$1; shift; row_to $LOGS/$lane.sum "$@"; }
CVH="python3 benchmarks/cli_vs_harness.py --steps $S --cli-only --verbose"
w1() { echo "--shape qwen2.5-1.5b --seq 4096 --batch $((32 * $1)) --budget 32768 --gc --nproc $1"; }
# the persistence threshold is a ZeRO-3 key (the recipe refuses it with stage 2)
w3() { echo "--shape qwen2.5-7b --layers 8 --mode fixed --seq 2048 --batch $((16 * $1)) --budget 16384 --gc --nproc $1 --stage $2"
       [ "$2" = 3 ] && echo "--set zero.param_persistence_threshold=100000000"; }
scaling_lane() {  # LANE GPUS N
  local lane=$1 n=$3; export CUDA_VISIBLE_DEVICES=$2
  for st in 2 3; do row $lane w1_z${st}_n$n 130 $CVH $(w1 $n) --stage $st --out /tmp/sc/w1z${st}n$n; done
  for st in 2 3; do row $lane w3_z${st}_n$n 130 $CVH $(w3 $n $st) --out /tmp/sc/w3z${st}n$n; done
}
lane_a() { scaling_lane A 0 1
  row A w1_profile 120 $CVH $(w1 1) --stage 1 --out /tmp/sc/prof --profile
  mkdir -p $LOGS/profile && cp /tmp/sc/prof/cli_run/profile/*.txt $LOGS/profile/ 2>/dev/null; }
lane_b() { scaling_lane B 1,2 2
  CUDA_VISIBLE_DEVICES=1 row B w1_compile 200 $CVH $(w1 1) --stage 1 --out /tmp/sc/comp --set train.compile=true; }
lane_c() { export CUDA_VISIBLE_DEVICES=3
  local W1="--shape qwen2.5-1.5b --seq 4096 --batch 32 --gc --steps $S --stage 1 --verbose"
  row C check_32k 220 python3 benchmarks/cli_vs_harness.py $W1 --budget 32768 --out /tmp/i13/a
  row C sel2_32k 120 python3 benchmarks/cli_vs_harness.py $W1 --budget 32768 --out /tmp/i13/b --cli-only --set train.checkpoint_every_n_layers=2
  row C nogc_16k 120 python3 benchmarks/cli_vs_harness.py $W1 --budget 16384 --out /tmp/i13/c --cli-only --set train.gradient_checkpointing=false
  row C peer_seed 130 python3 -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/hf_trainer.py \
      --shape 1.5b --stage 2 --mode var --seq 4096 --gc --steps $S --mbs 4 --ga 8; }
lane_a & A=$!; lane_b & B=$!; lane_c & C=$!
while kill -0 $A 2>/dev/null || kill -0 $B 2>/dev/null || kill -0 $C 2>/dev/null; do
  sleep 15; tar czf $OUT/logs.tgz -C $LOGS . 2>/dev/null; done
wait
for l in A B C; do echo "######## lane $l"; cat $LOGS/$l.sum; done | tee $OUT/summary.txt
tar czf $OUT/logs.tgz -C $LOGS .
echo "done t=$(( $(date +%s) - T0 ))s"
