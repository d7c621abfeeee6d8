#!/usr/bin/env bash
# Issue 15, item 5, on one GPU in one call (< 9 minutes): DPO and GRPO through the real CLI
# (`python3 -m clustertune.cli train RECIPE --nproc 1`; qwen2.5-0.5b shape, random init, packing,
# Liger, bf16, ZeRO-1) and TRL's DPOTrainer / GRPOTrainer (benchmarks/trl_peer.py) on the same
# data (the bundled demo pairs and prompts), global batch, completions per prompt, max_new_tokens,
# lr, beta and steps. Writes $OUT/summary.txt (a RESULTS.md table), $OUT/results.jsonl (one RESULT
# per row) and $OUT/logs.tgz (row logs, recipes, clustertune metrics).
#
# On the GPU machine (carry .gpuwheels and .gputrl; trl, datasets, dill, multiprocess come from .gputrl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .gpuwheels/*.whl .gputrl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src && bash benchmarks/post_training_gpu.sh
# (the script does that install and export itself: `bash benchmarks/post_training_gpu.sh` is enough).
# On CPU, everything but the GPU parts (tiny shape, 3 steps, no Liger; TRL from TRL_SITE):
#   CPU_DRYRUN=1 TRL_SITE=/tmp/trlsite OUT=/tmp/ptg_out bash benchmarks/post_training_gpu.sh
# Knobs: STEPS_DPO, STEPS_GRPO, MAX_NEW (GRPO max_new_tokens), TRL_WEIGHTS (bf16|fp32), KV_CACHE (clustertune's
# grpo.kv_cache, default static; TRL uses transformers' default dynamic cache), DEADLINE_S.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
T0=$(date +%s)
OUT=${OUT:-/tmp/out}; WORK=${WORK:-/tmp/ptgpu}; LOGS=$WORK/logs
rm -rf "$WORK"; mkdir -p "$LOGS" "$OUT"
DEMO=$PWD/src/clustertune/demo_assets

