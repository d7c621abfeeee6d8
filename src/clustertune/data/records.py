"""Reading and validating JSONL records into chat conversations.

Two record formats, detected per line with `format = "auto"`:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"instruction": "...", "input": "..." (optional), "output": "..."}   # alpaca

An alpaca record becomes [user: instruction (+ blank line + input), assistant: output] with no
system turn, so the chat template adds its own default system prompt if it has one.

Decisions:
- Blank lines are skipped silently and are not records: they are not counted anywhere.
- A UTF-8 byte-order mark at the start of a file is ignored; one in the middle of a file (two
  files concatenated) is an error on that line.
- Unknown keys are errors, except common metadata keys (id, source, meta, metadata) at the top
  level. A key we do not read usually means data we would silently drop: alpaca "system" or
  "history", OpenAI "tool_calls" or "name", a "reasoning_content" field. Failing loudly is better
  than training on a conversation that is not the one in the file.
- A system message is allowed only as the first message, and a conversation needs at least one
  assistant message (the loss is only on assistant turns). Turn order is otherwise left to the
  chat template: one that rejects an order raises, and that record is reported as invalid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.data.types import DataError

ROLES = ("system", "user", "assistant")
METADATA_KEYS = frozenset({"id", "source", "meta", "metadata"})
FORMATS = ("auto", "messages", "alpaca")
_MESSAGES_KEYS = frozenset({"messages"})
_ALPACA_KEYS = frozenset({"instruction", "input", "output"})
_MESSAGE_KEYS = frozenset({"role", "content"})
_BOM = b"\xef\xbb\xbf"
# JSON may spell a lone UTF-16 surrogate ("\ud800"); Python accepts it, the Rust tokenizer does not.
_SURROGATE = re.compile("[\ud800-\udfff]")

Message = dict[str, str]


class RecordError(Exception):
    """One record that cannot be used. `kind` is a short category (the key of the report's
    invalid_reasons counts); `detail` says where in the record and why.

    Not a UserError: the reader always catches it and counts it, or raises a DataError that adds
    the file and line; one escaping would be a bug."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Problem:
    line: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass(frozen=True)
class Record:
    line: int
    messages: list[Message]


def read_records(path: Path, fmt: str) -> tuple[list[list[Message]], list[tuple[int, str]]]:
    """Conversations of a JSONL file and its problems as (line number, reason)."""
    records, problems = load_file(Path(path), fmt)
    return [r.messages for r in records], [(p.line, str(p)) for p in problems]


