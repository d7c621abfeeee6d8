#!/usr/bin/env bash
# Issue 12 on one host with 4 GPUs (one call): DeepSeek-R1-Distill-Qwen-32B at its real width,
#  (a) truncated to the most layers the planner fits with ZeRO-3, no offload, 4096-token packed rows + ckpt;
#  (b) the most layers the planner fits with ZeRO-3 + optimizer offload on this host's RAM (>= 5 steps);
#  then W3 (7B width, 8 layers) ZeRO-3 on 4 GPUs and the HF Trainer peer on 4 GPUs, same samples/GPU/step.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu4_issue12.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; LOGS=/tmp/i12logs; mkdir -p $LOGS
nvidia-smi -L; free -g | head -2
T0=$(date +%s)
row() { local name=$1 lim=$2; shift 2; echo "== $name (limit ${lim}s, t=$(( $(date +%s) - T0 ))s)"
  timeout $lim "$@" > $LOGS/$name.log 2>&1; echo "rc=$?"; grep -h "^RESULT\|HOST-OOM" $LOGS/$name.log | cut -c1-1800
  grep -m3 -h "Error\|out of memory" $LOGS/$name.log | cut -c1-300; tar czf $OUT/logs.tgz -C $LOGS . ; }
TR="python3 -m torch.distributed.run --standalone --nproc_per_node 4 benchmarks/bench_clustertune.py"
LA=$(python3 benchmarks/plan_layers.py --shape deepseek-r1-distill-qwen-32b --world 4 --stage 3 --gc 2>&1 >/dev/stderr | tail -1)
row r32b_a 150 $TR --shape deepseek-r1-distill-qwen-32b --layers $LA --stage 3 --mode var --seq 4096 --batch 24 --budget 4096 --gc --steps 8 --tag 32b-a
row w3z3_n4 75 $TR --shape qwen2.5-7b --layers 8 --stage 3 --mode fixed --seq 2048 --batch 64 --budget 16384 --gc --persist 100000000 --steps 12 --tag w3z3n4
row peer_w3_n4 100 python3 -m deepspeed.launcher.runner --num_gpus 4 --master_port 29613 benchmarks/hf_trainer.py --shape 7b-8l --stage 3 --mode fixed --seq 2048 --mbs 8 --ga 2 --padfree --liger --fused-adamw --gc --steps 12 --persist 1e8
LB=$(python3 benchmarks/plan_layers.py --shape deepseek-r1-distill-qwen-32b --world 4 --stage 3 --offload --gc 2>&1 >/dev/stderr | tail -1)
LEFT=$(( 575 - ( $(date +%s) - T0 ) ))
row r32b_b $LEFT $TR --shape deepseek-r1-distill-qwen-32b --layers $LB --stage 3 --offload --mode var --seq 4096 --batch 24 --budget 4096 --gc --steps 5 --tag 32b-b
echo "done t=$(( $(date +%s) - T0 ))s"