if [ "${CPU_DRYRUN:-0}" = 1 ]; then
  export DS_ACCELERATOR=cpu PYTHONPATH=${TRL_SITE:-/tmp/trlsite}:$PWD/src
  SHAPE=tiny DEVICE=cpu PRECISION=fp32 LIGER=off TRL_FLAGS="--device cpu"
  STEPS_DPO=${STEPS_DPO:-3} STEPS_GRPO=${STEPS_GRPO:-3} WARMUP=1 MAX_NEW=${MAX_NEW:-16}
  DPO_BATCH=16 DPO_MICRO=16 DPO_TOKENS=4096 GRPO_BATCH=32 GRPO_MICRO=16 GRPO_TOKENS=1024 DEADLINE_S=${DEADLINE_S:-900}
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpuwheels/*.whl .gputrl/*.whl || { echo "FAIL: wheel install (carry .gpuwheels and .gputrl)"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
  SHAPE=qwen2.5-0.5b DEVICE=cuda PRECISION=bf16 LIGER=on TRL_FLAGS="--device cuda --liger --weights ${TRL_WEIGHTS:-bf16}"
  STEPS_DPO=${STEPS_DPO:-20} STEPS_GRPO=${STEPS_GRPO:-15} WARMUP=3 MAX_NEW=${MAX_NEW:-128}
  # DPO: one micro-batch per step on both sides (128 pairs, ~10.5k tokens). GRPO: two (128 completions of
  # up to ~45 + 128 tokens, ~22k): clustertune's DPO/GRPO log-probs hold fp32 logits over the whole
  # 151,936-token vocabulary (worker/model.py token_losses), ~13 GiB per copy at 22k tokens in one row.
  DPO_BATCH=128 DPO_MICRO=128 DPO_TOKENS=16384 GRPO_BATCH=128 GRPO_MICRO=64 GRPO_TOKENS=16384
  DEADLINE_S=${DEADLINE_S:-520}
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
G=8 LR=1e-6 BETA=0.1 MAXLEN=64
date -u; python3 -c "import torch, transformers, trl, datasets, pyarrow, accelerate
print(*(f'{m.__name__} {m.__version__}' for m in (torch, transformers, trl, datasets, pyarrow, accelerate)))"

# The recipe a user would write: the demo data, the shape, packing and Liger, every other key at its default
# except those the TRL side is given too (batch, lr, constant schedule, Adam betas, beta, G, max_new_tokens).
recipe() {  # objective steps batch tokens train_file
  local path=$WORK/$1.toml
  cat > "$path" <<EOF
[run]
name = "ct-$1"
output_dir = "$WORK/runs/ct-$1"

[model]
path = "$SHAPE"
liger = "$LIGER"

[data]
train_files = ["$5"]
max_length = $MAXLEN
packing = true

[train]
objective = "$1"
max_steps = $2
global_batch_size = $3
micro_batch_size = $3
micro_batch_tokens = $4
lr = $LR
schedule = "constant"
adam_beta2 = 0.95
weight_decay = 0.0
grad_clip = 1.0
seed = 42
device = "$DEVICE"
precision = "$PRECISION"
log_every = 1

[zero]
stage = 1

[checkpoint]
every_steps = 0
EOF
  if [ "$1" = dpo ]; then printf '\n[dpo]\nbeta = %s\n' "$BETA" >> "$path"
  else printf '\n[grpo]\ngroup_size = %s\nmax_new_tokens = %s\ntemperature = 1.0\nrewards = ["exact_match"]\n' "$G" "$MAX_NEW" >> "$path"
    [ -n "${KV_CACHE:-}" ] && echo "kv_cache = \"$KV_CACHE\"" >> "$path"; fi
  echo "$path"
}

# row NAME CAP_S CMD...: runs CMD under `timeout min(CAP_S, time left)`, log in $LOGS/NAME.log.
row() {
  local name=$1 cap=$2; shift 2
  local left=$(( DEADLINE_S - ( $(date +%s) - T0 ) ))
  local lim=$(( cap < left ? cap : left ))
  if [ "$lim" -lt 20 ]; then echo "== $name: SKIPPED (${left}s left)"; ROW_RC=skipped ROW_WALL=0; return 1; fi
  echo "== $name (limit ${lim}s, t=$(( $(date +%s) - T0 ))s)"
  local started=$(date +%s)
  timeout "$lim" "$@" > "$LOGS/$name.log" 2>&1
  ROW_RC=$? ROW_WALL=$(( $(date +%s) - started ))
  echo "rc=$ROW_RC wall=${ROW_WALL}s"
  [ "$ROW_RC" = 0 ] || grep -m5 -h "Error\|error:\|out of memory\|Traceback" "$LOGS/$name.log" | cut -c1-300
  return $ROW_RC
}

# keep NAME LOG: the last RESULT line of LOG, with the row's wall time and exit code, into results.jsonl.
keep() {
  grep '^RESULT ' "$2" | tail -1 | cut -c8- | python3 -c "
import json, sys
text = sys.stdin.read().strip()
r = json.loads(text) if text else {'run': '$1'}
r.update(wall_s=$ROW_WALL, rc='$ROW_RC')
print(json.dumps(r))" >> "$WORK/results.jsonl"
  tail -1 "$WORK/results.jsonl" | cut -c1-700
}

clustertune_row() {  # objective steps batch tokens train_file cap
  local cfg; cfg=$(recipe "$1" "$2" "$3" "$4" "$5")
  row "ct-$1" "$6" python3 -m clustertune.cli train "$cfg" --nproc 1
  python3 benchmarks/trl_peer.py --objective "$1" --from-metrics "$WORK/runs/ct-$1/metrics.jsonl" --warmup $WARMUP \
    --label "clustertune-$1" > "$LOGS/ct-$1.result" 2>&1
  keep "clustertune-$1" "$LOGS/ct-$1.result"
}

trl_row() {  # objective cap args...
  local objective=$1 cap=$2; shift 2
  row "trl-$objective" "$cap" python3 benchmarks/trl_peer.py --objective "$objective" --shape "$SHAPE" $TRL_FLAGS \
    --warmup $WARMUP --lr $LR --max-length $MAXLEN --out "$WORK/trl-$objective" "$@"
  keep "trl-$objective" "$LOGS/trl-$objective.log"
}

clustertune_row dpo "$STEPS_DPO" $DPO_BATCH $DPO_TOKENS "$DEMO/dpo_train.jsonl" 130
[ "${SKIP_TRL:-0}" = 1 ] || trl_row dpo 110 --steps "$STEPS_DPO" --global-batch $DPO_BATCH --micro-batch $DPO_MICRO --beta $BETA
clustertune_row grpo "$STEPS_GRPO" $GRPO_BATCH $GRPO_TOKENS "$DEMO/train.jsonl" 150
[ "${SKIP_TRL:-0}" = 1 ] || trl_row grpo 150 --steps "$STEPS_GRPO" --global-batch $GRPO_BATCH --micro-batch $GRPO_MICRO --group-size $G \
  --max-new-tokens $MAX_NEW

{ echo "post_training_gpu.sh $(date -u +%FT%TZ) shape=$SHAPE device=$DEVICE steps dpo=$STEPS_DPO grpo=$STEPS_GRPO" \
       "batch dpo=$DPO_BATCH pairs grpo=$GRPO_BATCH completions (G=$G, max_new_tokens=$MAX_NEW) lr=$LR beta=$BETA" \
       "warmup steps left out=$WARMUP"
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name --format=csv,noheader
  python3 benchmarks/trl_peer.py --table "$WORK/results.jsonl"
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
cp "$WORK/results.jsonl" "$OUT/results.jsonl"
cp "$WORK"/*.toml "$LOGS"/ 2>/dev/null
for r in "$WORK"/runs/*/; do n=$(basename "$r"); cp "$r/metrics.jsonl" "$LOGS/$n.metrics.jsonl" 2>/dev/null; done
tar czf "$OUT/logs.tgz" -C "$LOGS" .
echo "done t=$(( $(date +%s) - T0 ))s"
