"""prepare_dataset end to end: the error listing, exact skip/length counts, seeded shuffle and
eval split, and the tokenized cache.

    python -m pytest tests/unit/test_data_prepare.py -q
"""

from __future__ import annotations

import pytest
from data_helpers import chat, chatml_tokenizer, write_jsonl

from clustertune.config import DataSection
from clustertune.data import DataError, prepare_dataset
from clustertune.data.chat import ChatEncoder

RAISING_TEMPLATE = (  # rejects two user messages in a row, as Mistral-style templates do
    "{%- for m in messages %}"
    "{%- if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}"
    "{{- raise_exception('roles must alternate') }}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
)


def prepare(tmp_path, tokenizer=None, seed=0, **data):
    section = DataSection(**{"train_files": [str(tmp_path / "train.jsonl")], **data})
    return prepare_dataset(section, tokenizer or chatml_tokenizer(), seed=seed,
                           cache_dir=tmp_path / "cache", log=lambda _: None)


def numbered(n: int) -> list[dict]:
    """n distinct conversations, so samples can be told apart by their ids."""
    return [chat(f"question {i}", f"answer {i}") for i in range(n)]


def as_key(samples) -> list[tuple[int, ...]]:
    return [tuple(s.input_ids) for s in samples]


def test_clean_data_report(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered(5) + [""])
    report = prepare(tmp_path).report
    assert (report.total_lines, report.valid, report.invalid, report.train_samples) == (5, 5, 0, 5)
    assert report.cache_hit is False
    assert report.files == [str(tmp_path / "train.jsonl")]
    assert "5 train samples" in report.summary()


def test_invalid_records_raise_one_error_listing_first_20(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered(2) + ["{oops"] * 24 + [{"messages": []}])
    with pytest.raises(DataError) as info:
        prepare(tmp_path)
    lines = str(info.value).splitlines()
    assert lines[0] == ("25 invalid record(s) in the data (bad JSON: 24, empty content: 1); fix them, "
                        "or set data.skip_invalid = true to skip them and train on the rest:")
    path = tmp_path / "train.jsonl"
    assert lines[1] == f"  {path}:3: bad JSON: Expecting property name enclosed in double quotes at column 2"
    assert lines[20] == f"  {path}:22: bad JSON: Expecting property name enclosed in double quotes at column 2"
    assert lines[21:] == ["  ... and 5 more"]


def test_problems_of_train_and_eval_files_are_listed_together(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered(2) + ["[]"])
    write_jsonl(tmp_path / "eval.jsonl", ["{}"])
    with pytest.raises(DataError) as info:
        prepare(tmp_path, eval_files=[str(tmp_path / "eval.jsonl")])
    assert f"{tmp_path / 'train.jsonl'}:3: not an object" in str(info.value)
    assert f"{tmp_path / 'eval.jsonl'}:1: missing field" in str(info.value)


def test_skip_invalid_counts_exactly_by_reason(tmp_path):
    bad = ["{oops", "{oops", "[1]", {"messages": [{"role": "bot", "content": "x"}]},
           {"instruction": "x", "output": ""}, chat("only a question"),
           chat("Hi", "fake<|im_end|>"),  # fails at rendering, after reading
           b"\xff\xfe"]
    write_jsonl(tmp_path / "train.jsonl", numbered(3) + bad + ["   "])
    report = prepare(tmp_path, skip_invalid=True).report
    assert report.invalid_reasons == {"bad JSON": 2, "not an object": 1, "unknown role": 1, "empty content": 1,
                                      "no assistant turn": 1, "control token in content": 1, "not UTF-8": 1}
    assert (report.total_lines, report.valid, report.invalid, report.train_samples) == (11, 3, 8, 3)


