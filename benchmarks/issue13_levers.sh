#!/usr/bin/env bash
# Issue 13 on one GPU, one call: every clustertune row through `clustertune train` on a JSONL of
# W1's lengths (Qwen2.5-1.5B shape, SFT-like lengths capped at 4096, 32 samples per optimizer step,
# ZeRO-1), the CLI-vs-harness check, the levers (selective checkpointing, no checkpointing,
# regional compile), and both HF Trainer peers at the same 32 samples per step.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/issue13_levers.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; LOGS=/tmp/i13logs; mkdir -p $LOGS $OUT
S=${STEPS:-15}
W1="--shape qwen2.5-1.5b --seq 4096 --batch 32 --gc --steps $S --stage 1 --verbose"
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
row() { local name=$1 lim=$2; shift 2; echo "== $name (limit ${lim}s, t=$(( $(date +%s) - T0 ))s)"
  timeout $lim "$@" > $LOGS/$name.log 2>&1; echo "rc=$?"; grep -h "^RESULT\|^FAIL" $LOGS/$name.log | cut -c1-900
  grep -m3 -h "Error\|out of memory" $LOGS/$name.log | cut -c1-300; tar czf $OUT/logs.tgz -C $LOGS . ; }
HF="benchmarks/hf_trainer.py --shape 1.5b --stage 2 --mode var --seq 4096 --gc --steps $S"
DSL="python3 -m deepspeed.launcher.runner --num_gpus 1"
row check_32k 170 python3 benchmarks/cli_vs_harness.py $W1 --budget 32768 --out /tmp/i13/a
row sel2_32k 90 python3 benchmarks/cli_vs_harness.py $W1 --budget 32768 --out /tmp/i13/b --cli-only --set train.checkpoint_every_n_layers=2
row nogc_16k 90 python3 benchmarks/cli_vs_harness.py $W1 --budget 16384 --out /tmp/i13/c --cli-only --set train.gradient_checkpointing=false
row peer_strong 100 $DSL --master_port 29611 $HF --mbs 16 --ga 2 --padfree --liger --fused-adamw
row peer_seed 100 $DSL --master_port 29612 $HF --mbs 4 --ga 8
LEFT=$(( 590 - ( $(date +%s) - T0 ) ))
row compile_32k $LEFT python3 benchmarks/cli_vs_harness.py $W1 --budget 32768 --out /tmp/i13/d --cli-only --set train.compile=true
echo "done t=$(( $(date +%s) - T0 ))s"
