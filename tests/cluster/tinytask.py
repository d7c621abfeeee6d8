"""A tiny, learnable chat task for end-to-end runs, without downloads:

    python tests/cluster/tinytask.py OUT_DIR     # OUT_DIR/tokenizer/ and OUT_DIR/train.jsonl

A character-level ChatML tokenizer that fits the `tiny` shape's 128-token vocabulary, and 128
conversations of one-digit additions (the loss drops within a few steps).
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def make_task(root: Path, samples: int = 128) -> tuple[Path, Path]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = sorted(set(string.ascii_letters + string.digits + " \n+=?.,:"))
    vocab = {t: i for i, t in enumerate(["<unk>", *chars, *specials])}
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=specials)
    fast.chat_template = CHATML
    root.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(root / "tokenizer")
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(samples):
            a, b = rng.randrange(10), rng.randrange(10)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                             {"role": "assistant", "content": str(a + b)}]}) + "\n")
    return root / "tokenizer", root / "train.jsonl"


if __name__ == "__main__":
    print(*make_task(Path(sys.argv[1])))


def tiny_recipe(name: str, tokenizer: Path, *, steps: int, stage: int, run: dict | None = None,
                train: dict | None = None, checkpoint: dict | None = None) -> str:
    """The recipe text every cluster test trains: the tiny model on make_task's data, 8 samples
    per step; `run`/`train`/`checkpoint` add or override keys of those sections."""
    sections = {
        "run": {"name": name, "output_dir": f"runs/{name}", **(run or {})},
        "model": {"path": "tiny", "tokenizer": str(tokenizer)},
        # padded micro-batches of 4 (data.packing = false): what these tests were written and checked for
        "data": {"train_files": ["train.jsonl"], "max_length": 64, "packing": False},
        "train": {"max_steps": steps, "global_batch_size": 8, "micro_batch_size": 4, "lr": 3e-3,
                  "schedule": "constant", **(train or {})},
        "zero": {"stage": stage},
    }
    if checkpoint:
        sections["checkpoint"] = checkpoint
    return "".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                   for section, values in sections.items())