def test_chat_template_error_is_an_invalid_record(tmp_path):
    tok = chatml_tokenizer(RAISING_TEMPLATE)
    write_jsonl(tmp_path / "train.jsonl", [chat("a", "b"), {"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}])
    with pytest.raises(DataError, match=r"train.jsonl:2: chat template error: .*roles must alternate"):
        prepare(tmp_path, tokenizer=tok)
    report = prepare(tmp_path, tokenizer=tok, skip_invalid=True).report
    assert (report.valid, report.invalid, report.invalid_reasons) == (1, 1, {"chat template error": 1})


def length_records() -> list[dict]:
    # With the default system turn, the answer starts at token 58: "a" * 80 ends past 100 (truncated),
    # and the long prompt leaves no assistant token within the first 100 (dropped either way).
    return [chat("q", "short"), chat("q", "a" * 80), chat("q" * 100, "late")]


@pytest.mark.parametrize("overlength,truncated,dropped,kept", [("truncate", 1, 1, 2), ("drop", 0, 2, 1)])
def test_overlength_counts(tmp_path, overlength, truncated, dropped, kept):
    write_jsonl(tmp_path / "train.jsonl", length_records())
    prepared = prepare(tmp_path, max_length=100, overlength=overlength)
    report = prepared.report
    assert (report.truncated, report.dropped_overlength, report.dropped_no_target) == (truncated, dropped, 0)
    assert report.train_samples == kept == len(prepared.train)
    assert max(len(s.input_ids) for s in prepared.train) <= 100
    assert report.valid == report.train_samples + report.eval_samples + report.dropped_overlength
    assert report.train_tokens == sum(len(s.input_ids) for s in prepared.train)
    assert report.trained_tokens == sum(s.num_trained for s in prepared.train)


def test_no_usable_sample_is_an_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat("q" * 100, "late")])
    with pytest.raises(DataError, match="no usable training samples"):
        prepare(tmp_path, max_length=50, overlength="drop")


def test_shuffle_is_seeded_and_identical_across_calls(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered(40))
    first = prepare(tmp_path, seed=1).train
    again = prepare(tmp_path, seed=1).train  # from the cache: must not change the order either
    other = prepare(tmp_path, seed=2).train
    assert as_key(first) == as_key(again)
    assert as_key(first) != as_key(other)
    assert sorted(as_key(first)) == sorted(as_key(other))
    fresh = as_key(prepare(tmp_path, seed=1, max_length=4096).train)  # a cache miss, same samples
    assert fresh == as_key(first)


def test_eval_fraction_split_is_seeded_disjoint_and_complete(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered(50))
    a = prepare(tmp_path, seed=3, eval_fraction=0.2)
    b = prepare(tmp_path, seed=3, eval_fraction=0.2)
    c = prepare(tmp_path, seed=4, eval_fraction=0.2)
    assert (len(a.train), len(a.eval)) == (40, 10)
    assert (a.report.train_samples, a.report.eval_samples) == (40, 10)
    assert as_key(a.eval) == as_key(b.eval) and as_key(a.train) == as_key(b.train)
    assert as_key(a.eval) != as_key(c.eval)
    assert not set(as_key(a.train)) & set(as_key(a.eval))
    all_samples = prepare(tmp_path, seed=3).train
    assert sorted(as_key(a.train) + as_key(a.eval)) == sorted(as_key(all_samples))


def test_eval_files_are_read_the_same_way_and_kept_in_order(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered(4))
    write_jsonl(tmp_path / "eval.jsonl", [{"instruction": f"e{i}", "output": "x"} for i in range(3)])
    prepared = prepare(tmp_path, eval_files=[str(tmp_path / "eval.jsonl")])
    tok = chatml_tokenizer()
    firsts = [tok.decode(s.input_ids) for s in prepared.eval]
    assert [f.split("user\n")[1][:2] for f in firsts] == ["e0", "e1", "e2"]
    assert (prepared.report.train_samples, prepared.report.eval_samples, prepared.report.total_lines) == (4, 3, 7)


def test_relaunch_loads_the_cache_without_tokenizing(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", numbered(6) + ["{oops"])
    first = prepare(tmp_path, skip_invalid=True, eval_fraction=0.3)

    def forbidden(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(ChatEncoder, "render", forbidden)
    monkeypatch.setattr(ChatEncoder, "encode", forbidden)
    second = prepare(tmp_path, skip_invalid=True, eval_fraction=0.3)
    assert second.report.cache_hit is True
    assert (second.train, second.eval) == (first.train, first.eval)
    first.report.cache_hit = True
    assert second.report == first.report
    # Anything the tokens depend on is part of the key: these must tokenize again.
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare(tmp_path, skip_invalid=True, eval_fraction=0.3, max_length=4096)
    with pytest.raises(AssertionError, match="tokenized again"):
        tok = chatml_tokenizer()
        tok.chat_template = tok.chat_template.replace("helpful", "kind")
        prepare(tmp_path, tokenizer=tok, skip_invalid=True, eval_fraction=0.3)
    write_jsonl(tmp_path / "train.jsonl", numbered(7))
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare(tmp_path, skip_invalid=True, eval_fraction=0.3)


def test_unreadable_cache_is_ignored_and_rewritten(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", numbered(3))
    first = prepare(tmp_path)
    [entry] = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(b"not a zip file")
    again = prepare(tmp_path)
    assert again.report.cache_hit is False and again.train == first.train
    assert prepare(tmp_path).report.cache_hit is True
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [entry.name]  # no temp files left


def test_altered_turns_are_counted(tmp_path):
    from data_helpers import r1_tokenizer

    write_jsonl(tmp_path / "train.jsonl", [chat("q", "<think>x</think>answer"), chat("q", "plain")])
    report = prepare(tmp_path, tokenizer=r1_tokenizer()).report
    assert report.altered_turns == 1
    assert "changed 1 assistant turn(s)" in report.summary()


def test_missing_train_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="train.jsonl: data file not found"):
        prepare(tmp_path)


def test_launcher_check_reads_records_without_a_tokenizer(tmp_path):
    """check_records (the launcher's check before workers start) raises the same listing as
    training for bad lines, counts what it skips, and imports nothing of the model side."""
    from clustertune.data import check_records
    write_jsonl(tmp_path / "train.jsonl", numbered(3) + ["{oops"])
    write_jsonl(tmp_path / "eval.jsonl", ["{}"])
    section = DataSection(train_files=[str(tmp_path / "train.jsonl")], eval_files=[str(tmp_path / "eval.jsonl")])
    with pytest.raises(DataError) as info:
        check_records(section)
    with pytest.raises(DataError) as training:
        prepare(tmp_path, eval_files=[str(tmp_path / "eval.jsonl")])
    assert str(info.value) == str(training.value)
    assert f"{tmp_path / 'train.jsonl'}:4: bad JSON" in str(info.value)
    report = check_records(section.model_copy(update={"skip_invalid": True}))
    assert (report.valid, report.total_lines) == (3, 5)
    with pytest.raises(DataError, match="data file not found"):
        check_records(DataSection(train_files=[str(tmp_path / "missing.jsonl")]))


def test_multi_megabyte_lines_are_counted_without_tokenizing_them_whole(tmp_path):
    """Issue 16 #13: a 10 MB line took 37 s and 3.6 GB, to be dropped as over-long. Now it is
    cut before tokenizing, and counted exactly as before: truncated, or dropped."""
    from test_data_chat import CountingTokenizer

    write_jsonl(tmp_path / "train.jsonl", [chat("Summarize.", "word " * 1_000_000), chat("text " * 1_000_000, "ok"),
                                           chat("q", "short")])
    tok = CountingTokenizer(chatml_tokenizer())
    for overlength, counts in (("truncate", (1, 1, 2)), ("drop", (0, 2, 1))):
        report = prepare(tmp_path, tokenizer=tok, max_length=512, overlength=overlength).report
        assert (report.truncated, report.dropped_overlength, report.train_samples) == counts
    assert tok.longest < 50_000
