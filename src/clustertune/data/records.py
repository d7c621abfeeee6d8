"""Reading and validating data records into chat conversations.

The containers (JSON Lines, JSON arrays, .gz/.zst, Parquet, Arrow, a `datasets.save_to_disk`
directory) are read by clustertune.data.sources; this module turns each record into a
conversation. Three record formats, detected per record with `format = "auto"`:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"instruction": "...", "input": "..." (optional), "output": "..."}   # alpaca
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...], "system": "..."}  # ShareGPT

An alpaca record becomes [user: instruction (+ blank line + input), assistant: output] with no
system turn, so the chat template adds its own default system prompt if it has one. A ShareGPT
record maps human -> user and gpt -> assistant (user and assistant are accepted as themselves);
its optional top-level "system" string becomes the first, system, message.

Decisions:
- Blank lines are skipped silently and are not records: they are not counted anywhere. A file
  with no record at all is an error naming the file (an empty export is a mistake, not data).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.data.sources import Where, read_items, spans_lines
from clustertune.data.types import DataError

ROLES = ("system", "user", "assistant")
METADATA_KEYS = frozenset({"id", "source", "meta", "metadata"})
FORMATS = ("auto", "messages", "alpaca", "sharegpt")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
_MESSAGES_KEYS = frozenset({"messages"})
_ALPACA_KEYS = frozenset({"instruction", "input", "output"})
_SHAREGPT_KEYS = frozenset({"conversations", "system"})
# JSON may spell a lone UTF-16 surrogate ("\ud800"); Python accepts it, the Rust tokenizer does not.
_SURROGATE = re.compile("[\ud800-\udfff]")

Message = dict[str, str]


class RecordError(Exception):
    """One record that cannot be used. `kind` is a short category (the key of the report's
    invalid_reasons counts); `detail` says where in the record and why."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Problem:
    where: Where
    kind: str
    detail: str

    @property
    def line(self) -> int | None:
        return self.where.line

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass(frozen=True)
class Record:
    where: Where
    messages: list[Message]

    @property
    def line(self) -> int | None:
        return self.where.line


def read_records(path: Path, fmt: str) -> tuple[list[list[Message]], list[tuple[int | str, str]]]:
    """Conversations of a data file and its problems as (line number, reason); a record with
    no line of its own is placed by a string instead: "3 (record [1])" (a JSON array's
    element, with the line it starts on) or "row 7" (a Parquet/Arrow row)."""
    records, problems = load_file(Path(path), fmt)
    return [r.messages for r in records], [(p.line if p.where.index is None else str(p.where), str(p))
                                           for p in problems]


def load_file(path: Path, fmt: str, convert: Callable[[dict[str, Any]], Any] | None = None,
              ) -> tuple[list[Record], list[Problem]]:
    """Like read_records, keeping where each record is and the kind of each problem.

    convert: turns one JSON object into the record's value (RecordError if invalid) instead of
    the conversation formats above (data/preference.py reads preference pairs with it)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r} (expected one of {', '.join(FORMATS)})")
    records: list[Record] = []
    problems: list[Problem] = []
    for where, item in read_items(path):
        try:
            messages = parse_line(item, fmt, convert) if isinstance(item, bytes) else parse_value(item, fmt, convert)
        except RecordError as err:
            problems.append(Problem(where, err.kind, err.detail))
            continue
        if messages is not None:
            records.append(Record(where, messages))
    if not records and not problems:
        raise DataError(f"{path}: empty data file: no records in it (no lines, or only blank ones; an empty "
                        "array; no rows)")
    if not records and problems[0].where == Where(1) and problems[0].kind == "bad JSON" and spans_lines(path):
        raise DataError(f"{path}: its JSON spans several lines (pretty-printed?), but JSON Lines needs one record "
                        "per line: write each record with json.dumps(record), or the whole list as one JSON "
                        "array [ {...}, ... ]")
    return records, problems


def parse_line(raw: bytes, fmt: str, convert: Callable[[dict[str, Any]], Any] | None = None) -> Any:
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
    return record_to_messages(obj, fmt) if convert is None else convert(obj)


def parse_value(obj: Any, fmt: str, convert: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """An already parsed record (a JSON array's element, a table's row) -> a conversation."""
    if not isinstance(obj, dict):
        raise RecordError("not an object", f"expected an object per record, got {_json_type(obj)}")
    return record_to_messages(obj, fmt) if convert is None else convert(obj)


def record_to_messages(obj: dict[str, Any], fmt: str) -> list[Message]:
    kind = _detect(obj) if fmt == "auto" else fmt
    if kind == "messages":
        return _from_messages(obj)
    return _from_alpaca(obj) if kind == "alpaca" else _from_sharegpt(obj)


def _detect(obj: dict[str, Any]) -> str:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    keys = ", ".join(repr(k) for k in obj) or "none"
    raise RecordError("missing field", "expected 'messages' (messages format), 'conversations' (ShareGPT) or "
                      f"'instruction' and 'output' (alpaca format); the record has keys: {keys}")


def _turn_list(obj: dict[str, Any], key: str, fmt: str, allowed: frozenset[str] | set[str]) -> list[Any]:
    """The record's non-empty array of turns under `key` (messages or ShareGPT conversations)."""
    _require(obj, (key,), fmt)
    _no_unknown_keys(obj, allowed | METADATA_KEYS, "")
    turns = obj[key]
    if not isinstance(turns, list):
        raise RecordError("wrong type", f"'{key}' must be an array, got {_json_type(turns)}")
    if not turns:
        raise RecordError("empty content", f"'{key}' is an empty array")
    return turns