def load_file(path: Path, fmt: str) -> tuple[list[Record], list[Problem]]:
    """Like read_records, keeping the line number of each record and the kind of each problem."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
    records: list[Record] = []
    problems: list[Problem] = []
    for line_no, raw in _raw_lines(path):
        try:
            messages = parse_line(raw, fmt)
        except RecordError as err:
            problems.append(Problem(line_no, err.kind, err.detail))
            continue
        if messages is not None:
            records.append(Record(line_no, messages))
    return records, problems


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    # Binary, so that one bad byte is one invalid line instead of a decode error for the file.
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read data file: {err.strerror}") from None
    with handle:
        for line_no, raw in enumerate(handle, 1):
            yield line_no, raw.removeprefix(_BOM) if line_no == 1 else raw


def parse_line(raw: bytes, fmt: str) -> list[Message] | None:
    """One JSONL line -> a validated conversation, None for a blank line, RecordError if invalid."""
    try:
        # Without the line break, json's "column" of an error at the end of the line is right.
        text = raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecordError("not UTF-8", f"invalid byte 0x{raw[err.start]:02x} at byte {err.start + 1}") from None
    if not text.strip():
        return None
    if text.startswith("\ufeff"):
        raise RecordError("bad JSON", "UTF-8 byte-order mark inside the file (were two files concatenated?)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError("bad JSON", f"{err.msg} at column {err.colno}") from None
    except RecursionError:
        raise RecordError("bad JSON", "nested too deeply") from None
    if not isinstance(obj, dict):
        raise RecordError("not an object", f"expected a JSON object per line, got {_json_type(obj)}")
    return record_to_messages(obj, fmt)


def record_to_messages(obj: dict[str, Any], fmt: str) -> list[Message]:
    kind = _detect(obj) if fmt == "auto" else fmt
    return _from_messages(obj) if kind == "messages" else _from_alpaca(obj)


def _detect(obj: dict[str, Any]) -> str:
    if "messages" in obj:
        return "messages"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    keys = ", ".join(repr(k) for k in obj) or "none"
    raise RecordError("missing field", "expected 'messages' (messages format) or 'instruction' and "
                      f"'output' (alpaca format); the record has keys: {keys}")


def _from_messages(obj: dict[str, Any]) -> list[Message]:
    _require(obj, ("messages",), "messages")
    _no_unknown_keys(obj, _MESSAGES_KEYS | METADATA_KEYS, "")
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise RecordError("wrong type", f"'messages' must be an array, got {_json_type(messages)}")
    if not messages:
        raise RecordError("empty content", "'messages' is an empty array")
    return validate_messages(messages)


def validate_messages(messages: list[Any]) -> list[Message]:
    """Check roles, types and structure of a message list; returns clean {role, content} dicts."""
    out = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    for i, message in enumerate(out[1:], 1):
        if message["role"] == "system":
            raise RecordError("misplaced system message",
                              f"messages[{i}] is a system message; only the first message may be one")
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("no assistant turn", "no assistant message, so nothing to train on")
    return out


def _message(message: Any, where: str) -> Message:
    if not isinstance(message, dict):
        raise RecordError("wrong type", f"{where} must be an object, got {_json_type(message)}")
    for key in _MESSAGE_KEYS:
        if key not in message:
            raise RecordError("missing field", f"{where} has no '{key}'")
    _no_unknown_keys(message, _MESSAGE_KEYS, f"{where}.")
    role = message["role"]
    if not isinstance(role, str):
        raise RecordError("wrong type", f"{where}.role must be a string, got {_json_type(role)}")
    if role not in ROLES:
        raise RecordError("unknown role", f"{where}.role is {role!r} (expected 'system', 'user' or 'assistant')")
    return {"role": role, "content": _text(message["content"], f"{where}.content")}


def _from_alpaca(obj: dict[str, Any]) -> list[Message]:
    _require(obj, ("instruction", "output"), "alpaca")
    _no_unknown_keys(obj, _ALPACA_KEYS | METADATA_KEYS, "")
    prompt = _text(obj["instruction"], "instruction")
    extra = obj.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordError("wrong type", f"input must be a string, got {_json_type(extra)}")
    if extra and extra.strip():
        prompt = f"{prompt}\n\n{_text(extra, 'input')}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(obj["output"], "output")}]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError("wrong type", f"{where} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise RecordError("empty content", f"{where} is empty")
    if _SURROGATE.search(value):
        raise RecordError("not UTF-8", f"{where} contains an unpaired UTF-16 surrogate escape")
    return value


def _require(obj: dict[str, Any], keys: tuple[str, ...], fmt: str) -> None:
    for key in keys:
        if key not in obj:
            other = "alpaca" if fmt == "messages" else "messages"
            hint = ""
            if _looks_like(obj) == other:
                hint = f" (this looks like the {other} format: set data.format = \"{other}\" or \"auto\")"
            raise RecordError("missing field", f"no '{key}' field{hint}")


def _looks_like(obj: dict[str, Any]) -> str | None:
    try:
        return _detect(obj)
    except RecordError:
        return None


def _no_unknown_keys(obj: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise RecordError("unknown key", f"{where}{unknown[0]!r} is not a known field "
                          f"(known: {', '.join(sorted(allowed))})")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
