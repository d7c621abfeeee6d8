"""The data formats users bring: every container gives the same conversations as JSON Lines,
every error names the file and the line (or the array record, or the table row), and the
launcher's check (check_records, no tokenizer) reads them exactly as the worker does.

    python -m pytest tests/unit/test_data_formats.py -q
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter

import pytest
import zstandard
from data_helpers import chat, chatml_tokenizer, write_json_array, write_jsonl, write_saved_dataset, write_table

from clustertune.config import DataSection, RecipeError, recipe_from_dict
from clustertune.data import DataError, check_records, prepare_dataset, read_records

RECORDS = [
    chat("What is 2+2?", "4"),
    {"instruction": "Reverse abc", "input": "", "output": "cba"},
    {"instruction": "Add", "input": "1 and 2", "output": "3", "id": 7},
    chat("Hi", "Hello!", "Bye", "Goodbye.", system="Be brief."),
]


def expected_conversations(tmp_path):
    convs, problems = read_records(write_jsonl(tmp_path / "reference.jsonl", RECORDS), "auto")
    assert problems == []
    return convs


def gz(path):
    path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
    return path.with_name(path.name + ".gz")


def zst(path):
    path.with_name(path.name + ".zst").write_bytes(zstandard.ZstdCompressor().compress(path.read_bytes()))
    return path.with_name(path.name + ".zst")


WRITERS = {
    "jsonl": lambda d: write_jsonl(d / "t.jsonl", RECORDS),
    "json array, pretty": lambda d: write_json_array(d / "t.json", RECORDS),
    "json array, one line": lambda d: write_json_array(d / "t.json", RECORDS, indent=None),
    "json array named .jsonl": lambda d: write_json_array(d / "t.jsonl", RECORDS),
    "jsonl.gz": lambda d: gz(write_jsonl(d / "t.jsonl", RECORDS)),
    "json.gz": lambda d: gz(write_json_array(d / "t.json", RECORDS)),
    "jsonl.zst": lambda d: zst(write_jsonl(d / "t.jsonl", RECORDS)),
    "gzip without .gz": lambda d: gz(write_jsonl(d / "t.jsonl", RECORDS)).rename(d / "plain.jsonl"),
    "parquet": lambda d: write_table(d / "t.parquet", RECORDS),
    "arrow": lambda d: write_table(d / "t.arrow", RECORDS, kind="arrow"),
    "save_to_disk directory": lambda d: write_saved_dataset(d / "saved", RECORDS, shards=2),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_format_gives_the_jsonl_conversations(tmp_path, kind):
    (tmp_path / "in").mkdir()
    path = WRITERS[kind](tmp_path / "in")
    convs, problems = read_records(path, "auto")
    assert problems == []
    assert convs == expected_conversations(tmp_path)
    assert check_records(DataSection(train_files=[str(path)])).valid == len(RECORDS)


def test_a_format_trains_like_its_jsonl(tmp_path):
    """The worker's prepare_dataset reads the same way: identical samples from a Parquet file
    and from the JSONL it was made from."""
    section = DataSection(train_files=[str(write_jsonl(tmp_path / "t.jsonl", RECORDS))])
    from_jsonl = prepare_dataset(section, chatml_tokenizer(), seed=0, cache_dir=tmp_path / "c", log=lambda _: None)
    section = DataSection(train_files=[str(write_table(tmp_path / "t.parquet", RECORDS))])
    from_parquet = prepare_dataset(section, chatml_tokenizer(), seed=0, cache_dir=tmp_path / "c", log=lambda _: None)
    assert from_parquet.train == from_jsonl.train and from_parquet.report.cache_hit is False


# ------------------------------------------------------------------------- errors name the place

def test_json_array_errors_name_the_line_and_the_record(tmp_path):
    path = write_json_array(tmp_path / "t.json", [chat("q", "a"), {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError) as err:
        check_records(DataSection(train_files=[str(path)]))
    # The second record's `{` is on line 14 of the pretty-printed file.
    lines = path.read_text().splitlines()
    assert lines[13] == "  {" and lines[12] == "  },"
    assert f"  {path}:14 (record [1]): unknown role: messages[0].role is 'bot'" in str(err.value)


@pytest.mark.parametrize("text,where", [
    ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a",\n]\n', ":4: bad JSON in the array (record [1])"),
    ('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "a", "output": "b"}\n]\n',
     ":3: bad JSON in the array: expected ',' or ']' after record [0] at column 3"),
    ('[{"instruction": "a", "output": "b"},]', ":1: bad JSON in the array (record [1]): Expecting value at column 38"),
    ('[{"instruction": "a", "output": "b"}] x', ":1: bad JSON in the array: unexpected data after the array's "
                                               "closing ']' at column 39"),
])
def test_broken_json_array_is_one_error_with_line_and_column(tmp_path, text, where):
    path = tmp_path / "t.json"
    path.write_text(text)
    for skip in (False, True):  # a broken array cannot be skipped record by record
        with pytest.raises(DataError) as err:
            check_records(DataSection(train_files=[str(path)], skip_invalid=skip))
        assert str(err.value).startswith(f"{path}{where}"), str(err.value)


def test_table_errors_name_the_row(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path = write_table(tmp_path / "t.parquet", rows)
    with pytest.raises(DataError) as err:
        check_records(DataSection(train_files=[str(path)]))
    assert f"  {path}:row 1: unknown role: messages[0].role is 'bot'" in str(err.value)
    saved = write_saved_dataset(tmp_path / "saved", rows * 2, shards=2)  # rows are numbered across shards
    with pytest.raises(DataError) as err:
        check_records(DataSection(train_files=[str(saved)]))
    assert f"{saved}:row 1:" in str(err.value) and f"{saved}:row 3:" in str(err.value)


def test_null_table_fields_count_as_absent(tmp_path):
    """A column exists in every row: alpaca rows without "input" hold null there."""
    rows = [{"instruction": "a", "input": "x", "output": "b"}, {"instruction": "c", "input": None, "output": "d"}]
    convs, problems = read_records(write_table(tmp_path / "t.parquet", rows), "auto")
    assert problems == [] and convs[1] == [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]


def test_empty_files_are_errors_that_name_the_file(tmp_path):
    """Issue 16 #17: an empty JSONL said only "no usable training samples left"."""
    cases = {"empty.jsonl": b"", "blank.jsonl": b"\n  \n", "empty.json": b"[]\n", "empty.jsonl.gz": gzip.compress(b"")}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        for skip in (False, True):
            with pytest.raises(DataError, match=f"{tmp_path / name}: empty data file"):
                check_records(DataSection(train_files=[str(tmp_path / name)], skip_invalid=skip))
    write_jsonl(tmp_path / "ok.jsonl", RECORDS)
    with pytest.raises(DataError, match="empty.jsonl: empty data file"):  # also beside a good file
        prepare_dataset(DataSection(train_files=[str(tmp_path / "ok.jsonl"), str(tmp_path / "empty.jsonl")]),
                        chatml_tokenizer(), seed=0, cache_dir=tmp_path / "c", log=lambda _: None)


