"""From the recipe's data section to the samples every rank trains on.

    prepared = prepare_dataset(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=cache_dir)

Steps: hash the inputs -> load the tokenized cache, or read + validate every file (fail with one
error listing the problems unless skip_invalid), render + tokenize + apply the length policy, and
cache the result -> eval split (seeded) -> per-file weights (seeded) -> shuffle train (seeded).

Paths: a relative data path is resolved against the current directory (where clustertune was
started; a cluster launch makes them absolute against its working directory first), never
against the recipe file's directory. A missing file's error shows the absolute path looked for.

Every process may call this: the result depends only on the inputs and the seed, so all ranks
get the identical list. On a cache miss each process tokenizes on its own; a caller that wants
only one to do it lets rank 0 go first and the others follow after a barrier (they hit the cache).
"""

from __future__ import annotations

import math
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from clustertune.data import cache
from clustertune.data.chat import ChatEncoder, Rendered, fit
from clustertune.data.records import Problem, Record, RecordError, load_file
from clustertune.data.sources import missing_file_error
from clustertune.data.types import DataError, DataReport, PreparedData, Sample

if TYPE_CHECKING:
    from clustertune.config import DataSection

MAX_LISTED = 20  # problems listed in the error; the rest are counted
PROGRESS_MIN = 20_000  # show a progress bar from this many conversations
_CHUNK = 1024  # conversations per tokenizer call

Log = Callable[[str], None]
T = TypeVar("T")
FileProblem = tuple[Path, Problem]


def load_or_tokenize(data: DataSection, tokenizer: Any, *, cache_dir: Path, tokenize: Callable[..., Any],
                     what: str, log: Log, extra_settings: dict[str, Any] | None = None):
    """(train files, eval files, tokenized, cache hit): the tokenized files from the cache when
    its key (files' contents, settings, tokenizer) matches, else `tokenize(data, encoder,
    train_files, eval_files, log)` and cached."""
    train_files = _paths(data.train_paths, "data.train_files")
    eval_files = _paths(data.eval_files, "data.eval_files")
    settings = {**(extra_settings or {}), "format": data.format, "max_length": data.max_length,
                "overlength": data.overlength, "skip_invalid": data.skip_invalid}
    encoder = ChatEncoder(tokenizer)  # checks the tokenizer before any slow work
    key = cache.cache_key(train_files=train_files, eval_files=eval_files, settings=settings, tokenizer=tokenizer)
    path = Path(cache_dir) / f"{key}.npz"
    tokenized = cache.load(path, log)
    hit = tokenized is not None
    if tokenized is None:
        tokenized = tokenize(data, encoder, train_files, eval_files, log)
        cache.save(path, tokenized, log)
        log(f"data: tokenized {what} cached in {path}")
    else:
        log(f"data: loaded tokenized {what} from {path}")
    return train_files, eval_files, tokenized, hit


def prepare_dataset(data: DataSection, tokenizer: Any, *, seed: int, cache_dir: Path,
                    log: Log = print, objective: str = "sft") -> PreparedData:
    """objective "dpo": PreferencePair samples from preference-pair records (data/preference.py)."""
    if objective == "dpo":
        from clustertune.data.preference import prepare_preference_dataset
        return prepare_preference_dataset(data, tokenizer, seed=seed, cache_dir=cache_dir, log=log)
    if objective == "grpo":  # prompts with answers (data/prompts.py)
        from clustertune.data.prompts import prepare_prompt_dataset
        return prepare_prompt_dataset(data, tokenizer, seed=seed, log=log)
    train_files, eval_files, tokenized, hit = load_or_tokenize(
        data, tokenizer, cache_dir=cache_dir, tokenize=_tokenize_files, what="data", log=log)
    prepared = _split_and_shuffle(tokenized, eval_fraction=data.eval_fraction, seed=seed,
                                  weights=data.train_weights, names=[str(p) for p in train_files])
    prepared.report.files = [str(p) for p in train_files + eval_files]
    prepared.report.cache_hit = hit
    log(prepared.report.summary())
    if not prepared.train:
        raise DataError("no usable training samples left after filtering, from "
                        + ", ".join(map(str, train_files)) + ":\n" + prepared.report.summary())
    return prepared


def check_records(data: DataSection, objective: str = "sft") -> DataReport:
    """Read and validate every record, without a tokenizer: the launcher's check before any
    worker starts. Raises the DataError training would (every bad line as file:line, or a
    missing file); the chat template and lengths are checked later, by the workers.
    objective "dpo": the records are preference pairs (data/preference.py)."""
    if objective == "dpo":
        from clustertune.data.preference import check_preference_records
        return check_preference_records(data)
    if objective == "grpo":
        from clustertune.data.prompts import check_prompt_records
        return check_prompt_records(data)
    files = _paths(data.train_paths, "data.train_files") + _paths(data.eval_files, "data.eval_files")
    report = DataReport(files=[str(p) for p in files])
    _read_all(files, data, report)
    return report


