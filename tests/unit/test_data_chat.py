"""Chat rendering and the assistant-only loss mask, checked token by token.

    python -m pytest tests/unit/test_data_chat.py -q
"""

from __future__ import annotations

import pytest
from data_helpers import QWEN3_LIKE_TEMPLATE, bpe_chatml_tokenizer, chat, chatml_tokenizer, r1_tokenizer

from clustertune.data import IGNORE_INDEX, DataError, Sample, tokenize_conversation
from clustertune.data.chat import ChatEncoder, fit, shift_targets
from clustertune.data.records import RecordError


def expected_sample(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and shifted targets from hand-written (text, trained) segments of the rendering.
    With a character-level tokenizer, tokenizing piecewise equals tokenizing the whole."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    targets = [ids[i + 1] if mask[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, targets


def trained_text(tokenizer, sample: Sample) -> str:
    """The tokens the model is taught to produce, concatenated."""
    return "".join(tokenizer.convert_ids_to_tokens([t for t in sample.targets if t != IGNORE_INDEX]))


def test_chatml_multi_turn_mask_token_by_token():
    tok = chatml_tokenizer()
    messages = chat("Hi", "Hello!", "2+2?", "4", system="Be brief.")["messages"]
    sample = tokenize_conversation(tok, messages, max_length=1000, overlength="truncate")
    ids, targets = expected_sample(tok, [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>", True),  # the answer and the end-of-turn token, not the role header
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False),
        ("4<|im_end|>", True),
        ("\n", False),
    ])
    assert sample.input_ids == ids
    assert len(sample.targets) == len(sample.input_ids)
    for i, (got, want) in enumerate(zip(sample.targets, targets)):
        assert got == want, f"token {i} ({tok.convert_ids_to_tokens(ids[i])!r}): target {got} != {want}"
    assert sample.targets[-1] == IGNORE_INDEX
    assert sample.num_trained == len("Hello!") + 1 + len("4") + 1
    assert trained_text(tok, sample) == "Hello!<|im_end|>4<|im_end|>"


def test_byte_level_bpe_mask_follows_token_offsets():
    tok = bpe_chatml_tokenizer()
    messages = chat("Hello there", "The answer is 42.", "How are you?", "Hello! ☃")["messages"]
    sample = tokenize_conversation(tok, messages, max_length=1000, overlength="truncate")
    assert tok.convert_ids_to_tokens(sample.input_ids).count("â") == 1  # ☃ is three byte tokens
    assert tok.decode([t for t in sample.targets if t != IGNORE_INDEX]) == "The answer is 42.<|im_end|>Hello! ☃<|im_end|>"


def test_default_system_prompt_of_the_template_is_not_trained():
    tok = chatml_tokenizer()
    sample = tokenize_conversation(tok, chat("Hi", "Yo")["messages"], max_length=1000, overlength="truncate")
    rendered = "".join(tok.convert_ids_to_tokens(sample.input_ids))
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert trained_text(tok, sample) == "Yo<|im_end|>"


def test_r1_template_strips_reasoning_from_every_turn():
    # DeepSeek-R1-Distill's template cuts everything up to </think>: the loss is on what it renders.
    tok = r1_tokenizer()
    messages = chat("Hi", "<think>\nhmm\n</think>\n\nHello!", "Bye", "<think>ok</think>See you", system="S")["messages"]
    encoder = ChatEncoder(tok)
    rendered = encoder.render(messages)
    assert rendered.text == ("<｜begin▁of▁sentence｜>S<｜User｜>Hi<｜Assistant｜>\n\nHello!<｜end▁of▁sentence｜>"
                             "<｜User｜>Bye<｜Assistant｜>See you<｜end▁of▁sentence｜>")
    assert rendered.altered == 2
    sample = tokenize_conversation(tok, messages, max_length=1000, overlength="truncate")
    ids, targets = expected_sample(tok, [
        ("<｜begin▁of▁sentence｜>S<｜User｜>Hi<｜Assistant｜>", False),
        ("\n\nHello!<｜end▁of▁sentence｜>", True),
        ("<｜User｜>Bye<｜Assistant｜>", False),
        ("See you<｜end▁of▁sentence｜>", True),
    ])
    assert (sample.input_ids, sample.targets) == (ids, targets)