def test_pretty_printed_object_in_a_jsonl_file_is_explained(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(RECORDS[0], indent=2) + "\n" + json.dumps(RECORDS[1], indent=2) + "\n")
    with pytest.raises(DataError, match=f"{path}: its JSON spans several lines .*one record per line"):
        check_records(DataSection(train_files=[str(path)]))


def test_gzip_jsonl_was_not_utf8_before(tmp_path):
    """Issue 16 #17: a .jsonl.gz gave "not UTF-8: byte 0x8b" on every line."""
    path = gz(write_jsonl(tmp_path / "t.jsonl", RECORDS))
    assert check_records(DataSection(train_files=[str(path)])).valid == len(RECORDS)


@pytest.mark.parametrize("compress", [gz, zst])
def test_truncated_compressed_file_is_an_error_naming_it(tmp_path, compress):
    many = [chat(f"question {i}", f"answer {i} " * 20) for i in range(2000)]
    path = compress(write_jsonl(tmp_path / "t.jsonl", many))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{path}: cannot read the file after line \\d+: .*truncated or corrupt"):
        check_records(DataSection(train_files=[str(path)]))


def test_missing_optional_readers_say_which_package(tmp_path, monkeypatch):
    path = zst(write_jsonl(tmp_path / "t.jsonl", RECORDS))
    table = write_table(tmp_path / "t.parquet", RECORDS)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=f"{path}: zstd-compressed, .*needs the 'zstandard' package: pip install"):
        check_records(DataSection(train_files=[str(path)]))
    with pytest.raises(DataError, match=f"{table}: reading Parquet needs the 'pyarrow' package"):
        check_records(DataSection(train_files=[str(table)]))


