"""From the recipe's data section to the samples every rank trains on.

    prepared = prepare_dataset(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=cache_dir)

Steps: hash the inputs -> load the tokenized cache, or read + validate every file (fail with one
error listing the problems unless skip_invalid), render + tokenize + apply the length policy, and
cache the result -> eval split (seeded) -> shuffle train (seeded).

Every process may call this: the result depends only on the inputs and the seed, so all ranks
get the identical list. On a cache miss each process tokenizes on its own; a caller that wants
only one to do it lets rank 0 go first and the others follow after a barrier (they hit the cache).
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clustertune.data import cache
from clustertune.data.chat import ChatEncoder, Rendered, fit
from clustertune.data.records import Problem, Record, RecordError, load_file
from clustertune.data.types import DataError, DataReport, PreparedData, Sample

if TYPE_CHECKING:
    from clustertune.config import DataSection

MAX_LISTED = 20  # problems listed in the error; the rest are counted
PROGRESS_MIN = 20_000  # show a progress bar from this many conversations
_CHUNK = 1024  # conversations per tokenizer call

Log = Callable[[str], None]
FileProblem = tuple[Path, Problem]


def prepare_dataset(data: DataSection, tokenizer: Any, *, seed: int, cache_dir: Path,
                    log: Log = print) -> PreparedData:
    train_files = _paths(data.train_files)
    eval_files = _paths(data.eval_files)
    settings = {"format": data.format, "max_length": data.max_length, "overlength": data.overlength,
                "skip_invalid": data.skip_invalid}
    encoder = ChatEncoder(tokenizer)  # checks the tokenizer before any slow work
    key = cache.cache_key(train_files=train_files, eval_files=eval_files, settings=settings, tokenizer=tokenizer)
    path = Path(cache_dir) / f"{key}.npz"

    tokenized = cache.load(path, log)
    hit = tokenized is not None
    if tokenized is None:
        tokenized = _tokenize_files(data, encoder, train_files, eval_files, log)
        cache.save(path, tokenized, log)
        log(f"data: tokenized data cached in {path}")
    else:
        log(f"data: loaded tokenized data from {path}")

    prepared = _split_and_shuffle(tokenized, eval_fraction=data.eval_fraction, seed=seed)
    prepared.report.files = [str(p) for p in train_files + eval_files]
    prepared.report.cache_hit = hit
    log(prepared.report.summary())
    if not prepared.train:
        raise DataError("no usable training samples left after filtering:\n" + prepared.report.summary())
    return prepared


def check_records(data: DataSection) -> DataReport:
    """Read and validate every record, without a tokenizer: the launcher's check before any
    worker starts. Raises the DataError training would (every bad line as file:line, or a
    missing file); the chat template and lengths are checked later, by the workers."""
    report = DataReport(files=[str(p) for p in _paths(data.train_files) + _paths(data.eval_files)])
    _read_all(_paths(data.train_files) + _paths(data.eval_files), data, report)
    return report


def _paths(files: Sequence[str]) -> list[Path]:
    return [Path(f).expanduser() for f in files]


# ------------------------------------------------------------------------------- tokenizing

def _tokenize_files(data: DataSection, encoder: ChatEncoder, train_files: list[Path], eval_files: list[Path],
                    log: Log) -> cache.Tokenized:
    report = DataReport(files=[])
    # Train and eval files are read together so one error lists the problems of both.
    records = _read_all(train_files + eval_files, data, report)
    train_records, eval_records = records[:len(train_files)], records[len(train_files):]
    total = sum(len(r) for _, r in train_records + eval_records)
    log(f"data: tokenizing {total} conversations from {len(train_files) + len(eval_files)} file(s)")
    problems: list[FileProblem] = []
    with _progress(total) as bar:
        train = _tokenize_records(train_records, data, encoder, report, problems, bar)
        evals = _tokenize_records(eval_records, data, encoder, report, problems, bar)
    _skip_or_raise(problems, report, data.skip_invalid)
    report.valid -= len(problems)  # these were read fine, then the template or a control token failed them
    return cache.Tokenized(train, evals, report)


def _read_all(files: list[Path], data: DataSection, report: DataReport) -> list[tuple[Path, list[Record]]]:
    """Read and validate every file; with skip_invalid off, fail here, before any tokenizing."""
    loaded = [(path, *load_file(path, data.format)) for path in files]
    problems = [(path, p) for path, _, file_problems in loaded for p in file_problems]
    _skip_or_raise(problems, report, data.skip_invalid)
    valid = sum(len(records) for _, records, _ in loaded)
    report.valid += valid
    report.total_lines += valid + len(problems)
    return [(path, records) for path, records, _ in loaded]


def _tokenize_records(files: list[tuple[Path, list[Record]]], data: DataSection, encoder: ChatEncoder,
                      report: DataReport, problems: list[FileProblem], bar: Any) -> list[Sample]:
    samples: list[Sample] = []
    fates: Counter[str] = Counter()
    for path, records in files:
        for start in range(0, len(records), _CHUNK):
            chunk = records[start:start + _CHUNK]
            rendered = _render_chunk(chunk, encoder, path, problems)
            report.altered_turns += sum(r.altered for r in rendered)
            for ids, ranges in encoder.encode(rendered):
                sample, fate = fit(ids, ranges, max_length=data.max_length, overlength=data.overlength)
                fates[fate] += 1
                if sample is not None:
                    samples.append(sample)
            bar.update(len(chunk))
    report.truncated += fates["truncated"]
    report.dropped_overlength += fates["dropped_overlength"]
    report.dropped_no_target += fates["dropped_no_target"]
    return samples


def _render_chunk(chunk: list[Record], encoder: ChatEncoder, path: Path,
                  problems: list[FileProblem]) -> list[Rendered]:
    rendered = []
    for record in chunk:
        try:
            rendered.append(encoder.render(record.messages))
        except RecordError as err:
            problems.append((path, Problem(record.line, err.kind, err.detail)))
    return rendered


def _skip_or_raise(problems: list[FileProblem], report: DataReport, skip_invalid: bool) -> None:
    """Raise the one listing error, or (skip_invalid) count the skipped records by reason."""
    if not problems:
        return
    if not skip_invalid:
        raise DataError(format_problems(problems))
    for _, problem in problems:
        report.invalid_reasons[problem.kind] = report.invalid_reasons.get(problem.kind, 0) + 1
    report.invalid += len(problems)


def format_problems(problems: list[FileProblem]) -> str:
    kinds = Counter(p.kind for _, p in problems)
    lines = [f"{len(problems)} invalid record(s) in the data ("
             + ", ".join(f"{k}: {n}" for k, n in kinds.most_common())
             + "); fix them, or set data.skip_invalid = true to skip them and train on the rest:"]
    lines += [f"  {path}:{p.line}: {p}" for path, p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


def _progress(total: int) -> Any:
    from tqdm import tqdm  # imported late: the launcher side imports this package too

    return tqdm(total=total, disable=total < PROGRESS_MIN, file=sys.stderr, unit="conv", desc="tokenizing")


# ------------------------------------------------------------------------------- split, shuffle

def _split_and_shuffle(tokenized: cache.Tokenized, *, eval_fraction: float, seed: int) -> PreparedData:
    train, evals = tokenized.train, tokenized.eval
    if eval_fraction > 0:
        train, evals = split_eval(train, eval_fraction, seed)
    train = list(train)
    # A string seed goes through sha512 in random.seed: the same on every process and Python.
    random.Random(f"clustertune-shuffle-{seed}").shuffle(train)
    report = tokenized.report
    report.train_samples, report.eval_samples = len(train), len(evals)
    report.train_tokens = sum(len(s.input_ids) for s in train)
    report.trained_tokens = sum(s.num_trained for s in train)
    return PreparedData(train=train, eval=list(evals), report=report)


def split_eval(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded eval split in file order; at least one sample on each side when there are two."""
    if len(samples) < 2:
        return samples, []
    n_eval = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    order = list(range(len(samples)))
    random.Random(f"clustertune-eval-split-{seed}").shuffle(order)
    chosen = set(order[:n_eval])
    return ([s for i, s in enumerate(samples) if i not in chosen],
            [s for i, s in enumerate(samples) if i in chosen])