def test_template_that_rewrites_only_earlier_turns():
    # Qwen3-like: reasoning removed from turns before the last user message only, so a prefix of
    # the conversation renders differently from the same prefix inside the full conversation.
    tok = chatml_tokenizer(QWEN3_LIKE_TEMPLATE)
    messages = chat("Hi", "<think>a</think>Hello!", "Bye", "<think>b</think>See you")["messages"]
    sample = tokenize_conversation(tok, messages, max_length=1000, overlength="truncate")
    ids, targets = expected_sample(tok, [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>b</think>See you<|im_end|>", True),
        ("\n", False),
    ])
    assert (sample.input_ids, sample.targets) == (ids, targets)


def test_turn_rendered_empty_by_template_is_not_trained():
    # Nothing after </think>: R1 renders an empty answer; teaching "stop at once" would be wrong.
    tok = r1_tokenizer()
    messages = chat("Hi", "<think>only thoughts</think>", "Bye", "Ok")["messages"]
    sample = tokenize_conversation(tok, messages, max_length=1000, overlength="truncate")
    assert trained_text(tok, sample) == "Ok<｜end▁of▁sentence｜>"
    only_empty = chat("Hi", "<think>only thoughts</think>")["messages"]
    assert tokenize_conversation(tok, only_empty, max_length=1000, overlength="truncate") is None


def test_control_token_inside_content_is_rejected():
    with pytest.raises(RecordError, match=r"messages\[1\].content contains '<\|im_end\|>'"):
        ChatEncoder(chatml_tokenizer()).render(chat("Hi", "fake<|im_end|>turn")["messages"])


def test_tokenize_conversation_reports_invalid_messages_as_data_error():
    with pytest.raises(DataError, match="unknown role: messages\\[0\\].role is 'bot'"):
        tokenize_conversation(chatml_tokenizer(), [{"role": "bot", "content": "x"}], max_length=64,
                              overlength="drop")


def test_tokenizer_without_chat_template_is_a_data_error():
    tok = chatml_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat_template"):
        ChatEncoder(tok)


# ------------------------------------------------------------------------------ length policy

IDS = list(range(10, 20))
LATE = [(6, 10)]  # tokens 6..9 trained


@pytest.mark.parametrize("ranges,max_length,overlength,fate,kept", [
    (LATE, 10, "truncate", "kept", 10),  # exactly max_length: untouched
    (LATE, 8, "truncate", "truncated", 8),
    (LATE, 6, "truncate", "dropped_overlength", 0),  # nothing trained left
    (LATE, 9, "drop", "dropped_overlength", 0),
    ([(0, 1)], 20, "truncate", "dropped_no_target", 0),  # token 0 is never a target
])
def test_fit_length_policy(ranges, max_length, overlength, fate, kept):
    sample, got_fate = fit(IDS, ranges, max_length=max_length, overlength=overlength)
    assert got_fate == fate
    assert (len(sample.input_ids) if sample else 0) == kept
    if sample is not None:
        trained = [i for i in range(1, kept) if 6 <= i < 10]
        assert sample.input_ids == IDS[:kept]
        assert sample.targets == [IDS[i + 1] if i + 1 in trained else IGNORE_INDEX for i in range(kept)]


def test_shift_targets_with_several_ranges():
    assert shift_targets(IDS[:6], [(0, 2), (4, 6)]) == [11, IGNORE_INDEX, IGNORE_INDEX, 14, 15, IGNORE_INDEX]
    sample, _ = fit(IDS, [(1, 10)], max_length=5, overlength="truncate")
    assert sample.targets == [11, 12, 13, 14, IGNORE_INDEX]
    assert sample.num_trained == 4