def _paths(files: Sequence[str], key: str) -> list[Path]:
    """The paths as given (user-expanded), after checking that each one exists."""
    paths = [Path(f).expanduser() for f in files]
    for i, path in enumerate(paths):
        if not path.exists():
            raise missing_file_error(path, f"{key}[{i}]")
    return paths


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
        train = [_tokenize_records(path, records, data, encoder, report, problems, bar)
                 for path, records in train_records]
        evals = [_tokenize_records(path, records, data, encoder, report, problems, bar)
                 for path, records in eval_records]
    _skip_or_raise(problems, report, data.skip_invalid)
    report.valid -= len(problems)  # these were read fine, then the template or a control token failed them
    return cache.Tokenized([s for samples in train for s in samples], [s for samples in evals for s in samples],
                           report, train_counts=[len(samples) for samples in train])


def _read_all(files: list[Path], data: DataSection, report: DataReport,
              convert: Callable[[dict[str, Any]], Any] | None = None) -> list[tuple[Path, list[Record]]]:
    """Read and validate every file; with skip_invalid off, fail here, before any tokenizing.
    convert: records of another kind than conversations (see records.load_file)."""
    loaded = [(path, *load_file(path, data.format, convert)) for path in files]
    problems = [(path, p) for path, _, file_problems in loaded for p in file_problems]
    _skip_or_raise(problems, report, data.skip_invalid)
    valid = sum(len(records) for _, records, _ in loaded)
    report.valid += valid
    report.total_lines += valid + len(problems)
    return [(path, records) for path, records, _ in loaded]


def _tokenize_records(path: Path, records: list[Record], data: DataSection, encoder: ChatEncoder,
                      report: DataReport, problems: list[FileProblem], bar: Any) -> list[Sample]:
    """One file's kept samples, in file order."""
    samples: list[Sample] = []
    fates: Counter[str] = Counter()
    for start in range(0, len(records), _CHUNK):
        chunk = records[start:start + _CHUNK]
        rendered = _render_chunk(chunk, encoder, path, problems)
        report.altered_turns += sum(r.altered for r in rendered)
        for ids, ranges in encoder.encode(rendered, max_length=data.max_length):
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
            problems.append((path, Problem(record.where, err.kind, err.detail)))
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
    lines += [f"  {path}:{p.where}: {p}" for path, p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)


def _progress(total: int) -> Any:
    from tqdm import tqdm  # imported late: the launcher side imports this package too

    return tqdm(total=total, disable=total < PROGRESS_MIN, file=sys.stderr, unit="conv", desc="tokenizing")


# ------------------------------------------------------------------------------- split, shuffle

def _split_and_shuffle(tokenized: cache.Tokenized, *, eval_fraction: float, seed: int,
                       weights: list[float], names: list[str]) -> PreparedData:
    # Each train sample tagged with its file's index, for the weights after the eval split.
    tags = [i for i, n in enumerate(tokenized.train_counts) for _ in range(n)]
    tagged = list(zip(tags, tokenized.train, strict=True))
    evals = tokenized.eval
    if eval_fraction > 0:
        tagged, held_out = split_eval(tagged, eval_fraction, seed)
        evals = [s for _, s in held_out]
    report = tokenized.report
    train = apply_weights(tagged, weights, seed)
    if any(w != 1.0 for w in weights):
        before, after = Counter(t for t, _ in tagged), Counter(t for t, _ in train)
        report.weighting = [f"{names[i]} x{w:g}: {before[i]} -> {after[i]} samples" for i, w in enumerate(weights)]
    train = [s for _, s in train]
    # A string seed goes through sha512 in random.seed: the same on every process and Python.
    random.Random(f"clustertune-shuffle-{seed}").shuffle(train)
    report.train_samples, report.eval_samples = len(train), len(evals)
    report.train_tokens = sum(len(s.input_ids) for s in train)
    report.trained_tokens = sum(s.num_trained for s in train)
    return PreparedData(train=train, eval=list(evals), report=report)


def apply_weights(tagged: list[tuple[int, T]], weights: list[float], seed: int) -> list[tuple[int, T]]:
    """Up- or down-sample each train file's samples by its data.train_files weight.

    A file with weight w and n samples (those left after filtering and the eval split)
    contributes floor(w) copies of every sample, then floor(frac(w) * n + 0.5) more distinct
    samples (round half up) picked at random with the seed, in file order. So 2.0 doubles a
    file, 0.5 keeps a seeded half, 1.5 keeps all once plus a seeded half again, and 1.0 changes
    nothing. The choice is made once per prepared dataset (every epoch sees the same samples),
    is identical on every rank, and depends on the seed and the file's position in the list.
    Output: file by file, in file order (the caller shuffles)."""
    by_file: dict[int, list[tuple[int, T]]] = {}
    for item in tagged:
        by_file.setdefault(item[0], []).append(item)
    out: list[tuple[int, T]] = []
    for index in sorted(by_file):
        items, weight = by_file[index], weights[index]
        whole = math.floor(weight)
        out += items * whole
        extra = math.floor((weight - whole) * len(items) + 0.5)
        if extra:
            picked = random.Random(f"clustertune-weight-{seed}-{index}").sample(range(len(items)), extra)
            out += [items[i] for i in sorted(picked)]
    return out


def split_eval(samples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded eval split in file order; at least one sample on each side when there are two."""
    if len(samples) < 2:
        return samples, []
    n_eval = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    order = list(range(len(samples)))
    random.Random(f"clustertune-eval-split-{seed}").shuffle(order)
    chosen = set(order[:n_eval])
    return ([s for i, s in enumerate(samples) if i not in chosen],
            [s for i, s in enumerate(samples) if i in chosen])
