#!/usr/bin/env bash
# One H100: where W1's step goes (benchmarks/bench_clustertune.py --diagnose: the host's enqueue
# time per step and every synchronizing CUDA call of one step; ZeRO-1 and ZeRO-0), then the loss
# gate of issue 13 (benchmarks/loss_gate.py: `clustertune train` vs the strongest HF peer, same
# init, same samples per step, 20 steps).
#   PYTHONPATH=/tmp/site:$PWD/src OUT=/tmp/out bash benchmarks/gpu1_diag_gate.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT; T0=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; date -u
W1="--shape qwen2.5-1.5b --mode var --seq 4096 --batch 32 --budget 32768 --gc --steps 12 --order shuffled --diagnose"
for st in 1 0; do
  echo "== diag_z$st t=$(( $(date +%s) - T0 ))s" | tee -a $OUT/summary.txt
  timeout 120 python3 benchmarks/bench_clustertune.py $W1 --stage $st > $OUT/diag_z$st.log 2>&1; echo "rc=$?" >> $OUT/summary.txt
  grep -h "^RESULT" $OUT/diag_z$st.log | cut -c1-3000 >> $OUT/summary.txt
done
echo "== loss_gate t=$(( $(date +%s) - T0 ))s" | tee -a $OUT/summary.txt
timeout $(( ${DEADLINE_S:-570} - ($(date +%s) - T0) )) python3 benchmarks/loss_gate.py --out /tmp/gate > $OUT/loss_gate.txt 2>&1
echo "rc=$?" >> $OUT/summary.txt; tail -30 $OUT/loss_gate.txt >> $OUT/summary.txt; cp /tmp/gate/*.log $OUT/ 2>/dev/null
cat $OUT/summary.txt; echo "done t=$(( $(date +%s) - T0 ))s"
