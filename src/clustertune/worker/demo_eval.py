"""Held-out exact-match accuracy of the demo task, for a fresh model or a trained export:

    python -m clustertune.worker.demo_eval --random-init --seed 42   # before training
    python -m clustertune.worker.demo_eval runs/demo/final            # after: loads the HF export

With --preference (the DPO demo): held-out preference accuracy instead, the share of the held-out
pairs (demo_assets/dpo_heldout.jsonl) whose chosen answer the model gives a higher log-prob than
the rejected one:

    python -m clustertune.worker.demo_eval --preference --random-init --seed 42
    python -m clustertune.worker.demo_eval --preference runs/demo-dpo/final
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clustertune.worker.demo_eval")
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--preference", action="store_true", help="held-out preference accuracy (DPO demo)")
    parser.add_argument("--label", help="what the printed line calls this model (default: before/after training)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clustertune import demo
    torch.manual_seed(args.seed)
    if args.random_init:
        from clustertune.config import ModelSection
        from clustertune.worker.model import build_causal_lm, load_tokenizer
        model = build_causal_lm(ModelSection(path="tiny", attn_implementation="sdpa"), dtype=torch.float32)
        tokenizer = load_tokenizer(ModelSection(path="tiny"))
        label = "before training (random init)"
    elif args.model_dir:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        label = f"after training ({args.model_dir}, loaded with from_pretrained)"
    else:
        parser.error("give a model directory or --random-init")
    model.eval()
    label = args.label or label
    if args.preference:
        accuracy, count = preference_accuracy(model, tokenizer, demo.DEMO_DPO_HELDOUT_FILE)
        print(f"held-out preference accuracy {label}: {100 * accuracy:.1f}% ({count} pairs)", flush=True)
        return 0
    accuracy, triples = demo.exact_match(model, tokenizer, demo.load_heldout())
    print(f"held-out exact match {label}: {100 * accuracy:.1f}% ({len(triples)} prompts)", flush=True)
    for prompt, expected, got in triples[: args.samples]:
        mark = "ok " if got == expected else "BAD"
        print(f"  [{mark}] {prompt!r} -> {got!r} (expected {expected!r})", flush=True)
    return 0


def preference_accuracy(model, tokenizer, path, *, batch_size: int = 64) -> tuple[float, int]:
    """(share of pairs with log p(chosen) > log p(rejected), pairs) for a plain HF causal LM,
    the pairs tokenized by the training pipeline (data/preference.py)."""
    import tempfile

    import torch

    from clustertune.config import DataSection, DpoSection
    from clustertune.data import prepare_dataset
    from clustertune.worker.objectives.dpo import DirectPreferenceOptimization, SegmentLogProbModel

    with tempfile.TemporaryDirectory() as cache_dir:
        pairs = prepare_dataset(DataSection(train_files=[str(path)], max_length=256), tokenizer, seed=0,
                                cache_dir=cache_dir, log=lambda *_: None, objective="dpo").train
    scorer = SegmentLogProbModel(model)
    objective = DirectPreferenceOptimization(packing=False, pad_id=tokenizer.pad_token_id,
                                             dpo=DpoSection(), token_budget=0)
    device = next(model.parameters()).device
    wins = 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            logps = objective.segment_logps(scorer, pairs[start:start + batch_size], device=device).view(-1, 2)
            wins += int((logps[:, 0] > logps[:, 1]).sum())
    return wins / max(1, len(pairs)), len(pairs)


if __name__ == "__main__":
    sys.exit(main())
