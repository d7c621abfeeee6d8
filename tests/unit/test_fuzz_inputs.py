"""Fuzz: malformed datasets, recipes and cluster files. Every input gives either a usable result
or one clear error (DataError / RecipeError / ClusterError naming the file, and the line or key),
never a raw traceback and never a hang; with data.skip_invalid the counts are exact, and two
preparations (cache miss, cache hit, another cache dir: what each rank does) give identical data.

Seeded and bounded: a few hundred mutated inputs per kind plus hand-written cases, each under a
wall-clock alarm.

    python -m pytest tests/unit/test_fuzz_inputs.py -q
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
from pathlib import Path

import pytest

from clustertune.cluster.inventory import ClusterError, load_cluster
from clustertune.config import DataSection, RecipeError, load_recipe
from clustertune.data import DataError, prepare_dataset
from clustertune.data.records import RecordError, parse_line, parse_value
from data_helpers import chatml_tokenizer

SEED = 1234
CASES = 200
CASE_LIMIT_S = 20


@contextlib.contextmanager
def deadline(seconds: float = CASE_LIMIT_S):
    """A hang is a failure: SIGALRM raises inside the case after `seconds`."""
    def on_alarm(_signum, _frame):
        raise TimeoutError(f"case took more than {seconds} s (hang?)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -------------------------------------------------------------------------------------- datasets

def _valid_lines(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        if rng.random() < 0.3:
            obj = {"instruction": f"add {i} and {rng.randrange(9)}", "output": str(i)}
            if rng.random() < 0.5:
                obj["input"] = "numbers"
        else:
            msgs = [{"role": "user", "content": f"q{i} {rng.randrange(100)}"},
                    {"role": "assistant", "content": f"a{i}"}]
            if rng.random() < 0.3:
                msgs.insert(0, {"role": "system", "content": "be brief"})
            obj = {"messages": msgs}
            if rng.random() < 0.2:
                obj["id"] = i
        out.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode())
    return out


def _mutate_line(rng: random.Random, line: bytes) -> bytes:
    try:
        return _mutate_once(rng, line)
    except (TypeError, KeyError, IndexError, AttributeError, ValueError):  # shape already mutated
        return line[: max(1, len(line) // 2)]


def _mutate_once(rng: random.Random, line: bytes) -> bytes:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        obj = None
    choice = rng.randrange(16)
    if not isinstance(obj, dict) or not obj:  # mutated already: byte-level changes only
        choice = rng.choice([0, 1, 2, 3, 13, 14]) if line else 2
    if choice == 0:
        return line[: rng.randrange(1, len(line))]  # broken JSON
    if choice == 1:
        return b""  # empty line
    if choice == 2:
        return b"\xef\xbb\xbf" + line  # BOM (start of file: ignored; elsewhere: invalid)
    if choice == 3:
        pos = rng.randrange(len(line))
        return line[:pos] + bytes([rng.choice([0x80, 0xff, 0xc3, 0xfe])]) + line[pos:]  # not UTF-8
    if choice == 4:
        obj.pop(rng.choice(sorted(obj)))  # missing field
    elif choice == 5:
        obj[rng.choice(["extra", "history", "system", "tool_calls", "meta"])] = "x"  # extra field
    elif choice == 6 and "messages" in obj:
        rng.shuffle(obj["messages"])  # odd turn order
    elif choice == 7 and "messages" in obj:
        obj["messages"][rng.randrange(len(obj["messages"]))]["role"] = rng.choice(["bot", "", 3, None, "tool"])
    elif choice == 8:
        key = rng.choice(sorted(obj))
        obj[key] = rng.choice([3, 2.5, None, True, [], {}, ["a"], {"a": 1}])  # wrong type
    elif choice == 9 and "messages" in obj:
        obj["messages"][0]["content"] = rng.choice([None, 7, ["x"], {"text": "x"}, "\ud800"])
    elif choice == 10:
        return json.dumps([obj]).encode()  # not an object
    elif choice == 11:
        return rng.choice([b"null", b"42", b'"text"', b"NaN", b"[" * 5000 + b"]" * 5000, b"{}"])
    elif choice == 12 and "messages" in obj:
        obj["messages"] = [m for m in obj["messages"] if m["role"] != "assistant"]  # nothing to train
    elif choice == 13:
        return line + b"\r"  # CRLF
    elif choice == 14:
        return line + b" " + line  # two records on one line
    else:
        return b"   \t "
    return json.dumps(obj).encode()


def _expected_counts(lines: list[bytes]) -> tuple[int, int] | None:
    """(records, invalid) as the spec defines them, or None where the whole file is an error.
    A file whose first non-blank character is `[` is one JSON array (a syntax error anywhere
    fails the file), unless its first line is a whole JSON value and non-blank lines follow.
    Otherwise it is JSON Lines: blank lines are not records; a BOM is ignored on line 1 only;
    each line is judged alone (parse_line). A file without records is an error."""
    content = b"\n".join(lines).removeprefix(b"\xef\xbb\xbf")
    first, _, rest = content.partition(b"\n")
    if content.lstrip(b" \t\r\n").startswith(b"[") and not (rest.strip() and _is_json_value(first)):
        try:
            elements = json.loads(content)
        except (ValueError, RecursionError):
            return None
        invalid = 0
        for element in elements:
            try:
                parse_value(element, "auto")
            except RecordError:
                invalid += 1
        return (len(elements), invalid) if elements else None
    records = invalid = 0
    for i, raw in enumerate(lines):
        if i == 0:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            if parse_line(raw, "auto") is None:
                continue
        except RecordError:
            invalid += 1
        records += 1
    return (records, invalid) if records else None


def _is_json_value(line: bytes) -> bool:
    try:
        json.loads(line)
    except RecursionError:
        return True
    except ValueError:
        return False
    return True


def _prepare(path: Path, cache: Path, tok, *, skip: bool, max_length: int = 96):
    section = DataSection(train_files=[str(path)], skip_invalid=skip, max_length=max_length)
    return prepare_dataset(section, tok, seed=7, cache_dir=cache, log=lambda _: None)


def _samples(prepared) -> list[tuple]:
    return [(tuple(s.input_ids), tuple(s.targets)) for s in prepared.train + prepared.eval]


def _check_data_case(tmp: Path, name: str, lines: list[bytes], tok) -> str:
    path = tmp / f"{name}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    expected = _expected_counts(lines)
    if expected is None:  # the file as a whole is unusable: one error naming it, skip_invalid or not
        for skip in (False, True):
            with deadline(), pytest.raises(DataError) as err:
                _prepare(path, tmp / f"c-{skip}", tok, skip=skip)
            assert str(path) in str(err.value), str(err.value)
        return "unusable file"
    records, invalid = expected
    with deadline():
        try:
            strict = _prepare(path, tmp / "c-strict", tok, skip=False)
        except DataError as err:
            msg = str(err)
            assert str(path) in msg or "no usable training samples" in msg, msg
            if invalid:  # file:line: kind: detail (an array's element: file:line (record [i]): ...)
                assert re.search(re.escape(str(path)) + r":\d+( \(record \[\d+\]\))?: ", msg), msg
        else:
            assert invalid == 0
            assert strict.report.total_lines == records
        try:
            first = _prepare(path, tmp / "c1", tok, skip=True)
        except DataError as err:  # only acceptable: nothing usable left
            assert "no usable training samples" in str(err), str(err)
            assert f"{records} records" in str(err) and f"{invalid} invalid" in str(err), str(err)
            return "nothing usable"
        again = _prepare(path, tmp / "c1", tok, skip=True)  # cache hit (the other ranks)
        other = _prepare(path, tmp / "c2", tok, skip=True)  # fresh, another node's cache
    rep = first.report
    assert (rep.total_lines, rep.invalid) == (records, invalid), (name, rep.summary())
    assert rep.valid == records - invalid
    assert sum(rep.invalid_reasons.values()) == invalid
    assert rep.valid == rep.train_samples + rep.eval_samples + rep.dropped_overlength + rep.dropped_no_target
    assert again.report.cache_hit and not other.report.cache_hit
    assert _samples(first) == _samples(again) == _samples(other)
    return "skipped some" if invalid else "all valid"


@pytest.fixture(scope="module")
def tok():
    return chatml_tokenizer()


def test_fuzz_datasets_seeded_mutations(tmp_path, tok):
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    for case in range(CASES):
        lines = _valid_lines(rng, rng.randrange(1, 8))
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(lines))
            lines[i] = _mutate_line(rng, lines[i])
        outcome = _check_data_case(tmp_path, f"case{case}", lines, tok)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the mutator really exercises every path: skipping with exact counts, all-invalid files, valid ones
    assert all(outcomes.get(k, 0) >= 10 for k in ("skipped some", "nothing usable", "all valid")), outcomes


HAND_WRITTEN = {
    "empty_file": [],
    "only_blank_lines": [b"", b"  ", b"\t"],
    "bom_first_line": [b'\xef\xbb\xbf{"instruction": "a", "output": "b"}'],
    "bom_middle": [b'{"instruction": "a", "output": "b"}', b'\xef\xbb\xbf{"instruction": "a", "output": "b"}'],
    "broken_json": [b'{"instruction": "a", "output": "b"}', b'{"instruction": "a", "output": '],
    "missing_field": [b'{"instruction": "a", "output": "b"}', b'{"instruction": "a"}'],
    "extra_field": [b'{"instruction": "a", "output": "b"}', b'{"instruction": "a", "output": "b", "history": []}'],
    "wrong_types": [b'{"messages": "hi"}', b'{"messages": [{"role": "user", "content": 5}]}',
                    b'{"instruction": "a", "output": "b"}'],
    "odd_turn_order": [b'{"messages": [{"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}]}',
                       b'{"messages": [{"role": "user", "content": "q"}]}',
                       b'{"instruction": "a", "output": "b"}'],
    "non_utf8": [b'{"instruction": "caf\xe9", "output": "b"}', b'{"instruction": "a", "output": "b"}'],
    "huge_line": [json.dumps({"instruction": "x" * 300_000, "output": "y"}).encode(),
                  b'{"instruction": "a", "output": "b"}'],
    "deep_nesting": [b"[" * 200_000 + b"]" * 200_000, b'{"instruction": "a", "output": "b"}'],
    "lone_surrogate": [b'{"instruction": "\\ud800", "output": "b"}', b'{"instruction": "a", "output": "b"}'],
}


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_fuzz_datasets_hand_written(tmp_path, tok, name):
    _check_data_case(tmp_path, name, HAND_WRITTEN[name], tok)


def test_invalid_line_is_named_with_file_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n\n{"instruction": "a"\n')
    with deadline(), pytest.raises(DataError) as err:
        _prepare(path, tmp_path / "c", tok, skip=False)
    assert f"{path}:3: bad JSON" in str(err.value), str(err.value)


# ---------------------------------------------------------------------- recipes and cluster files

VALID_RECIPE = """
[run]
name = "fuzz"
output_dir = "runs/fuzz"
collective_timeout_s = 60
stall_timeout_s = 30
[model]
path = "tiny"
[data]
train_files = ["train.jsonl"]
max_length = 64
skip_invalid = true
[train]
max_steps = 8
global_batch_size = 8
micro_batch_size = 4
lr = 3e-3
[zero]
stage = 3
[checkpoint]
every_steps = 2
keep_last = 2
"""

VALID_CLUSTER = """
name = "fuzz"
master_port = 29500
accelerator = "cpu"