def _from_messages(obj: dict[str, Any]) -> list[Message]:
    return validate_messages(_turn_list(obj, "messages", "messages", _MESSAGES_KEYS))


def validate_messages(messages: list[Any]) -> list[Message]:
    """Check roles, types and structure of a message list; returns clean {role, content} dicts."""
    return _check_turns([_message(m, f"messages[{i}]") for i, m in enumerate(messages)], "messages")


def _check_turns(out: list[Message], name: str) -> list[Message]:
    for i, message in enumerate(out[1:], 1):
        if message["role"] == "system":
            raise RecordError("misplaced system message",
                              f"{name}[{i}] is a system message; only the first message may be one")
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("no assistant turn", "no assistant message, so nothing to train on")
    return out


def _message(message: Any, where: str) -> Message:
    return _turn(message, where, role_key="role", text_key="content", roles={r: r for r in ROLES},
                 expected="'system', 'user' or 'assistant'")


def _turn(turn: Any, where: str, *, role_key: str, text_key: str, roles: dict[str, str], expected: str) -> Message:
    """One turn as {role, content}: a `messages` entry (role/content) or a ShareGPT one (from/value)."""
    if not isinstance(turn, dict):
        raise RecordError("wrong type", f"{where} must be an object, got {_json_type(turn)}")
    for key in (role_key, text_key):
        if key not in turn:
            raise RecordError("missing field", f"{where} has no '{key}'")
    _no_unknown_keys(turn, frozenset({role_key, text_key}), f"{where}.")
    role = turn[role_key]
    if not isinstance(role, str):
        raise RecordError("wrong type", f"{where}.{role_key} must be a string, got {_json_type(role)}")
    if role not in roles:
        raise RecordError("unknown role", f"{where}.{role_key} is {role!r} (expected {expected})")
    return {"role": roles[role], "content": _text(turn[text_key], f"{where}.{text_key}")}


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


def _from_sharegpt(obj: dict[str, Any]) -> list[Message]:
    turns = _turn_list(obj, "conversations", "sharegpt", _SHAREGPT_KEYS)
    out = [_sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(turns)]
    if "system" in obj:
        if out[0]["role"] == "system":
            raise RecordError("misplaced system message",
                              "a top-level 'system' and a system turn in conversations[0]: keep one")
        _check_turns(out, "conversations")
        return [{"role": "system", "content": _text(obj["system"], "system")}, *out]
    return _check_turns(out, "conversations")


def _sharegpt_turn(turn: Any, where: str) -> Message:
    return _turn(turn, where, role_key="from", text_key="value", roles=SHAREGPT_ROLES,
                 expected="'system', 'human' or 'gpt'")


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
            other = _looks_like(obj)
            hint = ""
            if other is not None and other != fmt:
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
