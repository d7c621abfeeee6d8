"""Preference-pair data (train.objective = "dpo"): the record shapes users bring, file:line errors
before any worker starts, completion-only trained tokens, pairs kept or dropped whole, the cache,
and the recipe keys.

    python -m pytest tests/unit/test_dpo_data.py -q
"""

from __future__ import annotations

import pytest
from data_helpers import chatml_tokenizer, write_jsonl

from clustertune.config import DataSection, RecipeError, recipe_from_dict
from clustertune.data import DataError, check_records, prepare_dataset
from clustertune.data.preference import record_to_pair
from clustertune.data.records import RecordError
from clustertune.data.types import IGNORE_INDEX, PreferencePair

U = {"role": "user", "content": "reverse: abc"}


def A(text):
    return {"role": "assistant", "content": text}


def test_prompt_and_string_completions():
    pair = record_to_pair({"prompt": "reverse: abc", "chosen": "cba", "rejected": "cab", "id": 3})
    assert pair.prompt == [U] and pair.chosen == [A("cba")] and pair.rejected == [A("cab")]


def test_prompt_as_messages_and_completions_as_message_lists():
    system = {"role": "system", "content": "be exact"}
    for key in ("prompt", "messages"):
        pair = record_to_pair({key: [system, U], "chosen": [A("cba")], "rejected": A("cab")})
        assert pair.prompt == [system, U] and pair.chosen == [A("cba")] and pair.rejected == [A("cab")]


def test_whole_conversations_share_their_prompt():
    multi = [U, A("cba"), {"role": "user", "content": "again"}]
    pair = record_to_pair({"chosen": multi + [A("cba")], "rejected": multi + [A("abc")]})
    assert pair.prompt == multi and pair.chosen == [A("cba")] and pair.rejected == [A("abc")]
    # A shared assistant turn right before the difference belongs to both completions.
    pair = record_to_pair({"chosen": [U, A("x"), A("y")], "rejected": [U, A("x"), A("z")]})
    assert pair.prompt == [U] and pair.chosen == [A("x"), A("y")]


@pytest.mark.parametrize("record,kind,words", [
    ({"prompt": "p", "chosen": "a"}, "missing field", "'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "identical pair", "same completion"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score": 1}, "unknown key", "'score'"),
    ({"prompt": "p", "messages": [U], "chosen": "a", "rejected": "b"}, "unknown key", "prompt once"),
    ({"prompt": [U, A("x")], "chosen": "a", "rejected": "b"}, "bad prompt", "end with a user message"),
    ({"prompt": "p", "chosen": [U], "rejected": "b"}, "bad completion", "chosen[0] is a user message"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong type", "'chosen' must be a string"),
    ({"chosen": "a", "rejected": "b"}, "missing field", "whole conversations"),
    ({"chosen": [U, A("a")], "rejected": [{"role": "user", "content": "other"}, A("b")]}, "bad prompt",
     "share no prompt"),
    ({"chosen": [U, A("a")], "rejected": [U, A("a")]}, "identical pair", "same conversation"),
    ({"chosen": [U, A("a")], "rejected": [U, A("b"), U]}, "bad completion", "rejected[2] is a user message"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty content", "chosen is empty"),
])
def test_invalid_records_say_which_field_and_why(record, kind, words):
    with pytest.raises(RecordError) as err:
        record_to_pair(record)
    assert err.value.kind == kind and words in err.value.detail


def test_the_launcher_check_lists_bad_pairs_as_file_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a"},
        {"messages": [U], "chosen": "x", "rejected": "x"},
    ])
    data = DataSection(train_files=[str(path)], max_length=64)
    with pytest.raises(DataError) as err:
        check_records(data, "dpo")
    text = str(err.value)
    assert f"{path}:2: missing field" in text and f"{path}:3: identical pair" in text
    assert check_records(data.model_copy(update={"skip_invalid": True}), "dpo").valid == 1
    # The SFT check reads the same file as conversations and refuses it.
    with pytest.raises(DataError):
        check_records(data)


def trained_text(tokenizer, sample):
    return tokenizer.decode([t for t in sample.targets if t != IGNORE_INDEX])


def test_only_completion_tokens_are_trained_and_pairs_are_kept_whole(tmp_path):
    tokenizer = chatml_tokenizer()
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": [U, A("earlier"), {"role": "user", "content": "now"}, A("good")],
         "rejected": [U, A("earlier"), {"role": "user", "content": "now"}, A("bad")]},
        {"prompt": "short", "chosen": "fits", "rejected": "x" * 400},  # rejected too long: the pair goes
    ])
    data = DataSection(train_files=[str(path)], max_length=256, overlength="drop")
    prepared = prepare_dataset(data, tokenizer, seed=0, cache_dir=tmp_path / "cache", log=lambda *_: None,
                               objective="dpo")
    assert len(prepared.train) == 1 and isinstance(prepared.train[0], PreferencePair)
    pair = prepared.train[0]
    assert trained_text(tokenizer, pair.chosen) == "good<|im_end|>"  # not the earlier assistant turn
    assert trained_text(tokenizer, pair.rejected) == "bad<|im_end|>"
    assert prepared.report.dropped_overlength == 1 and prepared.report.train_samples == 1
    again = prepare_dataset(data, tokenizer, seed=0, cache_dir=tmp_path / "cache", log=lambda *_: None,
                            objective="dpo")
    assert again.report.cache_hit and again.train == prepared.train and again.train[0].key == pair.key


def test_pair_key_depends_on_tokens_and_trained_positions():
    from clustertune.data.types import Sample
    a = PreferencePair(Sample([1, 2, 3], [-100, 3, -100]), Sample([1, 2, 4], [-100, 4, -100]))
    b = PreferencePair(Sample([1, 2, 3], [2, 3, -100]), Sample([1, 2, 4], [-100, 4, -100]))
    assert a.key == PreferencePair(a.chosen, a.rejected).key and a.key != b.key


def recipe(**train):
    return {"data": {"train_files": ["x.jsonl"], "max_length": 64, "packing": True},
            "train": {"max_steps": 1, **train}}


def test_recipe_objective_key():
    assert recipe_from_dict(recipe()).train.objective == "sft"
    r = recipe_from_dict({**recipe(objective="dpo", micro_batch_tokens=128), "dpo": {"beta": 0.2}})
    assert r.train.objective == "dpo" and r.dpo.beta == 0.2 and r.dpo.label_smoothing == 0.0
    with pytest.raises(RecipeError, match="objective"):
        recipe_from_dict(recipe(objective="ppo"))
    with pytest.raises(RecipeError, match=r"2 x data.max_length \(128\)"):
        recipe_from_dict(recipe(objective="dpo", micro_batch_tokens=100))
    with pytest.raises(RecipeError, match="label_smoothing"):
        recipe_from_dict({**recipe(objective="dpo", micro_batch_tokens=128), "dpo": {"label_smoothing": 0.5}})