[[nodes]]
name = "node1"
address = "10.0.0.1"
user = "root"
port = 22
slots = 2

[[nodes]]
name = "node2"
address = "10.0.0.2"
user = "root"
port = 22
slots = 2
"""

_ODD_VALUES = ['"x"', "-1", "0", "1.5", "true", "[]", "{}", '"$(id)"', '"a;b"', "99999999999999999999",
               '"\\u0000"', "nan", "inf", '["a", 1]', '"' + "x" * 10000 + '"']


def _mutate_toml(rng: random.Random, text: str) -> bytes:
    lines = text.splitlines()
    choice = rng.randrange(8)
    kv = [i for i, line in enumerate(lines) if " = " in line]
    if choice == 0:  # wrong type / out-of-range value
        i = rng.choice(kv)
        lines[i] = lines[i].split(" = ")[0] + " = " + rng.choice(_ODD_VALUES)
    elif choice == 1:  # unknown key
        i = rng.choice(kv)
        lines.insert(i, rng.choice(["typo_key = 1", "stagee = 2", "slot = 1"]))
    elif choice == 2:  # missing key
        del lines[rng.choice(kv)]
    elif choice == 3:  # broken TOML
        i = rng.randrange(len(lines))
        lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)] + rng.choice(["[", '"', "= =", "]]"])
    elif choice == 4:  # not UTF-8
        raw = "\n".join(lines).encode()
        pos = rng.randrange(len(raw))
        return raw[:pos] + b"\xff\xfe" + raw[pos:]
    elif choice == 5:
        return b"\xef\xbb\xbf" + "\n".join(lines).encode()  # BOM
    elif choice == 6:  # duplicated table/key
        i = rng.choice(kv)
        lines.insert(i, lines[i])
    else:  # deleted section header
        heads = [i for i, line in enumerate(lines) if line.startswith("[")]
        del lines[rng.choice(heads)]
    return "\n".join(lines).encode()


def _load_checked(path: Path, loader, error: type[Exception]) -> None:
    with deadline(10):
        try:
            loader(path)
        except error as err:
            msg = str(err)
            assert msg.startswith(str(path)), msg
            assert "Traceback" not in msg
        # any other exception type propagates and fails the test: a raw traceback for the user


def test_fuzz_recipes(tmp_path):
    rng = random.Random(SEED)
    (tmp_path / "base.toml").write_text(VALID_RECIPE)
    load_recipe(tmp_path / "base.toml")  # the base is valid
    for case in range(CASES):
        path = tmp_path / f"r{case}.toml"
        path.write_bytes(_mutate_toml(rng, VALID_RECIPE))
        _load_checked(path, load_recipe, RecipeError)


def test_fuzz_cluster_files(tmp_path):
    rng = random.Random(SEED)
    (tmp_path / "base.toml").write_text(VALID_CLUSTER)
    load_cluster(tmp_path / "base.toml")
    for case in range(CASES):
        path = tmp_path / f"c{case}.toml"
        path.write_bytes(_mutate_toml(rng, VALID_CLUSTER))
        _load_checked(path, load_cluster, ClusterError)


def test_recipe_errors_name_the_key(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(VALID_RECIPE.replace("stall_timeout_s = 30", "stall_timeout_s = 2"))
    with pytest.raises(RecipeError, match=r"run: .*stall_timeout_s must be 0 \(off\) or >= 5"):
        load_recipe(path)
    path.write_text(VALID_RECIPE.replace("collective_timeout_s = 60", "collective_timeout_s = \"60\""))
    with pytest.raises(RecipeError, match=r"run\.collective_timeout_s"):
        load_recipe(path)
