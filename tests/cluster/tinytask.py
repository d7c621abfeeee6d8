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
