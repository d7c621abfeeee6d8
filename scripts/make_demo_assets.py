"""Generate the embedded demo's assets: a character-level Qwen2 tokenizer and the task data.

    python scripts/make_demo_assets.py                 # (re)write src/clustertune/demo_assets/
    python scripts/make_demo_assets.py --check         # exit 1 if the committed files are stale
    python scripts/make_demo_assets.py --experiment --seeds 0 1 2   # the NOTES.md measurements

Deterministic: the same script writes byte-identical files, so the generated files are committed
and a re-run shows no diff. The task is string reversal ("reverse: qwxkz" -> "zkxwq", 3-8 random
lowercase letters): see demo_assets/NOTES.md for why and for the measurements.

The tokenizer has exactly 128 ids (= shapes.SHAPES["tiny"].vocab_size), one token per character:
    0-94    printable ASCII (space .. ~; space spelled "Ġ" as in every byte-level BPE)
    95, 96  "\\n", "\\t" (spelled "Ċ", "ĉ")
    97-99   <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos: ends each turn), Qwen's ids order
    100-127 <|reserved_N|>, so the vocabulary fills the model's embedding exactly
It is a Qwen2Tokenizer in all but vocabulary size (byte-level BPE, no merges, Qwen's pre-tokenizer),
so it loads the same from this directory and from an exported model directory. The chat template
is Qwen's ChatML without the default system prompt.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "clustertune" / "demo_assets"

VOCAB_SIZE = 128
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
RESERVED = [f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - len(CHARS) - len(SPECIALS))]
# Qwen's pre-tokenizer regex (transformers' Qwen2Tokenizer); with no merges it only decides where
# words split, every byte still becomes its own token.
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _byte_level(char: str) -> str:
    """GPT-2/Qwen byte-level spelling of an ASCII character: printable ones stand for themselves,
    the others (space, newline, tab) are shifted to 256 + their rank among the non-printable
    bytes ("Ġ", "Ċ", "ĉ")."""
    b = ord(char)
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    return char if b in keep else chr(256 + [x for x in range(256) if x not in keep].index(b))


# Qwen2.5-Instruct's ChatML, minus its default system message: a system turn is rendered only
# when the conversation has one. add_generation_prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Task data: sizes and the seed are part of the asset; changing them changes the committed files.
DATA_SEED = 1234
N_TRAIN = 6000
N_HELDOUT = 200
MIN_LETTERS, MAX_LETTERS = 3, 8


def build_tokenizer_files() -> dict[str, str]:
    """{filename: text} of the tokenizer directory.

    A byte-level BPE with no merges, built exactly like transformers' Qwen2Tokenizer (same
    normalizer, pre-tokenizer, decoder), only with a 97-byte alphabet. That matters: for a
    directory whose config.json says model_type "qwen2" (every HF export of the tiny model),
    transformers 5 ignores tokenizer_config's tokenizer_class and rebuilds the tokenizer as
    Qwen2Tokenizer from the vocab; a tokenizer of any other kind would silently change there.
    Characters outside the alphabet are dropped, as Qwen2Tokenizer (unk_token None) does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tokens = [_byte_level(c) for c in CHARS] + SPECIALS + RESERVED
    assert len(tokens) == VOCAB_SIZE and len(set(tokens)) == VOCAB_SIZE
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], dropout=None,
                               unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + RESERVED])
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 2048,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
    }


def _example(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS)))
    return f"reverse: {word}", word[::-1]


def _jsonl(pairs: list[tuple[str, str]]) -> str:
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in pairs]
    return "".join(json.dumps(r) + "\n" for r in rows)


def build_data_files() -> dict[str, str]:
    """Held-out prompts are drawn first and never appear in train; train prompts are unique too."""
    rng = random.Random(DATA_SEED)
    seen: set[str] = set()

    def draw(n: int) -> list[tuple[str, str]]:
        out = []
        while len(out) < n:
            prompt, answer = _example(rng)
            if prompt not in seen:
                seen.add(prompt)
                out.append((prompt, answer))
        return out

    heldout = draw(N_HELDOUT)
    train = draw(N_TRAIN)
    return {"train.jsonl": _jsonl(train), "heldout.jsonl": _jsonl(heldout)}


