"""The data pipeline's value types: what the worker receives and what the user is shown."""

from __future__ import annotations

from dataclasses import dataclass, field

from clustertune.errors import UserError

IGNORE_INDEX = -100  # the target of a token that carries no loss (PyTorch cross_entropy's ignore_index)


class DataError(UserError):
    """Data that cannot be used. The message is shown to the user as-is (file:line and reason)."""


@dataclass(frozen=True)
class Sample:
    """One tokenized conversation.

    `targets` is pre-shifted so the worker never shifts: targets[i] is the token the model must
    predict after reading input_ids[:i+1], i.e. input_ids[i+1] when that token belongs to an
    assistant turn, else IGNORE_INDEX. targets[-1] is always IGNORE_INDEX.
    """

    input_ids: list[int]
    targets: list[int]

    @property
    def num_trained(self) -> int:
        return len(self.targets) - self.targets.count(IGNORE_INDEX)  # list.count runs in C


@dataclass(frozen=True)
class PreferencePair:
    """One tokenized preference pair (train.objective = "dpo"): the prompt + chosen completion
    and the prompt + rejected completion, each a Sample whose trained tokens are exactly its
    completion's. The pair is the unit of batching: it is never split over micro-batches or
    ranks, and packed, chosen and rejected are two segments of the same row.

    `input_ids`, `targets` and `num_trained` are those of the two segments end to end (what
    packing, the step plan and the data report count)."""

    chosen: Sample
    rejected: Sample

    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def targets(self) -> list[int]:
        return self.chosen.targets + self.rejected.targets

    @property
    def num_trained(self) -> int:
        return self.chosen.num_trained + self.rejected.num_trained

    @property
    def key(self) -> str:
        """sha256 of both segments' tokens and trained positions: what the stored reference
        log-probs are keyed by (the same pair tokenized the same way has the same key)."""
        import hashlib
        import json
        parts = [(s.input_ids, [t != IGNORE_INDEX for t in s.targets]) for s in (self.chosen, self.rejected)]
        return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


@dataclass
class DataReport:
    """Exact counts of what happened to every record.

    Invariants: total_lines = valid + invalid (blank lines are not records and are not counted);
    valid = train_samples + eval_samples + dropped_overlength + dropped_no_target.
    """

    files: list[str]
    total_lines: int = 0
    valid: int = 0
    invalid: int = 0
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # kept, cut to max_length
    dropped_overlength: int = 0  # over max_length and dropped (policy "drop", or nothing trained left)
    dropped_no_target: int = 0  # no assistant token survived the chat template
    train_samples: int = 0
    eval_samples: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0
    cache_hit: bool = False
    # Assistant turns that the chat template rendered differently from their content (DeepSeek-R1's
    # template removes everything up to `</think>`): the loss sees the rendering, so say so.
    altered_turns: int = 0
    # "file xW: n -> m samples" per train file, when data.train_files gives any weight but 1.
    weighting: list[str] = field(default_factory=list)

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.invalid_reasons.items()))
        lines = [
            f"data: {len(self.files)} file(s), {self.total_lines} records: {self.valid} valid, "
            f"{self.invalid} invalid skipped" + (f" ({reasons})" if reasons else ""),
            f"data: {self.truncated} truncated to max_length, {self.dropped_overlength} over-long dropped, "
            f"{self.dropped_no_target} dropped with no assistant tokens",
            f"data: {self.train_samples} train samples ({self.train_tokens} tokens, {self.trained_tokens} "
            f"trained), {self.eval_samples} eval samples; tokenized cache {'hit' if self.cache_hit else 'miss'}",
        ]
        if self.weighting:
            lines.append("data: file weights: " + "; ".join(self.weighting))
        if self.altered_turns:
            lines.append(f"data: warning: the chat template changed {self.altered_turns} assistant turn(s) "
                         "(e.g. removed <think>...</think>); the loss is on the rendered text")
        return "\n".join(lines)


@dataclass
class PreparedData:
    train: list[Sample]  # filtered, then shuffled with the seed: identical on every process
    eval: list[Sample]  # in file order
    report: DataReport