def test_datasetdict_directory_names_its_splits(tmp_path):
    root = tmp_path / "dd"
    write_saved_dataset(root / "train", RECORDS)
    write_saved_dataset(root / "test", RECORDS)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DataError, match=f"a DatasetDict .*splits: train, test.*{root / 'train'}"):
        check_records(DataSection(train_files=[str(root)]))
    assert check_records(DataSection(train_files=[str(root / "train")])).valid == len(RECORDS)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        check_records(DataSection(train_files=[str(tmp_path / "plain")]))


def test_saved_dataset_changes_change_the_cache_key(tmp_path):
    saved = write_saved_dataset(tmp_path / "saved", RECORDS)
    section = DataSection(train_files=[str(saved)])
    first = prepare_dataset(section, chatml_tokenizer(), seed=0, cache_dir=tmp_path / "c", log=lambda _: None)
    assert prepare_dataset(section, chatml_tokenizer(), seed=0, cache_dir=tmp_path / "c",
                           log=lambda _: None).report.cache_hit
    write_table(saved / "data-00000-of-00001.arrow", RECORDS[:2], kind="arrow")
    again = prepare_dataset(section, chatml_tokenizer(), seed=0, cache_dir=tmp_path / "c", log=lambda _: None)
    assert not again.report.cache_hit and len(again.train) == 2 < len(first.train)


# ------------------------------------------------------------------------------------- ShareGPT

def test_sharegpt_roles_and_system(tmp_path):
    records = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}], "id": "x1"},
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    convs, problems = read_records(write_jsonl(tmp_path / "t.jsonl", records), "auto")
    assert problems == []
    assert convs[0] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert convs[1] == convs[2] == [{"role": "system", "content": "Be brief."}, *convs[0]]
    assert read_records(tmp_path / "t.jsonl", "sharegpt")[0] == convs


@pytest.mark.parametrize("record,reason", [
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
     "unknown role: conversations[1].from is 'bot' (expected 'system', 'human' or 'gpt')"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]},
     "empty content: conversations[1].value is empty"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "a", "weight": 0}]},
     "unknown key: conversations[1].'weight' is not a known field (known: from, value)"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]},
     "missing field: conversations[1] has no 'value'"),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, "no assistant turn: no assistant message, so nothing "
                                                              "to train on"),
    ({"conversations": [], "tools": "[]"}, "unknown key: 'tools' is not a known field (known: conversations, id, "
                                           "meta, metadata, source, system)"),
    ({"system": "s", "conversations": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}]},
     "misplaced system message: a top-level 'system' and a system turn in conversations[0]: keep one"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "a"}], "system": 3},
     "wrong type: system must be a string, got a number"),
])
def test_sharegpt_invalid_records(tmp_path, record, reason):
    _, problems = read_records(write_jsonl(tmp_path / "t.jsonl", [record]), "auto")
    assert problems == [(1, reason)]


def test_format_mismatch_hint_names_sharegpt(tmp_path):
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    _, problems = read_records(write_jsonl(tmp_path / "t.jsonl", [record]), "messages")
    assert 'this looks like the sharegpt format: set data.format = "sharegpt" or "auto"' in problems[0][1]


# ----------------------------------------------------------------------------------- file paths

def test_relative_path_not_found_shows_where_it_looked(tmp_path, monkeypatch):
    """Issue 16 #19: "data file not found" without the resolved path."""
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError) as err:
        check_records(DataSection(train_files=[str(tmp_path / "train.jsonl"), "data/train.jsonl"]))
    assert str(err.value).startswith("data/train.jsonl: data file not found (data.train_files[1]): looked for "
                                     f"{elsewhere / 'data' / 'train.jsonl'}")
    assert f"resolved against the current directory ({elsewhere})" in str(err.value)
    with pytest.raises(DataError, match=r"^x\.jsonl: data file not found \(data\.eval_files\[0\]\): looked for"):
        prepare_dataset(DataSection(train_files=[str(tmp_path / "train.jsonl")], eval_files=["x.jsonl"]),
                        chatml_tokenizer(), seed=0, cache_dir=tmp_path / "c", log=lambda _: None)
    monkeypatch.chdir(tmp_path)  # from the right directory the same relative path works
    assert check_records(DataSection(train_files=["train.jsonl"])).valid == len(RECORDS)


# ------------------------------------------------------------------------------- per-file weights

