"""TRL's DPOTrainer and GRPOTrainer on clustertune's post-training work (issue 15, item 5): the
bundled demo data, a random-init built-in shape, the same global batch, completions per prompt,
max_new_tokens, lr, beta, optimizer settings and steps as the clustertune recipe that
benchmarks/post_training_gpu.sh writes. Prints one `RESULT {json}` line.

    # TRL side (GPU; trl, datasets, dill, multiprocess from .gputrl/, liger from .gpuwheels/):
    python3 benchmarks/trl_peer.py --objective dpo --shape qwen2.5-0.5b --steps 20 --global-batch 128 \
        --micro-batch 128 --lr 1e-6 --beta 0.1 --liger
    python3 benchmarks/trl_peer.py --objective grpo --shape qwen2.5-0.5b --steps 15 --global-batch 128 \
        --micro-batch 64 --group-size 8 --max-new-tokens 128 --lr 1e-6 --liger
    # CPU smoke test (tiny shape, fp32):
    python3 benchmarks/trl_peer.py --objective grpo --device cpu --shape tiny --steps 2 --global-batch 16 \
        --micro-batch 8 --max-new-tokens 8
    # clustertune side: the same RESULT fields from a run's metrics.jsonl (no TRL needed)
    python3 benchmarks/trl_peer.py --objective grpo --from-metrics runs/x/metrics.jsonl --warmup 3
    # a table of RESULT objects (one JSON per line), clustertune over TRL per objective
    python3 benchmarks/trl_peer.py --table results.jsonl

TRL set-up, the strongest a user would reasonably pick on one GPU without vLLM (TRL 1.16):
- DPO: precompute_ref_log_probs (the reference model is not kept beside the policy, as in
  clustertune's reference stage), use_liger_kernel (Liger's layer kernels; TRL's own chunked
  "fused LM head" computes the log-probs), sdpa attention. padding_free is requested but TRL 1.16
  turns it off with a warning ("temporarily unavailable after a refactor"): the RESULT says so.
- GRPO: HF generate on the training model (TRL's default path), loss_type "dapo" (token-level,
  like clustertune), beta 0 (no reference model), scale_rewards "group", one update per
  generation (steps_per_generation = gradient accumulation, num_iterations 1), use_liger_kernel.
- Both: gradient checkpointing off (TRL's default is on; clustertune's recipe has it off),
  constant lr, AdamW betas (0.9, 0.95), weight decay 0, grad clip 1.0, bf16 on GPU.
  --weights bf16 (default) builds the model in bf16, as TRL's dtype="auto" loads a Qwen2.5
  checkpoint (pure-bf16 AdamW); --weights fp32 keeps fp32 weights under bf16 autocast (the
  numerics of clustertune's bf16 run with fp32 master weights).

Measured per optimizer step (TrainerCallback, CUDA-synchronized): the whole step, from
on_step_begin to on_step_end (for GRPO it holds the rollout), and for GRPO the time inside the
model's generate (a Qwen2ForCausalLM subclass times its own `generate`; TRL's decode and reward
calls, a few ms, count as training). Tokens per step: prompt + completion tokens of every
sequence (chosen and rejected each with its prompt for DPO), TRL's own `num_tokens` log, the same
definition as clustertune's metrics "tokens". The first --warmup steps are left out of the
medians and rates.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from clustertune.demo import DEMO_DPO_TRAIN_FILE, DEMO_TRAIN_FILE, demo_tokenizer_dir, load_pairs  # noqa: E402
from clustertune.rewards import load_reward  # noqa: E402
from clustertune.shapes import SHAPES  # noqa: E402

GIB = 1024 ** 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=["dpo", "grpo"])
    p.add_argument("--table", default=None, help="print a table of the RESULT objects in this JSONL file and exit")
    p.add_argument("--from-metrics", default=None,
                   help="summarize a clustertune run's metrics.jsonl into the same RESULT fields instead of training")
    p.add_argument("--label", default=None, help="the RESULT's 'run' name (default: trl-OBJECTIVE)")
    p.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers of the shape")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--weights", choices=["bf16", "fp32"], default="bf16",
                   help="GPU only: the model's parameter dtype under bf16 training (see the docstring)")
    p.add_argument("--liger", action="store_true", help="use_liger_kernel=True (GPU)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the medians and rates")
    p.add_argument("--global-batch", type=int, default=128,
                   help="pairs per optimizer step (DPO) or completions per step (GRPO), as train.global_batch_size")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="per_device_train_batch_size (default: the global batch, no accumulation)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--max-length", type=int, default=64, help="DPO max_length (data.max_length)")
    p.add_argument("--group-size", type=int, default=8, help="GRPO completions per prompt (grpo.group_size)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="GRPO max_completion_length (grpo.max_new_tokens)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reward", default="exact_match", help="a clustertune.rewards name or module:function")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="/tmp/trl_peer", help="TRL's output_dir (nothing is saved there)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- the shared summary

def summarize(steps: list[dict], *, warmup: int) -> dict:
    """RESULT fields from per-step records {step_s, generation_s, tokens, loss}: medians and rates
    over the steps after `warmup` (all steps when there are no more). step_s is the whole
    optimizer step including any rollout; train = step - generation."""
    measured = steps[warmup:] if len(steps) > warmup else steps
    step_s = sum(s["step_s"] for s in measured)
    gen_s = sum(s["generation_s"] for s in measured)
    tokens = sum(s["tokens"] for s in measured)
    return {
        "steps": len(steps), "measured_steps": len(measured),
        "tokens_per_step": round(tokens / max(1, len(measured)), 1),
        "step_time_s": round(statistics.median(s["step_s"] for s in measured), 4),
        "generation_time_s": round(statistics.median(s["generation_s"] for s in measured), 4),
        "generation_share": round(gen_s / step_s, 4) if step_s else None,
        "tokens_per_s": round(tokens / step_s, 1) if step_s else None,  # end to end (rollout included)
        "train_tokens_per_s": round(tokens / (step_s - gen_s), 1) if step_s > gen_s else None,
        "losses": [None if s["loss"] is None else round(s["loss"], 5) for s in steps],
    }


def clustertune_result(metrics_path: Path, *, objective: str, warmup: int, label: str) -> dict:
    """The RESULT of a clustertune run from its metrics.jsonl (train.log_every = 1). clustertune's
    step_time_s is the training part; GRPO logs its rollout apart as generation_time_s."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.startswith("{")]
    records = [r for r in records if "step" in r and "step_time_s" in r]
    if not records:
        raise SystemExit(f"{metrics_path}: no step records")
    steps = [{"step_s": r["step_time_s"] + r.get("generation_time_s", 0.0),
              "generation_s": r.get("generation_time_s", 0.0), "tokens": r["tokens"], "loss": r["loss"]}
             for r in records]
    peaks = [r["mem_gib"] for r in records if "mem_gib" in r]  # logged on GPU only
    extra = {k: records[-1][k] for k in ("pref_accuracy", "reward_mean", "completion_len_mean") if k in records[-1]}
    return {"run": label, "objective": objective, **summarize(steps, warmup=warmup),
            "peak_gib": round(max(peaks), 2) if peaks else None, "last": extra}


# --------------------------------------------------------------------------- the TRL side

def demo_dpo_dataset():
    """The DPO demo pairs, conversational (the chat template is applied, as clustertune does)."""
    from datasets import Dataset
    rows = [json.loads(line) for line in DEMO_DPO_TRAIN_FILE.read_text().splitlines() if line.strip()]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


def demo_grpo_dataset():
    """The demo task's prompts with their reference answers (what clustertune's GRPO reads from train.jsonl)."""
    from datasets import Dataset
    return Dataset.from_list([{"prompt": [{"role": "user", "content": prompt}], "answer": answer}
                              for prompt, answer in load_pairs(DEMO_TRAIN_FILE)])


def trl_reward(spec: str):
    """A clustertune reward (completion text, answer) -> float as a TRL reward function."""
    reward = load_reward(spec)

    def score(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [reward(text, ans) for text, ans in zip(texts, answer)]

    score.__name__ = spec.replace(":", "_")
    return score


def build_model(a: argparse.Namespace, torch, generation_timer: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    class TimedGenerateQwen2(Qwen2ForCausalLM):
        """Qwen2ForCausalLM whose generate() adds its wall time to generation_timer["s"]."""

        def generate(self, *args, **kwargs):
            if a.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = super().generate(*args, **kwargs)
            if a.device == "cuda":
                torch.cuda.synchronize()
            generation_timer["s"] += time.perf_counter() - started
            return out

    config = Qwen2Config(**SHAPES[a.shape].hf_config_dict())
    if a.layers:
        config.num_hidden_layers = a.layers
    config._attn_implementation = "sdpa"  # flash_attn is not installed on the GPU image
    torch.manual_seed(a.seed)
    dtype = torch.bfloat16 if a.device == "cuda" and a.weights == "bf16" else torch.float32
    with torch.device(a.device):  # random init on the device: seconds, not a CPU init of 0.5B weights
        model = TimedGenerateQwen2(config).to(dtype)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak reported is training's, not the fp32 init's
    return model


def common_args(a: argparse.Namespace, micro: int) -> dict:
    on_gpu = a.device == "cuda"
    return dict(
        output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=a.global_batch // micro, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=on_gpu, use_cpu=not on_gpu, use_liger_kernel=a.liger,
        logging_steps=1, report_to="none", save_strategy="no", seed=a.seed, data_seed=a.seed,
        dataloader_num_workers=0, disable_tqdm=True)


def run_trl(a: argparse.Namespace) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    datasets.disable_progress_bars()
    micro = a.micro_batch or a.global_batch
    if a.global_batch % micro:
        raise SystemExit(f"--global-batch {a.global_batch} is not a multiple of --micro-batch {micro}")
    on_gpu = a.device == "cuda"
    generation_timer = {"s": 0.0}
    model = build_model(a, torch, generation_timer)
    tokenizer = AutoTokenizer.from_pretrained(str(demo_tokenizer_dir()))
    records: list[dict] = []

    class StepTimer(TrainerCallback):
        """Per optimizer step: wall time, generation time inside it, tokens and loss from TRL's log."""

        def _sync(self):
            if on_gpu:
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self.started, self.gen_before = time.perf_counter(), generation_timer["s"]

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            records.append({"step_s": time.perf_counter() - self.started,
                            "generation_s": generation_timer["s"] - self.gen_before, "loss": None, "tokens": None})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if records and logs and "loss" in logs:
                records[-1]["loss"] = float(logs["loss"])
                records[-1]["num_tokens"] = float(logs.get("num_tokens", float("nan")))

    setup_started = time.perf_counter()
    if a.objective == "dpo":
        from trl import DPOConfig, DPOTrainer
        config = DPOConfig(**common_args(a, micro), beta=a.beta, loss_type=["sigmoid"], max_length=a.max_length,
                           precompute_ref_log_probs=True, precompute_ref_batch_size=micro, padding_free=True)
        trainer = DPOTrainer(model=model, args=config, train_dataset=demo_dpo_dataset(), processing_class=tokenizer,
                             callbacks=[StepTimer()])
        setup_notes = {"padding_free_effective": bool(getattr(trainer, "padding_free", False)),
                       "precompute_ref_log_probs": True}
    else:
        from trl import GRPOConfig, GRPOTrainer
        if a.global_batch % a.group_size:
            raise SystemExit(f"--global-batch {a.global_batch} is not a multiple of --group-size {a.group_size}")
        config = GRPOConfig(**common_args(a, micro), num_generations=a.group_size,
                            max_completion_length=a.max_new_tokens, temperature=a.temperature, top_p=1.0, top_k=0,
                            beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1)
        trainer = GRPOTrainer(model=model, args=config, train_dataset=demo_grpo_dataset(), processing_class=tokenizer,
                              reward_funcs=[trl_reward(a.reward)], callbacks=[StepTimer()])
        setup_notes = {"generation": "transformers generate (TRL default, no vLLM)"}
    setup_s = time.perf_counter() - setup_started
    train_started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_started

    # num_tokens in TRL's log is cumulative: per-step tokens are its differences.
    seen = 0.0
    for r in records:
        total = r.pop("num_tokens", float("nan"))
        r["tokens"] = total - seen
        seen = total
    import trl
    import transformers
    return {"run": a.label or f"trl-{a.objective}", "objective": a.objective, **summarize(records, warmup=a.warmup),
            "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if on_gpu else None,
            "setup_s": round(setup_s, 1), "train_s": round(train_s, 1),
            "shape": a.shape, "layers": a.layers or SHAPES[a.shape].num_hidden_layers, "device": a.device,
            "weights": a.weights if on_gpu else "fp32", "liger": a.liger, "global_batch": a.global_batch,
            "micro_batch": micro, "lr": a.lr, **({"beta": a.beta} if a.objective == "dpo" else
                                                 {"group_size": a.group_size, "max_new_tokens": a.max_new_tokens}),
            "optim": getattr(trainer.args.optim, "value", str(trainer.args.optim)),
            "attn": model.config._attn_implementation,
            "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__, **setup_notes}


def table(results: list[dict]) -> str:
    """Markdown rows for RESULTS.md, and each objective's clustertune/TRL ratio of end-to-end tokens/s."""
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    lines = ["| run | tokens/s (whole step) | tokens/s (training part) | step s (median) | generation share | "
             "tokens/step | peak GiB | loss first -> last | row wall s | rc |", "|---" * 10 + "|"]
    for r in results:
        losses = [x for x in r.get("losses", []) if x is not None]
        lines.append(f"| {r['run']} | {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('train_tokens_per_s'), ',.0f')} | "
                     f"{fmt(r.get('step_time_s'), '.3f')} | {fmt(r.get('generation_share'), '.1%')} | "
                     f"{fmt(r.get('tokens_per_step'), ',.0f')} | {fmt(r.get('peak_gib'), '.1f')} | "
                     f"{fmt(losses[0] if losses else None, '.4f')} -> {fmt(losses[-1] if losses else None, '.4f')} | "
                     f"{fmt(r.get('wall_s'), '.0f')} | {r.get('rc', '-')} |")
    for objective in ("dpo", "grpo"):
        ours = [r for r in results if r.get("objective") == objective and r["run"].startswith("clustertune")]
        peer = [r for r in results if r.get("objective") == objective and r["run"].startswith("trl")]
        if ours and peer and ours[0].get("tokens_per_s") and peer[0].get("tokens_per_s"):
            lines.append(f"{objective}: clustertune / TRL tokens/s (whole step) = "
                         f"{ours[0]['tokens_per_s'] / peer[0]['tokens_per_s']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.table:
        print(table([json.loads(line) for line in Path(a.table).read_text().splitlines() if line.strip()]))
        return
    if a.objective is None:
        raise SystemExit("--objective is required (unless --table)")
    if a.from_metrics:
        result = clustertune_result(Path(a.from_metrics), objective=a.objective, warmup=a.warmup,
                                    label=a.label or f"clustertune-{a.objective}")
    else:
        result = run_trl(a)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
