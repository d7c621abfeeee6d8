"""The seed article's approach, as the reference: HF Transformers Trainer + DeepSpeed ZeRO,
padded batches, random-init Qwen2.5-shaped model. Derived from ../shared/gpu/baseline_hf_trainer_deepspeed.py
with three changes so it can be compared step by step: deterministic data (benchmarks/workload.py),
sequential sample order, and an optional initial-weights directory; constant LR for the loss gate.

    python3 -m deepspeed.launcher.runner --num_gpus 1 benchmarks/baseline_hf_trainer.py \
        --shape 1.5b --stage 3 --mode var --seq 4096 --mbs 4 --gc --steps 30
"""
import argparse, json, os, statistics, sys, time

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(__file__), "..", "src"))
from workload import sample_lengths, sample_tokens  # noqa: E402
from clustertune import flops  # noqa: E402  (the project's MFU arithmetic and per-GPU peak table)

SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
    "7b-8l": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=8, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
}

p = argparse.ArgumentParser()
p.add_argument("--shape", default="1.5b"); p.add_argument("--stage", type=int, default=3)
p.add_argument("--mode", default="fixed"); p.add_argument("--seq", type=int, default=2048)
p.add_argument("--mbs", type=int, default=4); p.add_argument("--gc", action="store_true")
p.add_argument("--steps", type=int, default=30); p.add_argument("--init", default=None)
p.add_argument("--lr", type=float, default=1e-5); p.add_argument("--tag", default="")
p.add_argument("--local_rank", type=int, default=0)
a = p.parse_args()


class Data(Dataset):
    def __init__(self, n):
        self.lens = sample_lengths(a.mode, n, a.seq)
    def __len__(self): return len(self.lens)
    def __getitem__(self, i):
        x = sample_tokens(i, self.lens[i])
        return {"input_ids": x, "labels": x.clone()}


def collate(batch):
    L = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), L, dtype=torch.long); lab = torch.full((len(batch), L), -100); att = torch.zeros(len(batch), L, dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"]); ids[i, :n] = b["input_ids"]; lab[i, :n] = b["labels"]; att[i, :n] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


class Clock(TrainerCallback):
    def __init__(self): self.t = []; self.losses = []
    def on_step_end(self, args, state, control, **kw):
        torch.cuda.synchronize(); self.t.append(time.perf_counter())
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs: self.losses.append(logs["loss"])


class SequentialTrainer(Trainer):
    # Benchmark-only: the same sample order as clustertune, for the step-by-step loss gate.
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


ds = {"zero_optimization": {"stage": a.stage, "overlap_comm": True, "contiguous_gradients": True},
      "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
      "gradient_clipping": "auto", "train_batch_size": "auto"}
args = TrainingArguments(output_dir="/tmp/o", per_device_train_batch_size=a.mbs, max_steps=a.steps, logging_steps=1,
                         deepspeed=ds, report_to=[], save_strategy="no", bf16=True, gradient_checkpointing=a.gc,
                         learning_rate=a.lr, lr_scheduler_type="constant", adam_beta2=0.999, weight_decay=0.0,
                         max_grad_norm=1.0, dataloader_num_workers=2, disable_tqdm=True)
if a.init:
    model = Qwen2ForCausalLM.from_pretrained(a.init, dtype=torch.float32, attn_implementation="sdpa")
else:
    cfg = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, **SHAPES[a.shape])
    cfg._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(cfg)
cfg = model.config
data = Data(a.steps * a.mbs + 64)
clock = Clock()
tr = SequentialTrainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[clock])
tr.train()
dt = [b - x for x, b in zip(clock.t[4:], clock.t[5:])]
step = statistics.median(dt)
world = int(os.environ.get("WORLD_SIZE", "1"))
used = data.lens[: a.steps * a.mbs * world]  # every rank takes its own micro-batch of the sequence
real_tok = sum(used) / a.steps  # the whole cluster's real tokens per step
emb = cfg.vocab_size * cfg.hidden_size
n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
n_mat = n_params - emb + (emb if cfg.tie_word_embeddings else 0)
flops_tok = flops.flops_per_token(matmul_params=n_mat, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                                  t_eff=flops.effective_context(used))
tps = real_tok / step
peak = flops.peak_flops_per_gpu(torch.cuda.get_device_name()) or 0.0
if int(os.environ.get("RANK", "0")) == 0:
    print("RESULT " + json.dumps({"impl": "baseline", "tag": a.tag, "shape": a.shape, "stage": a.stage, "mode": a.mode,
          "seq": a.seq, "mbs": a.mbs, "gc": a.gc, "world_size": world, "gpu": torch.cuda.get_device_name(),
          "tokens_per_step": round(real_tok), "step_s": round(step, 4), "tok_per_s": round(tps),
          "tok_per_s_per_gpu": round(tps / world),
          "mfu": round(flops.mfu(cluster_tokens_per_s=tps, flops_per_tok=flops_tok, world_size=world,
                                 peak_flops_per_gpu=peak), 4),
          "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),  # GiB (key kept for old logs' readers)
          "losses": clock.losses[:20]}), flush=True)
