"""The embedded demo: what `clustertune train` (no recipe) or `clustertune demo` trains.

A tiny Qwen2-architecture model (the built-in shape "tiny": 2 layers, hidden 128, ~0.3M
parameters, random init) learns to reverse strings of 3-8 random lowercase letters,

    user: "reverse: qwxkz"   ->   assistant: "zkxwq"

on the local CPU with 2 processes (ZeRO-2 over gloo) in 30-90 s of training (800 steps). The
held-out prompts (demo_assets/heldout.jsonl) never occur in train.jsonl, so exact match on them
measures generalisation, not memory: ~0% before training, ~100% after (demo_assets/NOTES.md).

Model path "tiny" and the tokenizer: a built-in shape has no tokenizer of its own. For shape
"tiny" the model loader uses the demo tokenizer, `demo_tokenizer_dir()`: a character-level
Qwen2Tokenizer (byte-level BPE without merges over printable ASCII + newline + tab) whose 128 ids
equal SHAPES["tiny"].vocab_size, with Qwen's ChatML template and special tokens (<|im_end|> is
eos, <|endoftext|> is pad). Being a real Qwen2Tokenizer matters: transformers 5 loads any
tokenizer next to a qwen2 config.json (an HF export) as Qwen2Tokenizer, whatever its
tokenizer_config says, and a tokenizer of another kind comes back changed (spaces and newlines
lost: a trained model then scores 0%).

Imported by the launcher side (config.load_recipe), so torch and transformers are imported only
inside the functions that need a model.

    python -c "from clustertune.demo import demo_recipe_dict; print(demo_recipe_dict())"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEMO_ASSETS: Path = Path(__file__).resolve().parent / "demo_assets"
DEMO_TRAIN_FILE: Path = DEMO_ASSETS / "train.jsonl"
DEMO_HELDOUT_FILE: Path = DEMO_ASSETS / "heldout.jsonl"

DEMO_MAX_NEW_TOKENS = 16  # answers are at most 8 characters + <|im_end|>

# `clustertune demo --objective dpo`: preference pairs of the same task (make_preference_records).
DEMO_DPO_TRAIN_FILE: Path = DEMO_ASSETS / "dpo_train.jsonl"
DEMO_DPO_HELDOUT_FILE: Path = DEMO_ASSETS / "dpo_heldout.jsonl"
DEMO_DPO_TRAIN_PAIRS = 3000  # from the first prompts of train.jsonl


def demo_tokenizer_dir() -> Path:
    """The tokenizer of the built-in "tiny" shape (and so of the demo): load it with
    `AutoTokenizer.from_pretrained(demo_tokenizer_dir())`, offline. The model loader uses it
    whenever model.path is "tiny", and the HF export of such a run ships a copy of it."""
    return DEMO_ASSETS / "tokenizer"


def demo_recipe_dict() -> dict[str, Any]:
    """The demo's recipe tree (validated by config.recipe_from_dict like any TOML recipe).

    2 ranks x micro-batch 16 = global batch 32, no gradient accumulation (padded batches: data.packing
    = false, as measured; packing, the default, is for GPUs). Measured in
    demo_assets/NOTES.md: every seed tried passed 95% held-out exact match between steps 300 and
    600 and ended at 99-100%; 800 steps keep a margin for a run that differs from the experiment
    (data order, init seed, loss normalisation). lr 1e-3: 2e-3 and above stall or plateau on this
    2-layer model, 3e-3 needs twice the steps."""
    return {
        "run": {"name": "demo", "output_dir": "runs/demo"},
        "model": {"path": "tiny"},  # attention "auto": sdpa on CPU, flash varlen for packed rows on GPU
        "data": {"train_files": [str(DEMO_TRAIN_FILE)], "format": "messages", "max_length": 64, "packing": False},
        "train": {
            "max_steps": 800,
            "global_batch_size": 32,
            "micro_batch_size": 16,
            "lr": 1e-3,
            "warmup_steps": 20,
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "seed": 42,
            "precision": "fp32",
            "device": "cpu",
            "log_every": 10,
        },
        "zero": {"stage": 2},
        "checkpoint": {"every_steps": 400, "keep_last": 2},
    }


def corrupt_answer(answer: str, rng: Any) -> str:
    """A wrong answer close to the right one: two letters (one for a 3-letter answer) replaced by
    others, so both sides have the same length: the preference is about correctness alone."""
    import string
    letters = list(answer)
    for position in rng.sample(range(len(letters)), 1 if len(letters) <= 3 else 2):
        letters[position] = rng.choice([c for c in string.ascii_lowercase if c != letters[position]])
    return "".join(letters)


def make_preference_records(pairs: list[tuple[str, str]], *, seed: int) -> list[dict[str, str]]:
    """{"prompt", "chosen": the correct answer, "rejected": a corrupted one} per (prompt, answer);
    deterministic for a seed."""
    import random
    rng = random.Random(f"clustertune-demo-dpo-{seed}")
    return [{"prompt": prompt, "chosen": answer, "rejected": corrupt_answer(answer, rng)} for prompt, answer in pairs]


def preference_asset_texts() -> dict[Path, str]:
    """The DPO demo's data files as they must be on disk (tests/unit/test_demo_assets checks;
    `python -c "from clustertune.demo import write_preference_assets; write_preference_assets()"` writes)."""
    sources = {DEMO_DPO_TRAIN_FILE: load_pairs(DEMO_TRAIN_FILE)[:DEMO_DPO_TRAIN_PAIRS],
               DEMO_DPO_HELDOUT_FILE: load_pairs(DEMO_HELDOUT_FILE)}
    return {path: "".join(json.dumps(r) + "\n" for r in make_preference_records(pairs, seed=i))
            for i, (path, pairs) in enumerate(sources.items())}


def write_preference_assets() -> None:
    for path, text in preference_asset_texts().items():
        path.write_text(text, encoding="utf-8")


def demo_dpo_recipe_dict() -> dict[str, Any]:
    """`clustertune demo --objective dpo`: DPO of the same random-init tiny model on preference
    pairs of the same task (chosen: the reversed letters; rejected: the same with two letters
    wrong), eval on the held-out pairs. Measured with a single-process stand-in (2 x 16 pairs
    per step, fp32): held-out preference accuracy 54% at init, 81% at step 200, 95% at step 500;
    lr 1e-3 or beta 0.1 learn 2-3x slower, beta 1.0 with lr 3e-3 is unstable."""
    tree = demo_recipe_dict()
    tree["run"] = {"name": "demo-dpo", "output_dir": "runs/demo-dpo"}
    tree["data"] = {"train_files": [str(DEMO_DPO_TRAIN_FILE)], "eval_files": [str(DEMO_DPO_HELDOUT_FILE)],
                    "max_length": 64, "packing": False}
    tree["train"].update({"objective": "dpo", "max_steps": 500, "lr": 2e-3})
    tree["dpo"] = {"beta": 0.5}
    tree["checkpoint"] = {"every_steps": 250, "keep_last": 1}
    return tree


DEMO_GRPO_SFT_STEPS = 200  # the short SFT the GRPO demo starts from: ~68% held-out exact match


def demo_grpo_recipe_dict(sft_model_dir: str | Path) -> dict[str, Any]:
    """`clustertune demo --objective grpo`: GRPO with the exact-match reward on the demo task's
    train prompts, from `sft_model_dir` (a short SFT of the tiny model, DEMO_GRPO_SFT_STEPS steps).
    Measured here (2 CPU processes): held-out exact match 68% after the SFT, 85% after 150 GRPO
    steps (47 s); 16 prompts x 8 completions per step; temperature 1.0 samples too few right
    answers from the short SFT (reward 0.01, groups without spread 94%) and lr 3e-4 degraded it."""
    tree = demo_recipe_dict()
    tree["run"] = {"name": "demo-grpo", "output_dir": "runs/demo-grpo"}
    tree["model"] = {"path": str(sft_model_dir), "attn_implementation": "sdpa"}
    tree["train"].update({"objective": "grpo", "max_steps": 150, "global_batch_size": 128, "micro_batch_size": 32,
                          "lr": 1e-4, "warmup_steps": 0, "schedule": "constant"})
    tree["grpo"] = {"group_size": 8, "max_new_tokens": 12, "temperature": 0.7, "rewards": ["exact_match"]}
    # Held-out exact match during training (greedy, the eval_exact_match of metrics.jsonl), the same
    # prompts as the before/after figures of demo_eval.
    tree["data"] = {**tree["data"], "eval_files": [str(DEMO_HELDOUT_FILE)]}
    tree["eval"] = {"every_steps": 50}
    tree["checkpoint"] = {"every_steps": 0}
    return tree


def load_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(user prompt, assistant answer) of each single-turn `messages` line of a JSONL file."""
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            msgs = json.loads(line)["messages"]
            roles = [m["role"] for m in msgs]
            if roles != ["user", "assistant"]:
                raise ValueError(f"{path}:{lineno}: expected one user and one assistant turn, got {roles}")
            pairs.append((msgs[0]["content"], msgs[1]["content"]))
    return pairs


