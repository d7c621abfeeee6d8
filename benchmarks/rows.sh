# Sourced by the benchmarks/gpu*.sh call scripts: the call's clock and one way to run a row.
#   OUT (default /tmp/out): what comes back from the GPU machine; LOGS (default $OUT): each row's log;
#   SUM (default $OUT/summary.txt): the call's summary;
#   DEADLINE_S (default 570): no row runs past this many seconds after the call started.
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; LOGS=${LOGS:-$OUT}; mkdir -p "$OUT" "$LOGS"; SUM=${SUM:-$OUT/summary.txt}
T0=$(date +%s); DEADLINE=$(( T0 + ${DEADLINE_S:-570} ))
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader; date -u

# The harness and issue 13's three workloads (the shape flags of bench_clustertune.py and
# cli_vs_harness.py): W1 SFT-like lengths, W2 fixed 2048, W3 the 7B width cut to 8 layers.
HARNESS="python3 benchmarks/bench_clustertune.py --steps 12 --order shuffled --budget 32768"
W1_ARGS="--shape qwen2.5-1.5b --mode var --seq 4096 --batch 32"
W2_ARGS="--shape qwen2.5-1.5b --mode fixed --seq 2048 --batch 16"
W3_ARGS="--shape qwen2.5-7b --layers 8 --mode fixed --seq 2048 --batch 16"

# A `clustertune train` row on issue 13's generated JSONL, speed keys left to "auto" (add --set to fix them).
CLI_PLAIN="python3 benchmarks/cli_vs_harness.py --cli-only --plain --verbose"
# The strongest HF Trainer peer on W1 (padding-free collator + Liger + fused AdamW, 16 x 2 per step).
PEER_W1="python3 -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/hf_trainer.py \
--gc --steps 15 --padfree --liger --fused-adamw --shape 1.5b --stage 2 --mode var --seq 4096 --mbs 16 --ga 2"

# issue13_rows SUMMARY: issue 13's rows that every speed call repeats (ratios only within one call): the
# strongest peer on W1 (it also warms the machine), the loss gate on clustertune's default path, then
# W1, W2 and W3 through `clustertune train` with the speed keys left to "auto".
issue13_rows() { local sum=$1 cli="$CLI_PLAIN --steps 15"
  row_to $sum peer_w1 150 $PEER_W1
  row_to $sum loss_gate 200 python3 benchmarks/loss_gate.py --stage 1 --out /tmp/p/gate
  tail -3 $LOGS/loss_gate.log >> $sum
  row_to $sum w1_plain 80 $cli $W1_ARGS --out /tmp/p/w1a
  row_to $sum w2_plain 80 $cli $W2_ARGS --out /tmp/p/w2
  row_to $sum w3_plain 80 $cli $W3_ARGS --out /tmp/p/w3; }

# gpu_unit_tests SUMMARY TEST_FILE...: the files' tests (their CUDA cases run here), last lines to SUMMARY.
gpu_unit_tests() { local sum=$1; shift
  { timeout 90 python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 || echo "pytest rc=$?"; } | tail -3 >> "$sum"; }

# row_to SUMMARY NAME LIMIT cmd...: cmd under `timeout` (cut to the call's deadline) into
# $LOGS/NAME.log; its RESULT/FAIL lines, start-up line and first errors appended to SUMMARY.
row_to() { local sum=$1 name=$2 lim=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) )); [ $left -lt $lim ] && lim=$left
  [ $lim -lt 20 ] && { echo "== $name skipped (call deadline)" >> "$sum"; return; }
  echo "== $name (limit ${lim}s, t=$(( $(date +%s) - T0 ))s)" >> "$sum"
  timeout $lim "$@" > "$LOGS/$name.log" 2>&1; echo "rc=$?" >> "$sum"
  grep -h "^RESULT\|^FAIL\|^auto:" "$LOGS/$name.log" | cut -c1-2500 >> "$sum"
  grep -h "first step after" "$LOGS/$name.log" | tail -1 | cut -c1-300 >> "$sum"
  grep -v "Backend impl" "$LOGS/$name.log" | grep -m2 "Error\|out of memory" | cut -c1-300 >> "$sum"; }

# harness_table SUMMARY: one line per harness RESULT in SUMMARY (bench_clustertune.py rows).
harness_table() { python3 - "$1" <<'PY'
import json, sys
name = "?"
for line in open(sys.argv[1]):
    if line.startswith("== "): name = line.split()[1]
    if line.startswith("RESULT "):
        r = json.loads(line[7:])
        if "tok_per_s" not in r:  # another script's RESULT (cli_vs_harness.py, loss_gate.py)
            continue
        print(f"{name:18s} {r['tok_per_s']:>7} tok/s ({r['world_size']} GPU)  mfu {r['mfu']:.4f}  peak {r['peak_mem_gb']:5.1f}"
              f"  step {r['step_s']}  {r.get('optimizer', '')}  {r.get('busy', '')}  retries {r.get('alloc_retries')}")
PY
}
