"""Helpers for the data tests: tiny chat tokenizers built in memory (no downloads, no files)
and a JSONL writer.

The tokenizers are character-level: every character is one token and every control token
(`<|im_end|>`, ...) is one token, so a test can write the expected tokens by hand.

    from data_helpers import chatml_tokenizer, r1_tokenizer, write_jsonl
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Qwen2.5's ChatML template (tool-calling branches removed): a default system turn when the
# conversation has none, then `<|im_start|>role\ncontent<|im_end|>\n` per message.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# DeepSeek-R1-Distill's template (tool-calling branches removed). Note what it does to every
# assistant turn: everything up to `</think>` is cut, so the rendering differs from the content.
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

# A Qwen3-like ChatML template that strips the reasoning only from assistant turns *before the
# last user message*: earlier turns render differently once the conversation grows, so rendering
# prefixes of the conversation does not give prefixes of the full rendering.
QWEN3_LIKE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content %}"
    "{%- if message.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
R1_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]


def _char_tokenizer(specials: list[str], unk: str) -> Tokenizer:
    chars = sorted(set(string.printable) | set("éü—…"))
    vocab = {tok: i for i, tok in enumerate([unk, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    # One piece per character (newlines included); added tokens are matched before this runs.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    return tok


def chatml_tokenizer(template: str = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """Qwen-style: ChatML control tokens, `<|endoftext|>` as pad/eos fallback, `<|im_end|>` as eos."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_char_tokenizer(CHATML_SPECIALS, "<unk>"),
        unk_token="<unk>", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = template
    return tok


# Qwen2's pre-tokenizer split, before its byte-level mapping.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bpe_chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen-like byte-level BPE trained on a few strings: multi-character tokens and characters
    split over several byte tokens, to check the mask against real token offsets."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = ["You are a helpful assistant.", "Hello there! How are you?", "The answer is 42.", "system user\n"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=CHATML_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 20, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                      additional_special_tokens=["<|im_start|>"])
    wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def r1_tokenizer() -> PreTrainedTokenizerFast:
    """DeepSeek-R1-Distill-style: bos/eos sentence tokens, `<｜User｜>`/`<｜Assistant｜>` headers."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_char_tokenizer(R1_SPECIALS, "<unk>"),
        unk_token="<unk>", bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
        additional_special_tokens=["<｜User｜>", "<｜Assistant｜>"],
    )
    tok.chat_template = R1_TEMPLATE
    return tok


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One line per record: dicts/lists are JSON-encoded, str and bytes are written verbatim."""
    with path.open("wb") as f:
        for rec in records:
            if isinstance(rec, bytes):
                f.write(rec + b"\n")
            elif isinstance(rec, str):
                f.write(rec.encode() + b"\n")
            else:
                f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
    return path


def chat(*turns: str, system: str | None = None) -> dict:
    """A messages-format record from alternating user/assistant contents."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    messages += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


def write_json_array(path: Path, records: list[Any], indent: int | None = 2) -> Path:
    """The records as one JSON array; pretty-printed (one key per line) unless indent is None."""
    path.write_text(json.dumps(records, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def write_table(path: Path, records: list[dict], kind: str = "parquet") -> Path:
    """The records as a Parquet file, or an Arrow IPC stream (kind "arrow")."""
    import pyarrow as pa
    import pyarrow.ipc
    import pyarrow.parquet

    # One column per key of any record (from_pylist would take the first record's keys only);
    # a record without the key holds null there, as in a real mixed table.
    keys = list(dict.fromkeys(k for r in records for k in r))
    table = pa.Table.from_pydict({k: [r.get(k) for r in records] for k in keys})
    if kind == "parquet":
        pa.parquet.write_table(table, path)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    return path


def write_saved_dataset(directory: Path, records: list[dict], shards: int = 1) -> Path:
    """The directory `datasets.Dataset.save_to_disk` writes, made without `datasets`: Arrow IPC
    stream shards `data-0000i-of-0000n.arrow`, state.json listing them in order, dataset_info.json."""
    directory.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per_shard = -(-len(records) // shards)
    for i, name in enumerate(names):
        write_table(directory / name, records[i * per_shard:(i + 1) * per_shard], kind="arrow")
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0" * 16, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": {}}))
    return directory
