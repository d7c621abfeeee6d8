#!/usr/bin/env bash
# The rest of issue 12's weak scaling and issue 13's same-call W1 comparison, on a 4-GPU host,
# every clustertune row through `clustertune train` (workloads as in benchmarks/gpu4_lanes.sh):
#  phase 1, three lanes at once: W3 ZeRO-2 at 1 GPU (GPU 0) and 2 GPUs (GPUs 1,2); on GPU 3 the
#          W1 CLI row with selective checkpointing beside the strongest HF peer (same 32 samples
#          per step) and W1 + train.compile (attention and MLP blocks compiled);
#  phase 2, the whole machine: the 4-GPU points (W1, W3; ZeRO-2, ZeRO-3) and the strongest HF peer
#          at 4 GPUs for W1 and W3 (same samples per GPU per step).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu4_full.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; LOGS=/tmp/full; mkdir -p $LOGS $OUT
T0=$(date +%s); S=${STEPS:-15}
nvidia-smi -L; date -u
row() { local lane=$1 name=$2 lim=$3; shift 3; { echo "== $name (limit ${lim}s, t=$(( $(date +%s) - T0 ))s)"
  timeout $lim "$@" > $LOGS/$name.log 2>&1; echo "rc=$?"; grep -h "^RESULT\|^FAIL" $LOGS/$name.log | cut -c1-1500
  grep -h "first step after" $LOGS/$name.log | tail -1 | cut -c1-300
  grep -m2 -h "Error\|out of memory" $LOGS/$name.log | cut -c1-300; } >> $LOGS/$lane.sum; }
CVH="python3 benchmarks/cli_vs_harness.py --steps $S --cli-only --verbose"
W1="--shape qwen2.5-1.5b --seq 4096 --budget 32768 --gc"
W3="--shape qwen2.5-7b --layers 8 --mode fixed --seq 2048 --budget 16384 --gc"
P3="--set zero.param_persistence_threshold=100000000"
TR="python3 -m torch.distributed.run --standalone --nproc_per_node"
PEER="benchmarks/hf_trainer.py --gc --steps $S --padfree --liger --fused-adamw"
( export CUDA_VISIBLE_DEVICES=0; row A w3_z2_n1 130 $CVH $W3 --batch 16 --nproc 1 --stage 2 --out /tmp/sc/w3z2n1 ) &
( export CUDA_VISIBLE_DEVICES=1,2; row B w3_z2_n2 130 $CVH $W3 --batch 32 --nproc 2 --stage 2 --out /tmp/sc/w3z2n2 ) &
( export CUDA_VISIBLE_DEVICES=3
  row C w1_sel2_n1 100 $CVH $W1 --batch 32 --nproc 1 --stage 1 --out /tmp/sc/sel2 --set train.checkpoint_every_n_layers=2
  row C peer_w1_n1 120 $TR 1 $PEER --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 16 --ga 2
  row C w1_compile_n1 150 $CVH $W1 --batch 32 --nproc 1 --stage 1 --out /tmp/sc/comp --set train.compile=true ) &
wait
echo "phase 1 done t=$(( $(date +%s) - T0 ))s" >> $LOGS/C.sum
for st in 2 3; do row D w1_z${st}_n4 100 $CVH $W1 --batch 128 --nproc 4 --stage $st --out /tmp/sc/w1z${st}n4; done
row D w3_z2_n4 100 $CVH $W3 --batch 64 --nproc 4 --stage 2 --out /tmp/sc/w3z2n4
row D w3_z3_n4 100 $CVH $W3 --batch 64 --nproc 4 --stage 3 $P3 --out /tmp/sc/w3z3n4
row D peer_w1_z2_n4 110 $TR 4 $PEER --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 16 --ga 2
row D peer_w3_z3_n4 110 $TR 4 $PEER --shape 7b-8l --stage 3 --mode fixed --seq 2048 --mbs 8 --ga 2 --persist 1e8
for l in A B C D; do echo "######## lane $l"; cat $LOGS/$l.sum; done | tee $OUT/summary.txt
tar czf $OUT/full_logs.tgz -C $LOGS .
echo "done t=$(( $(date +%s) - T0 ))s"