def all_files() -> dict[str, str]:
    files = {f"tokenizer/{k}": v for k, v in build_tokenizer_files().items()}
    files.update(build_data_files())
    return files


def write(check: bool) -> int:
    stale = []
    for rel, text in all_files().items():
        path = ASSETS / rel
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(rel)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    verb = "stale" if check else "written"
    print(f"{ASSETS}: {len(stale)} file(s) {verb}: {', '.join(stale) or '-'}")
    return 1 if check and stale else 0


# --------------------------------------------------------------------------- the NOTES.md experiment

def experiment(seeds: list[int], steps: int, batch: int, lr: float, warmup: int, ranks: int,
               eval_every: int) -> None:
    """Plain single-process PyTorch stand-in for the demo run: AdamW, warmup + cosine to 10% lr,
    grad clip 1.0, loss on the assistant answer + <|im_end|> only. One thread, and each step's
    timed work is one rank's share (batch/ranks samples) plus the full optimizer step, so the
    seconds printed approximate one rank of the real `ranks`-process run on its own core."""
    import math

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT / "src"))
    from clustertune.demo import DEMO_TRAIN_FILE, demo_tokenizer_dir, exact_match, load_heldout, load_pairs
    from clustertune.shapes import SHAPES

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir())
    heldout = load_heldout()
    encoded = []
    for prompt, answer in load_pairs(DEMO_TRAIN_FILE):
        p = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    tokenize=False)
        p_ids = tok(p, add_special_tokens=False).input_ids
        a_ids = tok(answer + "<|im_end|>", add_special_tokens=False).input_ids
        encoded.append((p_ids + a_ids, [-100] * len(p_ids) + a_ids))
    for seed in seeds:
        torch.manual_seed(seed)
        rng = random.Random(seed)
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa"))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

        def factor(s: int) -> float:
            if s < warmup:
                return (s + 1) / warmup
            t = (s - warmup) / max(1, steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        before, _ = exact_match(model, tok, heldout)
        order, pos, timed, curve = [], 0, 0.0, []
        for step in range(steps):
            if pos + batch > len(order):
                order, pos = list(range(len(encoded))), 0
                rng.shuffle(order)
            idx, pos = order[pos:pos + batch], pos + batch
            per_rank = batch // ranks
            for r in range(ranks):
                rows = [encoded[i] for i in idx[r * per_rank:(r + 1) * per_rank]]
                width = max(len(x) for x, _ in rows)
                ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in rows])
                labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
                mask = (ids != tok.pad_token_id).long()
                t0 = time.perf_counter()
                (model(input_ids=ids, attention_mask=mask, labels=labels).loss / ranks).backward()
                if r == 0:
                    timed += time.perf_counter() - t0
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            timed += time.perf_counter() - t0
            if (step + 1) % eval_every == 0 and step + 1 < steps:
                curve.append((step + 1, exact_match(model, tok, heldout)[0]))
        t0 = time.perf_counter()
        after, samples = exact_match(model, tok, heldout)
        eval_s = time.perf_counter() - t0
        one_by_one, _ = exact_match(model, tok, heldout[:50], batch_size=1)
        batched, _ = exact_match(model, tok, heldout[:50])
        curve.append((steps, after))
        print(json.dumps({"seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup,
                          "before": before, "after": after, "train_s": round(timed, 1),
                          "eval_s": round(eval_s, 2), "batched_eq_single_50": batched == one_by_one,
                          "curve": curve, "misses": [s for s in samples if s[1] != s[2]][:3]}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report files that differ")
    ap.add_argument("--experiment", action="store_true", help="train the tiny model, print accuracy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    if args.experiment:
        experiment(args.seeds, args.steps, args.batch, args.lr, args.warmup, args.ranks, args.eval_every)
        return 0
    return write(args.check)


if __name__ == "__main__":
    sys.exit(main())