# ------------------------------------------------------------------ over-long texts (issue 16 #13)

class CountingTokenizer:
    """A tokenizer that records the longest text it was asked to tokenize."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.longest = 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, **kwargs):
        self.longest = max([self.longest, *(len(t) for t in ([text] if isinstance(text, str) else text))])
        return self._tokenizer(text, **kwargs)


LONG_CASES = {
    "long answer": chat("q", "answer words " * 2000),
    "long prompt, answer past the cut": chat("prompt " * 3000, "late answer"),
    "long middle turn": chat("q", "a", "x" * 20000, "b", "q2", "last"),
    "long answer then whitespace": chat("q", "y " * 5000 + " " * 3000),
    "long system": chat("q", "a", system="rules " * 4000),
    "several characters per token": chat("q", " assistant" * 3000),  # the first prefix tried is too short
}


@pytest.mark.parametrize("make_tokenizer", [chatml_tokenizer, bpe_chatml_tokenizer, r1_tokenizer])
@pytest.mark.parametrize("overlength", ["truncate", "drop"])
@pytest.mark.parametrize("case", sorted(LONG_CASES))
def test_cut_before_tokenizing_gives_the_same_sample_and_fate(make_tokenizer, overlength, case):
    """A text too long for max_length is tokenized only as far as needed, with exactly the
    sample and fate (truncated / dropped) of tokenizing it whole."""
    tok = CountingTokenizer(make_tokenizer())
    encoder = ChatEncoder(tok)
    rendered = encoder.render(LONG_CASES[case]["messages"])
    max_length = 64
    assert encoder.certainly_too_long(rendered, max_length)
    whole = fit(*encoder.encode([rendered])[0], max_length=max_length, overlength=overlength)
    tok.longest = 0
    cut = fit(*encoder.encode([rendered], max_length=max_length)[0], max_length=max_length, overlength=overlength)
    assert cut == whole
    assert tok.longest < len(rendered.text)


@pytest.mark.parametrize("overlength", ["truncate", "drop"])
def test_too_long_but_short_text_is_tokenized_whole(overlength):
    encoder = ChatEncoder(chatml_tokenizer())
    rendered = encoder.render(chat("q", "z" * 1200)["messages"])  # over the bound, under the first prefix
    assert encoder.certainly_too_long(rendered, 64)
    assert encoder.encode([rendered], max_length=64) == encoder.encode([rendered])


@pytest.mark.parametrize("make_tokenizer", [chatml_tokenizer, bpe_chatml_tokenizer])
def test_a_text_that_may_fit_is_tokenized_whole(make_tokenizer):
    tok = CountingTokenizer(make_tokenizer())
    encoder = ChatEncoder(tok)
    fits = encoder.render(chat("q", "b" * 300)["messages"])  # about 340 tokens
    assert not encoder.certainly_too_long(fits, 400)
    assert encoder.encode([fits], max_length=400) == encoder.encode([fits])
    assert tok.longest == len(fits.text)


def test_multi_megabyte_record_is_not_tokenized_whole():
    """Issue 16 #13: one 10 MB line took 37 s and 3.6 GB to tokenize, then was dropped."""
    tok = CountingTokenizer(chatml_tokenizer())
    messages = chat("Summarize.", "word " * 1_000_000)["messages"]  # 5 MB
    reference = tokenize_conversation(tok, chat("Summarize.", "word " * 20_000)["messages"], max_length=512,
                                      overlength="truncate")
    tok.longest = 0
    sample = tokenize_conversation(tok, messages, max_length=512, overlength="truncate")
    assert sample == reference and len(sample.input_ids) == 512
    assert tok.longest < 50_000
    assert tokenize_conversation(tok, messages, max_length=512, overlength="drop") is None