def test_weighted_train_files_in_the_recipe(tmp_path):
    recipe = recipe_from_dict({"data": {"train_files": [{"path": "a.jsonl", "weight": 2}, "b.jsonl"]}})
    assert recipe.data.train_paths == ["a.jsonl", "b.jsonl"] and recipe.data.train_weights == [2.0, 1.0]
    with pytest.raises(RecipeError, match=r"data.train_files\[0\].table.weight: Input should be greater than 0"):
        recipe_from_dict({"data": {"train_files": [{"path": "a.jsonl", "weight": 0}]}})
    with pytest.raises(RecipeError, match=r"data.train_files\[0\].table.wieght: unknown key"):
        recipe_from_dict({"data": {"train_files": [{"path": "a.jsonl", "wieght": 2}]}})


def weighted(tmp_path, weights, seed=0, **data):
    files = []
    for name, n in (("a", 10), ("b", 7)):
        write_jsonl(tmp_path / f"{name}.jsonl", [chat(f"{name} question {i}", f"{name} answer {i}") for i in range(n)])
        files.append(str(tmp_path / f"{name}.jsonl"))
    entries = [f if w is None else {"path": f, "weight": w} for f, w in zip(files, weights, strict=True)]
    section = DataSection.model_validate({"train_files": entries, **data})
    return prepare_dataset(section, chatml_tokenizer(), seed=seed, cache_dir=tmp_path / "c", log=lambda _: None)


def origin(prepared, tok=chatml_tokenizer()) -> list[str]:
    return [tok.decode(s.input_ids).split("user\n")[1].split(" question ")[0] for s in prepared.train]


def test_weights_up_and_down_sample_each_file(tmp_path):
    plain = weighted(tmp_path, [None, None])
    assert weighted(tmp_path, [1.0, 1.0]).train == plain.train  # weight 1 changes nothing
    doubled = weighted(tmp_path, [2.0, None])
    assert (origin(doubled).count("a"), origin(doubled).count("b")) == (20, 7)
    counts = Counter(tuple(s.input_ids) for s in doubled.train)
    assert all(counts[tuple(s.input_ids)] == (2 if origin_of(s) == "a" else 1) for s in plain.train)
    half = weighted(tmp_path, [0.5, 1.5])
    assert (origin(half).count("a"), origin(half).count("b")) == (5, 7 + 4)  # 0.5*10; 7 + round-half-up(3.5)
    assert len({tuple(s.input_ids) for s in half.train if origin_of(s) == "a"}) == 5  # distinct samples
    assert "a.jsonl x0.5: 10 -> 5 samples" in half.report.summary()
    assert half.report.train_samples == 16
    again, other = weighted(tmp_path, [0.5, 1.5]), weighted(tmp_path, [0.5, 1.5], seed=1)
    assert again.train == half.train  # seeded: identical on every rank and relaunch
    assert {tuple(s.input_ids) for s in other.train} != {tuple(s.input_ids) for s in half.train}


def origin_of(sample, tok=chatml_tokenizer()) -> str:
    return tok.decode(sample.input_ids).split("user\n")[1].split(" question ")[0]


def test_eval_split_comes_before_the_weights(tmp_path):
    """A duplicated sample must never be on both sides of the eval split."""
    prepared = weighted(tmp_path, [3.0, None], eval_fraction=0.2)
    held_out = {tuple(s.input_ids) for s in prepared.eval}
    assert len(held_out) == prepared.report.eval_samples == round(17 * 0.2)
    assert not held_out & {tuple(s.input_ids) for s in prepared.train}
    held_a = sum(origin_of(s) == "a" for s in prepared.eval)
    assert len(prepared.train) == 3 * (10 - held_a) + (7 - (len(held_out) - held_a))


def test_weighted_entries_survive_the_resolved_recipe_file(tmp_path):
    """Workers read the recipe back from TOML: the table form must round-trip."""
    import tomllib

    from clustertune.config import recipe_to_toml
    recipe = recipe_from_dict({"data": {"train_files": [{"path": "a.jsonl", "weight": 2.5}, "b.jsonl"]}})
    assert recipe_from_dict(tomllib.loads(recipe_to_toml(recipe))) == recipe
    moved = recipe.data.with_paths(lambda p: f"/abs/{p}")
    assert moved.train_paths == ["/abs/a.jsonl", "/abs/b.jsonl"] and moved.train_weights == [2.5, 1.0]
