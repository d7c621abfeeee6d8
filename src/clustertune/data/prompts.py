"""Prompts with reference answers for train.objective = "grpo".

    prepared = prepare_prompt_dataset(recipe.data, tokenizer, seed=recipe.train.seed)

Record shapes (detected per record; metadata keys id, source, meta, metadata allowed):

    {"prompt": "...", "answer": "..."}
    {"prompt": [messages ending with a user turn], "answer": "..."}   # "messages" may stand for "prompt"
    {"messages": [..., user turn, assistant turn]}                    # the last assistant turn is the answer

so an SFT file of single-answer conversations (the bundled demo task) is also a GRPO prompt file.
A prompt is rendered with the chat template and its generation prompt; one longer than
data.max_length tokens is dropped. Imports no torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clustertune.data.prepare import _paths, _read_all, _skip_or_raise, split_eval
from clustertune.data.preference import _check_prompt
from clustertune.data.records import METADATA_KEYS, RecordError, _json_type, _message, _no_unknown_keys, _text
from clustertune.data.types import IGNORE_INDEX, DataError, DataReport, PreparedData

if TYPE_CHECKING:
    from clustertune.config import DataSection

PROMPT_KEYS = frozenset({"prompt", "messages", "answer"})


@dataclass(frozen=True)
class PromptRecord:
    prompt: list[dict[str, str]]
    answer: str


@dataclass(frozen=True)
class PromptSample:
    """A tokenized prompt (chat template + generation prompt) and its reference answer."""

    input_ids: list[int]
    answer: str

    @property
    def targets(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return 0


def record_to_prompt(obj: dict[str, Any]) -> PromptRecord:
    _no_unknown_keys(obj, PROMPT_KEYS | METADATA_KEYS, "")
    if "prompt" in obj and "messages" in obj:
        raise RecordError("unknown key", "both 'prompt' and 'messages': give the prompt once")
    key = "prompt" if "prompt" in obj else "messages" if "messages" in obj else None
    if key is None:
        raise RecordError("missing field", "no 'prompt' (or 'messages') field")
    value = obj[key]
    if isinstance(value, str):
        messages = [{"role": "user", "content": _text(value, key)}]
    elif isinstance(value, list) and value:
        messages = [_message(m, f"{key}[{i}]") for i, m in enumerate(value)]
    else:
        raise RecordError("wrong type", f"'{key}' must be a string or a non-empty array of messages, "
                          f"got {_json_type(value)}")
    if "answer" in obj:
        answer = _text(obj["answer"], "answer")
    elif messages[-1]["role"] == "assistant":
        answer = messages.pop()["content"]
        if not messages:
            raise RecordError("bad prompt", f"'{key}' holds only an assistant message")
    else:
        raise RecordError("missing field", "no 'answer' field (or a last assistant message to take it from)")
    _check_prompt(messages, key)
    return PromptRecord(messages, answer)


def check_prompt_records(data: DataSection) -> DataReport:
    """The launcher's check: every record read and validated, bad ones as file:line."""
    files = _paths(data.train_paths, "data.train_files") + _paths(data.eval_files, "data.eval_files")
    report = DataReport(files=[str(p) for p in files])
    _read_all(files, data, report, record_to_prompt)
    return report


def prepare_prompt_dataset(data: DataSection, tokenizer: Any, *, seed: int, log: Any = print) -> PreparedData:
    """Every rank gets the identical, seeded-shuffled prompt list (cheap: no cache), and the held-out
    prompts (data.eval_files, or a seeded data.eval_fraction of the train files) in file order."""
    files = _paths(data.train_paths, "data.train_files")
    eval_files = _paths(data.eval_files, "data.eval_files")
    report = DataReport(files=[str(p) for p in files + eval_files])
    records = _read_all(files + eval_files, data, report, record_to_prompt)
    per_file: list[list[PromptSample]] = []
    problems = []
    for path, file_records in records:
        per_file.append([])
        for record in file_records:
            prompt: PromptRecord = record.messages  # type: ignore[assignment]
            try:
                text = tokenizer.apply_chat_template(prompt.prompt, tokenize=False, add_generation_prompt=True)
            except Exception as err:  # a template that rejects the turns: that record is invalid
                problems.append((path, _problem(record.where, f"the chat template failed: {err}")))
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > data.max_length:
                report.dropped_overlength += 1
                continue
            per_file[-1].append(PromptSample(list(ids), prompt.answer))
    _skip_or_raise(problems, report, data.skip_invalid)
    samples = [s for samples in per_file[:len(files)] for s in samples]
    held_out = [s for samples in per_file[len(files):] for s in samples]
    if data.eval_fraction > 0:
        samples, held_out = split_eval(samples, data.eval_fraction, seed)
    random.Random(f"clustertune-shuffle-{seed}").shuffle(samples)
    report.train_samples, report.eval_samples = len(samples), len(held_out)
    report.train_tokens = sum(len(s.input_ids) for s in samples)
    log(f"data: {report.valid} prompt records, {report.dropped_overlength} over data.max_length dropped, "
        f"{len(samples)} prompts" + (f", {len(held_out)} held out" if held_out else ""))
    if not samples:
        raise DataError("no usable prompts left after filtering, from " + ", ".join(map(str, files)))
    return PreparedData(train=samples, eval=held_out, report=report)  # type: ignore[arg-type]


def _problem(where: Any, detail: str) -> Any:
    from clustertune.data.records import Problem
    return Problem(where, "chat template", detail)
