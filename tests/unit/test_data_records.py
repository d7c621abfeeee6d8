"""Reading JSONL records: both formats, auto-detection, and one test per validation reason.

    python -m pytest tests/unit/test_data_records.py -q
"""

from __future__ import annotations

import pytest
from data_helpers import chat, write_jsonl

from clustertune.data import DataError, read_records
from clustertune.data.records import load_file


def test_messages_format_multi_turn(tmp_path):
    rec = chat("Hi", "Hello!", "Bye", "See you", system="Be brief.")
    convs, problems = read_records(write_jsonl(tmp_path / "a.jsonl", [rec]), "messages")
    assert problems == []
    assert convs == [rec["messages"]]


def test_alpaca_conversion_with_and_without_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Say hi.", "input": None, "output": "hi"},
    ])
    convs, problems = read_records(path, "alpaca")
    assert problems == []
    assert convs[0] == [{"role": "user", "content": "Add the numbers.\n\n2 3"},
                        {"role": "assistant", "content": "5"}]
    hi = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert convs[1:] == [hi, hi, hi]


def test_auto_detects_per_record_and_ignores_metadata(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"id": 7, "source": "x", **chat("a", "b")},
        {"instruction": "c", "output": "d", "meta": {"k": 1}, "metadata": None},
    ])
    convs, problems = read_records(path, "auto")
    assert problems == []
    assert [[m["content"] for m in c] for c in convs] == [["a", "b"], ["c", "d"]]


def test_explicit_format_mismatch_hints_at_the_other_format(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "c", "output": "d"}])
    _, problems = read_records(path, "messages")
    assert problems == [(1, "missing field: no 'messages' field (this looks like the alpaca format: "
                            'set data.format = "alpaca" or "auto")')]


def test_bom_at_start_blank_lines_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "a.jsonl"
    good = b'{"instruction": "x", "output": "y"}'
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n\r\n   \n" + good + b"\r\n")
    records, problems = load_file(path, "auto")
    assert problems == []
    assert [r.line for r in records] == [1, 4]  # blank lines skipped, line numbers kept


# Each invalid line and the exact reason the user sees for it.
INVALID = [
    (b'{"messages": [', "bad JSON: Expecting value at column 15"),
    (b"\xef\xbb\xbf" + b'{"instruction": "x", "output": "y"}',
     "bad JSON: UTF-8 byte-order mark inside the file (were two files concatenated?)"),
    (b'{"instruction": "caf\xe9", "output": "y"}', "not UTF-8: invalid byte 0xe9 at byte 21"),
    (b'{"instruction": "\\ud800", "output": "y"}',
     "not UTF-8: instruction contains an unpaired UTF-16 surrogate escape"),
    (b'[1, 2]', "not an object: expected a JSON object per line, got an array"),
    (b'{"prompt": "x"}', "missing field: expected 'messages' (messages format), 'conversations' (ShareGPT) or 'instruction' and 'output' "
                         "(alpaca format); the record has keys: 'prompt'"),
    (b'{"instruction": "x"}', "missing field: no 'output' field"),
    (b'{"messages": [{"role": "user"}]}', "missing field: messages[0] has no 'content'"),
    (b'{"messages": "hi"}', "wrong type: 'messages' must be an array, got a string"),
    (b'{"messages": ["hi"]}', "wrong type: messages[0] must be an object, got a string"),
    (b'{"messages": [{"role": "user", "content": 5}]}',
     "wrong type: messages[0].content must be a string, got a number"),
    (b'{"messages": [{"role": 1, "content": "x"}]}', "wrong type: messages[0].role must be a string, got a number"),
    (b'{"instruction": "x", "input": 3, "output": "y"}', "wrong type: input must be a string, got a number"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}',
     "unknown role: messages[0].role is 'bot' (expected 'system', 'user' or 'assistant')"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " \\n"}]}',
     "empty content: messages[1].content is empty"),
    (b'{"messages": []}', "empty content: 'messages' is an empty array"),
    (b'{"instruction": "x", "output": ""}', "empty content: output is empty"),
    (b'{"messages": [{"role": "user", "content": "x"}]}',
     "no assistant turn: no assistant message, so nothing to train on"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
     b'{"role": "assistant", "content": "y"}]}',
     "misplaced system message: messages[1] is a system message; only the first message may be one"),
    (b'{"instruction": "x", "output": "y", "history": []}',
     "unknown key: 'history' is not a known field (known: id, input, instruction, meta, metadata, output, source)"),
    (b'{"messages": [{"role": "user", "content": "x", "name": "bob"}, {"role": "assistant", "content": "y"}]}',
     "unknown key: messages[0].'name' is not a known field (known: content, role)"),
]


@pytest.mark.parametrize("line,reason", INVALID, ids=[r.split(":")[0] + f"-{i}" for i, (_, r) in enumerate(INVALID)])
def test_invalid_line_reason(tmp_path, line, reason):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"instruction": "ok", "output": "ok"}\n' + line + b"\n")
    convs, problems = read_records(path, "auto")
    assert len(convs) == 1
    assert problems == [(2, reason)]


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        read_records(tmp_path / "nope.jsonl", "auto")
