"""Held-out exact-match accuracy of the demo task, for a fresh model or a trained export:

    python -m clustertune.worker.demo_eval --random-init --seed 42   # before training
    python -m clustertune.worker.demo_eval runs/demo/final            # after: loads the HF export
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
    accuracy, triples = demo.exact_match(model, tokenizer, demo.load_heldout())
    print(f"held-out exact match {label}: {100 * accuracy:.1f}% ({len(triples)} prompts)", flush=True)
    for prompt, expected, got in triples[: args.samples]:
        mark = "ok " if got == expected else "BAD"
        print(f"  [{mark}] {prompt!r} -> {got!r} (expected {expected!r})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
