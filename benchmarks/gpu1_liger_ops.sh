#!/usr/bin/env bash
# One H100: which of Liger's layer kernels pay on W1 (harness, ZeRO-0, full checkpointing, 32k rows):
# the trace of the W1 step (benchmarks/trace_gaps.py) charged most GPU idle to the host's launches of
# Liger's RoPE and RMSNorm Triton kernels. All three / no RoPE / SwiGLU only / none / none with
# train.compile, then all three and no RoPE again; the fused loss stays in every run.
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_liger_ops.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T0=$(date +%s); SUM=$OUT/summary.txt
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; date -u
H="python3 benchmarks/bench_clustertune.py --shape qwen2.5-1.5b --mode var --seq 4096 --batch 32 --budget 32768 --gc --steps 12 --order shuffled --stage 0"
# NAME:KERNELS[:compile] -- compile: train.compile (attention and MLP blocks; inductor fuses what Liger did)
for case in "warmup:rope,rms_norm,swiglu" "all:rope,rms_norm,swiglu" "no_rope:rms_norm,swiglu" "swiglu_only:swiglu" \
            "none:" "none_compiled::compile" "all_again:rope,rms_norm,swiglu" "no_rope_again:rms_norm,swiglu"; do
  name=${case%%:*}; rest=${case#*:}; ops=${rest%%:*}; extra=(); [ "${rest#*:}" = compile ] && extra=(--compile)
  echo "== $name ($ops ${extra[*]}) t=$(( $(date +%s) - T0 ))s" >> $SUM
  timeout 150 $H --liger-layer-kernels "$ops" "${extra[@]}" > $OUT/$name.log 2>&1; echo "rc=$?" >> $SUM
  grep -h "^RESULT" $OUT/$name.log | python3 -c "import json,sys; r=json.loads(sys.stdin.read()[7:]); print({k: r[k] for k in ('tok_per_s','mfu','peak_mem_gb','step_s','liger_layer_kernels')})" >> $SUM 2>&1
  grep -m2 -h "Error\|out of memory" $OUT/$name.log | cut -c1-300 >> $SUM
done
cat $SUM; echo "done t=$(( $(date +%s) - T0 ))s"
