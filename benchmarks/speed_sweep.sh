#!/usr/bin/env bash
# Issue 13's levers on one GPU, every clustertune row through `clustertune train` on a JSONL of
# W1's lengths (Qwen2.5-1.5B shape, SFT-like lengths capped at 4096, 32 samples per optimizer
# step, checkpointing), beside the two HF Trainer peers at the same 32 samples per step.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/speed_sweep.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
S=${STEPS:-20}
W1="--shape qwen2.5-1.5b --seq 4096 --batch 32 --gc --steps $S"
row() { local name=$1; shift; echo "== $name"; timeout ${LIMIT:-170} "$@" 2>&1 | grep -E "^RESULT|^FAIL|Error|error" | tail -3; }
row "cli vs harness, ZeRO-2 16k rows" python3 benchmarks/cli_vs_harness.py $W1 --stage 2 --budget 16384 --out /tmp/sw/a
row "cli ZeRO-1 16k rows" python3 benchmarks/cli_vs_harness.py $W1 --stage 1 --budget 16384 --out /tmp/sw/b --cli-only
row "cli ZeRO-1 32k rows" python3 benchmarks/cli_vs_harness.py $W1 --stage 1 --budget 32768 --out /tmp/sw/c --cli-only
row "HF peer: padfree+liger+fused AdamW 16x2" python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 29611 benchmarks/hf_trainer.py --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 16 --ga 2 --padfree --liger --fused-adamw --gc --steps $S
row "HF seed approach: padded 4x8" python3 -m deepspeed.launcher.runner --num_gpus 1 --master_port 29612 benchmarks/hf_trainer.py --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 4 --ga 8 --gc --steps $S
row "cli ZeRO-1 32k rows + compile" python3 benchmarks/cli_vs_harness.py $W1 --stage 1 --budget 32768 --out /tmp/sw/d --cli-only --set train.compile=true
