"""Preference pairs for train.objective = "dpo": records -> validated (prompt, chosen, rejected)
conversations -> tokenized PreferencePair samples, cached and split like SFT data.

    prepared = prepare_preference_dataset(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=cache_dir)

Record shapes (one per JSONL line, JSON array element or table row; detected per record):

    {"prompt": "...", "chosen": "...", "rejected": "..."}                  # strings: one user turn, one answer
    {"prompt": [messages...], "chosen": [assistant messages...], "rejected": [...]}
    {"messages": [messages...], "chosen": ..., "rejected": ...}            # the prompt as a conversation
    {"chosen": [full conversation], "rejected": [full conversation]}       # shared prefix = the prompt

A prompt given as messages ends with a user turn (a system turn may only come first); a
completion given as a string is one assistant turn, as a list it holds assistant turns only. In
the last shape the longest common prefix of the two conversations is the prompt, and what follows
it in each must be assistant turns. Metadata keys (id, source, meta, metadata) are allowed; any
other key is an error, as for SFT records.

Tokenizing: prompt + chosen and prompt + rejected are rendered with the model's chat template
(data/chat.py); only the completion's assistant turns carry targets, so the DPO log-probs sum
over exactly the completion tokens (and each turn's end-of-turn token). A pair is kept only when
both of its sequences survive the length policy (data.max_length, data.overlength).

Imports no torch: the launcher side validates pair files with check_preference_records.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clustertune.data import cache
from clustertune.data.chat import ChatEncoder, Rendered, fit
from clustertune.data.prepare import (
    FileProblem, Log, _paths, _progress, _read_all, _skip_or_raise, _split_and_shuffle, load_or_tokenize)
from clustertune.data.records import (
    METADATA_KEYS, Message, Problem, Record, RecordError, _json_type, _message, _no_unknown_keys, _text)
from clustertune.data.types import DataError, DataReport, PreferencePair, PreparedData

if TYPE_CHECKING:
    from clustertune.config import DataSection

PAIR_KEYS = frozenset({"prompt", "messages", "chosen", "rejected"})


@dataclass(frozen=True)
class PairRecord:
    prompt: list[Message]  # ends with a user turn
    chosen: list[Message]  # assistant turns only
    rejected: list[Message]

    def conversations(self) -> tuple[list[Message], list[Message]]:
        return self.prompt + self.chosen, self.prompt + self.rejected


# ---------------------------------------------------------------------------------- records

def record_to_pair(obj: dict[str, Any]) -> PairRecord:
    """One JSON object -> a validated preference pair (RecordError naming the field if not)."""
    _no_unknown_keys(obj, PAIR_KEYS | METADATA_KEYS, "")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise RecordError("missing field", f"no '{key}' field (a preference pair needs 'chosen' and 'rejected')")
    if "prompt" in obj and "messages" in obj:
        raise RecordError("unknown key", "both 'prompt' and 'messages': give the prompt once")
    prompt_key = "prompt" if "prompt" in obj else "messages" if "messages" in obj else None
    if prompt_key is None:
        return _pair_from_conversations(obj["chosen"], obj["rejected"])
    prompt = _prompt(obj[prompt_key], prompt_key)
    chosen, rejected = _completion(obj["chosen"], "chosen"), _completion(obj["rejected"], "rejected")
    if chosen == rejected:
        raise RecordError("identical pair", "'chosen' and 'rejected' are the same completion")
    return PairRecord(prompt, chosen, rejected)


def _prompt(value: Any, key: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, key)}]
    if not isinstance(value, list):
        raise RecordError("wrong type", f"'{key}' must be a string or an array of messages, got {_json_type(value)}")
    if not value:
        raise RecordError("empty content", f"'{key}' is an empty array")
    messages = [_message(m, f"{key}[{i}]") for i, m in enumerate(value)]
    _check_prompt(messages, key)
    return messages


def _check_prompt(messages: list[Message], key: str) -> None:
    for i, message in enumerate(messages[1:], 1):
        if message["role"] == "system":
            raise RecordError("misplaced system message",
                              f"{key}[{i}] is a system message; only the first message may be one")
    if messages[-1]["role"] != "user":
        raise RecordError("bad prompt", f"the prompt ({key}) must end with a user message, "
                          f"it ends with a {messages[-1]['role']} message")


def _completion(value: Any, key: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, key)}]
    if isinstance(value, dict):  # a single message object
        value = [value]
    if not isinstance(value, list):
        raise RecordError("wrong type", f"'{key}' must be a string or an array of assistant messages, "
                          f"got {_json_type(value)}")
    if not value:
        raise RecordError("empty content", f"'{key}' is an empty array")
    messages = [_message(m, f"{key}[{i}]") for i, m in enumerate(value)]
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise RecordError("bad completion", f"{key}[{i}] is a {message['role']} message; with a separate "
                              "prompt, 'chosen' and 'rejected' hold assistant messages only")
    return messages


def _pair_from_conversations(chosen: Any, rejected: Any) -> PairRecord:
    """{"chosen": [conversation], "rejected": [conversation]}: the shared prefix is the prompt."""
    conversations = []
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise RecordError("missing field", f"no 'prompt' (or 'messages') field, and '{key}' is "
                              f"{_json_type(value)}: without a prompt, 'chosen' and 'rejected' must be whole "
                              "conversations (arrays of messages) that share the prompt")
        if not value:
            raise RecordError("empty content", f"'{key}' is an empty array")
        conversations.append([_message(m, f"{key}[{i}]") for i, m in enumerate(value)])
    first, second = conversations
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    if shared == len(first) and shared == len(second):
        raise RecordError("identical pair", "'chosen' and 'rejected' are the same conversation")
    while shared > 0 and first[shared - 1]["role"] == "assistant":  # a shared first answer turn is completion
        shared -= 1
    if shared == 0:
        raise RecordError("bad prompt", "'chosen' and 'rejected' share no prompt: their first messages differ "
                          "(give a 'prompt' field, or conversations that start with the same user turn)")
    prompt = first[:shared]
    _check_prompt(prompt, "chosen")
    for key, conversation in (("chosen", first), ("rejected", second)):
        for i, message in enumerate(conversation[shared:], shared):
            if message["role"] != "assistant":
                raise RecordError("bad completion", f"{key}[{i}] is a {message['role']} message after the shared "
                                  "prompt; only assistant messages may follow it")
        if len(conversation) == shared:
            raise RecordError("bad completion", f"'{key}' has no assistant message after the shared prompt")
    return PairRecord(prompt, first[shared:], second[shared:])


# ---------------------------------------------------------------------------------- files

def check_preference_records(data: DataSection) -> DataReport:
    """Read and validate every pair record, without a tokenizer (the launcher's check): raises
    the DataError training would, every bad record as file:line."""
    files = _paths(data.train_paths, "data.train_files") + _paths(data.eval_files, "data.eval_files")
    report = DataReport(files=[str(p) for p in files])
    _read_all(files, data, report, record_to_pair)
    return report


def prepare_preference_dataset(data: DataSection, tokenizer: Any, *, seed: int, cache_dir: Path,
                               log: Log = print) -> PreparedData:
    """Like prepare_dataset (cache, eval split, file weights, seeded shuffle), with PreferencePair
    samples: identical on every process for the same inputs and seed."""
    # The cache holds each pair as two consecutive samples (chosen, rejected).
    train_files, eval_files, tokenized, hit = load_or_tokenize(
        data, tokenizer, cache_dir=cache_dir, tokenize=_tokenize_pair_files, what="preference pairs", log=log,
        extra_settings={"objective": "dpo"})
    paired = cache.Tokenized(_pairs(tokenized.train), _pairs(tokenized.eval), tokenized.report,
                             train_counts=[n // 2 for n in tokenized.train_counts])
    prepared = _split_and_shuffle(paired, eval_fraction=data.eval_fraction, seed=seed,  # type: ignore[arg-type]
                                  weights=data.train_weights, names=[str(p) for p in train_files])
    prepared.report.files = [str(p) for p in train_files + eval_files]
    prepared.report.cache_hit = hit
    log(prepared.report.summary().replace(" samples", " pairs"))
    if not prepared.train:
        raise DataError("no usable preference pairs left after filtering, from "
                        + ", ".join(map(str, train_files)) + ":\n" + prepared.report.summary())
    return prepared


def _pairs(samples: list[Any]) -> list[PreferencePair]:
    return [PreferencePair(c, r) for c, r in zip(samples[::2], samples[1::2], strict=True)]


def _tokenize_pair_files(data: DataSection, encoder: ChatEncoder, train_files: list[Path], eval_files: list[Path],
                         log: Log) -> cache.Tokenized:
    report = DataReport(files=[])
    records = _read_all(train_files + eval_files, data, report, record_to_pair)
    total = sum(len(r) for _, r in records)
    log(f"data: tokenizing {total} preference pairs from {len(train_files) + len(eval_files)} file(s)")
    problems: list[FileProblem] = []
    with _progress(total) as bar:
        per_file = [_tokenize_pairs(path, file_records, data, encoder, report, problems, bar)
                    for path, file_records in records]
    _skip_or_raise(problems, report, data.skip_invalid)
    report.valid -= len(problems)
    train, evals = per_file[:len(train_files)], per_file[len(train_files):]
    return cache.Tokenized([s for f in train for s in f], [s for f in evals for s in f], report,
                           train_counts=[len(f) for f in train])


def _tokenize_pairs(path: Path, records: list[Record], data: DataSection, encoder: ChatEncoder,
                    report: DataReport, problems: list[FileProblem], bar: Any) -> list[Any]:
    """A file's kept pairs as consecutive (chosen, rejected) samples, in file order."""
    out: list[Any] = []
    fates: Counter[str] = Counter()
    for record in records:
        pair: PairRecord = record.messages  # type: ignore[assignment]
        try:
            rendered = [_completion_only(encoder.render(conversation), len(completion))
                        for conversation, completion in zip(pair.conversations(), (pair.chosen, pair.rejected))]
        except RecordError as err:
            problems.append((path, Problem(record.where, err.kind, err.detail)))
            bar.update(1)
            continue
        report.altered_turns += sum(r.altered for r in rendered)
        fitted = [fit(ids, ranges, max_length=data.max_length, overlength=data.overlength)
                  for ids, ranges in encoder.encode(rendered, max_length=data.max_length)]
        (chosen, chosen_fate), (rejected, rejected_fate) = fitted
        if chosen is None or rejected is None:
            fates[chosen_fate if chosen is None else rejected_fate] += 1
        else:
            fates["truncated" if "truncated" in (chosen_fate, rejected_fate) else "kept"] += 1
            out += [chosen, rejected]
        bar.update(1)
    report.truncated += fates["truncated"]
    report.dropped_overlength += fates["dropped_overlength"]
    report.dropped_no_target += fates["dropped_no_target"]
    return out


def _completion_only(rendered: Rendered, completion_turns: int) -> Rendered:
    """Keep the spans of the completion's assistant turns only (a multi-turn prompt's earlier
    assistant turns are context, not what the preference is about)."""
    return Rendered(rendered.text, rendered.spans[-completion_turns:], rendered.altered)
