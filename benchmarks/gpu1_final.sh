#!/usr/bin/env bash
# One H100, issue 13 item 5 and the last levers: every clustertune row is a PLAIN recipe (no packing,
# row size, checkpointing or ZeRO keys: `auto` resolves them) through `clustertune train`:
#   the strongest HF peer on W1 first (it also warms the Triton cache), then W1 with this tree's code
#   and with the tree in $BEFORE (the same recipe one commit earlier: the step-end sync A/B), twice,
#   then the profile of W1's step 13, then W2 and W3 plain.
#   PYTHONPATH=/tmp/site OUT=/tmp/out BEFORE=.snapA bash benchmarks/gpu1_final.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T0=$(date +%s); SUM=$OUT/summary.txt; SITE=${PYTHONPATH:-/tmp/site}
BEFORE=$(cd ${BEFORE:-.snapA} && pwd); HERE=$PWD
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; date -u
row() { local name=$1 lim=$2 tree=$3; shift 3; echo "== $name ($tree) t=$(( $(date +%s) - T0 ))s" >> $SUM
  (cd $tree && PYTHONPATH=$SITE:$tree/src timeout $lim "$@") > $OUT/$name.log 2>&1; echo "rc=$?" >> $SUM
  grep -h "^RESULT\|^FAIL\|auto:" $OUT/$name.log | cut -c1-1500 >> $SUM; grep -m2 -h "Error\|out of memory" $OUT/$name.log | cut -c1-300 >> $SUM; }
CVH="python3 benchmarks/cli_vs_harness.py --steps 15 --cli-only --plain --verbose"
W1="--shape qwen2.5-1.5b --seq 4096 --batch 32"
row peer_w1 150 $HERE python3 -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/hf_trainer.py --gc --steps 15 \
    --padfree --liger --fused-adamw --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 16 --ga 2
row w1_plain_new 100 $HERE $CVH $W1 --out /tmp/f/new1
row w1_plain_before 100 $BEFORE $CVH $W1 --out /tmp/f/old1
row w1_plain_new_again 100 $HERE $CVH $W1 --out /tmp/f/new2
row w1_plain_before_again 100 $BEFORE $CVH $W1 --out /tmp/f/old2
row w1_profile 100 $HERE $CVH $W1 --out /tmp/f/prof --profile
cp /tmp/f/prof/cli_run/profile/*.txt $OUT/ 2>/dev/null
row w2_plain 100 $HERE $CVH --shape qwen2.5-1.5b --mode fixed --seq 2048 --batch 16 --out /tmp/f/w2
row w3_plain 120 $HERE $CVH --shape qwen2.5-7b --layers 8 --mode fixed --seq 2048 --batch 16 --out /tmp/f/w3
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