def load_heldout() -> list[tuple[str, str]]:
    """The held-out (prompt, expected answer) pairs; none of the prompts is in train.jsonl."""
    return load_pairs(DEMO_HELDOUT_FILE)


def exact_match(model: Any, tokenizer: Any, pairs: list[tuple[str, str]], *,
                max_new_tokens: int = DEMO_MAX_NEW_TOKENS,
                batch_size: int = 128) -> tuple[float, list[tuple[str, str, str]]]:
    """Greedy-decode each prompt (user turn + generation prompt, ChatML) and compare the answer,
    stripped of surrounding whitespace, with the expected one.

    Returns (accuracy, [(prompt, expected, got), ...]) in the order of `pairs`. Batched with left
    padding; generation stops at the tokenizer's eos (<|im_end|>). `model` is a plain HF causal
    LM (a DeepSpeed engine's `.module` under ZeRO 0-2; under ZeRO-3 gather the parameters first).
    200 prompts take well under a second on one CPU core for the tiny model.
    """
    import torch
    from transformers import GenerationConfig

    if not pairs:
        return 0.0, []
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generated tokens must follow every prompt directly
    results: list[tuple[str, str, str]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True) for prompt, _ in chunk]
                enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(**enc, generation_config=gen_config)
                new_tokens = out[:, enc["input_ids"].shape[1]:]
                for (prompt, expected), ids in zip(chunk, new_tokens):
                    got = tokenizer.decode(ids, skip_special_tokens=True).strip()
                    results.append((prompt, expected, got))
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    correct = sum(expected.strip() == got for _, expected, got in results)
    return correct / len(results), results
