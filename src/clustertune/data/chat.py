"""Chat rendering with the tokenizer's own template, and the assistant-only loss mask.

The template is code we do not control (it may add a default system prompt, or rewrite
assistant turns: DeepSeek-R1's removes everything up to `</think>`, Qwen3's only in turns before
the last user message), so nothing here assumes what it prints. Instead:

1. Render the whole conversation once: that text is what the model is trained on.
2. Find each assistant turn's character span *in that text*. Fast path: render again with each
   assistant content replaced by a unique marker, and accept the result only if putting the real
   contents back in reproduces the text exactly. Otherwise (the template altered a turn), per
   assistant turn: render with only that content replaced, and the span is where the two
   renderings differ (longest common prefix and suffix). Either way the span is located in the
   final rendering, never in a rendering of a prefix of the conversation.
3. Tokenize the text with offsets; a token is trained if it overlaps a span (so a token that
   straddles the edge, e.g. Qwen's "\n\n" joining the header's newline to a content that starts
   with one, is trained rather than losing content). The end-of-turn control token right after
   the span (`<|im_end|>`, `<｜end▁of▁sentence｜>`, `<|eot_id|>`) is trained too, so the model
   learns to stop; the role header before the span is not.

Over-long texts are cut before tokenizing (a 10 MB record took 37 s and 3.6 GB to tokenize, only
to keep max_length tokens of it): see ChatEncoder.encode. Rendering and span finding stay on the
whole text (they are string operations, and a template may rewrite a turn depending on text far
beyond the cut), so only the tokenizer sees a prefix.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Any

from clustertune.data.records import Message, RecordError, validate_messages
from clustertune.data.types import IGNORE_INDEX, DataError, Sample

OVERLENGTH = ("truncate", "drop")
# A cut text's tokens that end at least this many characters before the cut are taken as the
# whole text's: tokenizers decide a token from its pre-token (a word, a run of spaces) and merges
# within it, so text this far beyond cannot change it.
STABLE_MARGIN = 1024
_CHARS_PER_TOKEN_GUESS = 8  # the first prefix tried; it grows 4x until enough tokens are stable
# How much a normalizer may shrink text (NFC/NFKC compose at most 3 code points into one: Hangul
# jamo), for the bound on characters per token.
_NORMALIZER_SHRINK = 3
# Marker for an assistant content in the diff renderings: a character no real text starts or ends
# with, so the common prefix/suffix stop exactly at the content's edges.
_MARK = "\x00"

Span = tuple[int, int]  # characters [start, end)
Range = tuple[int, int]  # tokens [start, stop)


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[Span]  # one per assistant message, in order; may be empty (start == end)
    altered: int  # assistant turns whose rendering differs from their content


class ChatEncoder:
    """What one tokenizer needs for rendering and masking, computed once per dataset."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer: the loss mask needs "
                            "token character offsets. Load the tokenizer with use_fast=True.")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat_template: the data is rendered with the model's own "
                            "template, so use a tokenizer (model directory) that ships one")
        self.tokenizer = tokenizer
        controls = _control_tokens(tokenizer)
        self.control_ids = frozenset(tokenizer.convert_tokens_to_ids(sorted(controls)))
        # Longest first, so that a control token is reported by its full name. An empty pattern
        # would match every text, hence None when the tokenizer has no control tokens.
        pattern = "|".join(re.escape(t) for t in sorted(controls, key=len, reverse=True) if t)
        self._control_re = re.compile(pattern) if pattern else None
        self.max_token_chars = _max_token_chars(tokenizer)

    def render(self, messages: list[Message]) -> Rendered:
        """Render a validated conversation and locate its assistant spans (RecordError if unusable)."""
        self._check_no_control_tokens(messages)
        text = self._apply(messages)
        spans = self._spans_by_markers(messages, text)
        if spans is not None:
            return Rendered(text, spans, altered=0)
        spans = [self._span_by_diff(messages, i, text) for i, m in enumerate(messages) if m["role"] == "assistant"]
        contents = [m["content"] for m in messages if m["role"] == "assistant"]
        altered = sum(text[s:e] != c for (s, e), c in zip(spans, contents, strict=True))
        return Rendered(text, spans, altered)

    def encode(self, batch: list[Rendered], max_length: int | None = None) -> list[tuple[list[int], list[Range]]]:
        """Token ids and trained token ranges; one tokenizer call for the batch (Rust-parallel).

        With max_length, a text too long to have at most max_length tokens (more characters
        than max_length + 1 tokens can cover, see certainly_too_long) is tokenized only as far
        as needed: the result is the first tokens of the whole text (at least max_length + 1)
        with ranges that give `fit` the same sample and fate as the whole text would. A text
        that may fit is always tokenized whole, so its sample never changes."""
        long = {i for i, r in enumerate(batch) if max_length is not None and self.certainly_too_long(r, max_length)}
        short = [r for i, r in enumerate(batch) if i not in long]
        encoded = iter(self._encode_whole(short))
        return [self._encode_prefix(r, max_length) if i in long else next(encoded)  # type: ignore[arg-type]
                for i, r in enumerate(batch)]

    def certainly_too_long(self, rendered: Rendered, max_length: int) -> bool:
        """True when the text has more than max_length tokens whatever they are: no token
        covers more characters than the vocabulary's longest entry (its length in bytes for a
        byte-level BPE, where a character is one byte or more; in characters otherwise)."""
        return len(rendered.text) > (max_length + 1) * self.max_token_chars

    def _encode_whole(self, batch: list[Rendered]) -> list[tuple[list[int], list[Range]]]:
        if not batch:
            return []
        enc = self.tokenizer([r.text for r in batch], add_special_tokens=False,
                             return_offsets_mapping=True, verbose=False)
        return [(ids, self._trained_ranges(ids, offsets, r)) for ids, offsets, r in  # type: ignore[misc]
                zip(enc["input_ids"], enc["offset_mapping"], batch, strict=True)]

    def _encode_prefix(self, rendered: Rendered, max_length: int) -> tuple[list[int], list[Range]]:
        """Tokenize a growing prefix until max_length + 1 of its tokens end STABLE_MARGIN
        characters before the cut, and every trained range that matters is decided there."""
        text = rendered.text
        size = (max_length + 1) * _CHARS_PER_TOKEN_GUESS + STABLE_MARGIN
        while size < len(text):
            enc = self.tokenizer(text[:size], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            offsets = enc["offset_mapping"]
            stable = bisect.bisect_right([end for _, end in offsets], size - STABLE_MARGIN)
            if stable > max_length:
                ids = enc["input_ids"][:stable]
                ranges = self._trained_ranges(ids, offsets[:stable], rendered, whole=False)
                if ranges is not None:
                    return ids, ranges
            size *= 4
        return self._encode_whole([rendered])[0]

    # ------------------------------------------------------------------------------ rendering

    def _apply(self, messages: list[Message]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # the template is foreign code: any failure is this record's problem
            raise RecordError("chat template error", f"{type(err).__name__}: {err}") from None

    def _check_no_control_tokens(self, messages: list[Message]) -> None:
        # "<|im_end|>" typed inside a message would be tokenized as a real turn boundary.
        if self._control_re is None:
            return
        for i, message in enumerate(messages):
            found = self._control_re.search(message["content"])
            if found:
                raise RecordError("control token in content", f"messages[{i}].content contains "
                                  f"{found.group()!r}, which the tokenizer reads as a control token")

    def _spans_by_markers(self, messages: list[Message], text: str) -> list[Span] | None:
        marks = {i: f"{_MARK}{i}{_MARK}" for i, m in enumerate(messages) if m["role"] == "assistant"}
        marked = self._apply([{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(messages)])
        spans: list[Span] = []
        pos = cursor = 0  # positions in `marked` and in `text`
        for i, mark in marks.items():
            at = marked.find(mark, pos)
            if at < 0 or marked.count(mark) != 1 or not text.startswith(marked[pos:at], cursor):
                return None
            start = cursor + at - pos
            content = messages[i]["content"]
            if not text.startswith(content, start):
                return None
            spans.append((start, start + len(content)))
            cursor, pos = start + len(content), at + len(mark)
        return spans if text[cursor:] == marked[pos:] else None

    def _span_by_diff(self, messages: list[Message], index: int, text: str) -> Span:
        other = self._apply([{**m, "content": _MARK} if i == index else m for i, m in enumerate(messages)])
        start = _common_prefix(text, other)
        return start, len(text) - _common_prefix(text[start:][::-1], other[start:][::-1])

    # ------------------------------------------------------------------------------ masking

    def _trained_ranges(self, ids: list[int], offsets: list[Span], rendered: Rendered,
                        whole: bool = True) -> list[Range] | None:
        """Trained token ranges [start, stop). For the first tokens of a cut text (whole=False):
        a range running past them ends at len(ids), one entirely past them is (len(ids),
        len(ids) + 1) (both beyond max_length, where fit clips them, and both say "this turn has
        trained tokens"), and None when a turn's end is not decided within them."""
        # Ranges, not per-token flags: bisection and slicing keep the per-token work in C.
        starts, ends = zip(*offsets) if offsets else ((), ())
        n = len(ids)
        ranges: list[Range] = []
        for start, end in rendered.spans:
            if not rendered.text[start:end].strip():
                continue  # the template printed nothing of this turn: do not teach an empty answer
            first = bisect.bisect_right(ends, start)  # first token ending after the span starts
            stop = bisect.bisect_left(starts, end)  # first token starting at or after its end
            if not whole and first >= n:
                ranges.append((n, n + 1))
                continue
            if not whole and stop >= n:
                ranges.append((first, n))
                continue
            last = self._end_of_turn(ids, offsets, rendered.text, stop, whole)
            if last is None:
                return None
            ranges.append((first, last))
        return sorted(ranges)

    def _end_of_turn(self, ids: list[int], offsets: list[Span], text: str, stop: int, whole: bool) -> int | None:
        """Extend a turn over the control token that closes it (and whitespace before it, which
        the model must produce too). If real text comes first, the template has no such token.
        None when the tokens of a cut text run out before either is seen."""
        k = stop
        while k < len(ids) and ids[k] not in self.control_ids and not text[offsets[k][0]:offsets[k][1]].strip():
            k += 1
        if k == len(ids) and not whole:
            return None
        return k + 1 if k < len(ids) and ids[k] in self.control_ids else stop


def _control_tokens(tokenizer: Any) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {t.content for t in added.values() if getattr(t, "special", False)} | set(tokenizer.all_special_tokens)


def _max_token_chars(tokenizer: Any) -> int:
    """The most characters of input one token can cover: the longest vocabulary entry (for a
    byte-level BPE its length is in bytes, at least the characters it covers), times what a
    normalizer may merge into one character."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    shrink = _NORMALIZER_SHRINK if backend is not None and backend.normalizer is not None else 1
    return max(1, longest) * shrink


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection on C-speed slice comparisons."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---------------------------------------------------------------------------------- samples

def fit(ids: list[int], ranges: list[Range], *, max_length: int, overlength: str) -> tuple[Sample | None, str]:
    """Apply the length policy to ids with trained token ranges [start, stop). Returns (sample or
    None, fate), fate one of "kept", "truncated", "dropped_overlength" (too long: policy drop, or
    truncation left no trained token) and "dropped_no_target" (nothing trained at full length)."""
    if overlength not in OVERLENGTH:
        raise ValueError(f"overlength must be one of {OVERLENGTH}, got {overlength!r}")
    if not _has_target(ranges):
        return None, "dropped_no_target"
    if len(ids) <= max_length:
        return Sample(ids, shift_targets(ids, ranges)), "kept"
    if overlength == "drop":
        return None, "dropped_overlength"
    ids = ids[:max_length]
    ranges = [(a, min(b, max_length)) for a, b in ranges if a < max_length]
    if not _has_target(ranges):
        return None, "dropped_overlength"
    return Sample(ids, shift_targets(ids, ranges)), "truncated"


def _has_target(ranges: list[Range]) -> bool:
    # Token 0 can never be a target: nothing precedes it.
    return any(b > max(a, 1) for a, b in ranges)


def shift_targets(ids: list[int], ranges: list[Range]) -> list[int]:
    """targets[i] = ids[i+1] where token i+1 is trained, else IGNORE_INDEX (so targets[-1] = IGNORE_INDEX)."""
    targets = [IGNORE_INDEX] * len(ids)
    for a, b in ranges:
        a = max(a, 1)
        targets[a - 1:b - 1] = ids[a:b]
    return targets


def tokenize_conversation(tokenizer: Any, messages: list[dict], *, max_length: int,
                          overlength: str) -> Sample | None:
    """One conversation -> Sample, or None when the length policy or the template leaves no
    trained token. Invalid messages raise DataError."""
    encoder = ChatEncoder(tokenizer)
    try:
        rendered = encoder.render(validate_messages(messages))
    except RecordError as err:
        raise DataError(str(err)) from None
    ids, ranges = encoder.encode([rendered], max_length=max_length)[0]
    return fit(ids, ranges, max_length=max_length, overlength=overlength)[0]
