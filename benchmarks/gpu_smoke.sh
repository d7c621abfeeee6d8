#!/usr/bin/env bash
# End-to-end check of the real CLI path on one GPU (not a benchmark): `clustertune train` with
# packing + varlen attention + Liger + ZeRO-3 + eval + checkpoints on a random-init
# Qwen2.5-0.5B shape and the demo data, then `export` (offline, from the checkpoint) and
# `report`, and a from_pretrained load of both exports compared on a probe batch.
#   PYTHONPATH=/tmp/site:$PWD/src bash benchmarks/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_smoke}; RUN=/tmp/gpu_smoke_run
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python3 -m clustertune.cli train --nproc 1 \
  --set 'data.train_files=["src/clustertune/demo_assets/train.jsonl"]' --set data.max_length=64 \
  --set data.packing=true --set data.eval_fraction=0.02 --set model.path=qwen2.5-0.5b \
  --set train.max_steps=40 --set train.global_batch_size=256 --set train.micro_batch_tokens=8192 \
  --set train.lr=5e-4 --set train.warmup_steps=5 --set train.gradient_checkpointing=true \
  --set train.device=cuda --set train.precision=bf16 --set train.log_every=5 \
  --set zero.stage=3 --set eval.every_steps=20 --set eval.generate_samples=2 \
  --set checkpoint.every_steps=20 --set run.output_dir=\"$RUN\" 2>&1 | tr '\r' '\n' | grep -v '^train: ' | tail -25
python3 -m clustertune.cli export "$RUN" --out "$RUN/export"
python3 -m clustertune.cli report "$RUN" | tail -12
python3 - "$RUN" <<'PY'
import json, sys, torch
from transformers import AutoModelForCausalLM
run = sys.argv[1]
a = AutoModelForCausalLM.from_pretrained(f"{run}/final", dtype=torch.float32)
b = AutoModelForCausalLM.from_pretrained(f"{run}/export", dtype=torch.float32)
probe = torch.tensor([[1, 5, 9, 12, 40, 41, 77, 3]])
diff = (a(probe).logits - b(probe).logits).abs().max().item()
m = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
train = [r for r in m if "loss" in r]
evals = [r for r in m if "eval_loss" in r]
print(f"final vs offline export max |logit diff| = {diff:.3g}")
print(f"loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}; tokens/s {train[-1]['tokens_per_s']:.0f} "
      f"({train[-1].get('tokens_per_s_per_gpu', 0):.0f} per GPU); MFU {100*train[-1]['mfu']:.1f}% per GPU; "
      f"peak {train[-1].get('mem_gib', 0):.1f} GiB; evals {[round(e['eval_loss'],3) for e in evals]}")
PY
