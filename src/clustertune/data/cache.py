"""On-disk cache of tokenized data, so a relaunch (or every rank after the first) skips tokenizing.

One `<key>.npz` file per cache entry: per split, the concatenated token ids, a per-token "has a
target" flag and sample offsets, plus the pre-split report as JSON. The key hashes everything the
tokenized result depends on (file contents, tokenizer and template, format, length policy,
library versions), not the seed or eval_fraction: the split and the shuffle are cheap and are
redone on load. It is written to a temp file and renamed, so racing processes are safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from clustertune.data.sources import digest_paths, missing_file_error
from clustertune.data.types import IGNORE_INDEX, DataError, DataReport, Sample

CACHE_VERSION = 2  # bump when the rendering, masking or file layout changes


@dataclass
class Tokenized:
    """Kept samples in file order, before the eval split and the shuffle."""

    train: list[Sample]
    eval: list[Sample]
    report: DataReport  # counts up to filtering; split counts are filled in later
    train_counts: list[int]  # samples kept from each train file, in order (for the file weights)


def cache_key(*, train_files: list[Path], eval_files: list[Path], settings: dict[str, Any], tokenizer: Any) -> str:
    payload = {
        "version": CACHE_VERSION,
        "train": [file_digest(p) for p in train_files],
        "eval": [file_digest(p) for p in eval_files],
        "settings": settings,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return _sha256(json.dumps(payload, sort_keys=True, default=str).encode())


def file_digest(path: Path) -> str:
    """sha256 of a data file's bytes; of a saved-dataset directory, of its files' names and bytes."""
    h = hashlib.sha256()
    for file in digest_paths(path):
        if file != path:
            h.update(str(file.relative_to(path)).encode() + b"\0")
        try:
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except FileNotFoundError:
            raise missing_file_error(file) from None
        except OSError as err:
            raise DataError(f"{file}: cannot read data file: {err.strerror}") from None
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of the tokenizer as the data sees it: vocabulary, merges, normalization and added
    tokens (the Rust tokenizer's full JSON), chat template, special tokens, library versions."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    import tokenizers
    import transformers
    parts = {
        "class": type(tokenizer).__name__,
        "tokenizer": _sha256(body.encode()),
        "chat_template": tokenizer.chat_template,
        "special_tokens": tokenizer.special_tokens_map,
        # A new release may render or tokenize differently (whitespace, normalization).
        "versions": [transformers.__version__, tokenizers.__version__],
    }
    return _sha256(json.dumps(parts, sort_keys=True, default=str).encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------- file format

def save(path: Path, data: Tokenized, log: Callable[[str], None]) -> None:
    """Write atomically; a failure only costs re-tokenizing next time, so it is a warning."""
    arrays: dict[str, Any] = {**_pack("train", data.train), **_pack("eval", data.eval),
              "train_counts": np.array(data.train_counts, dtype=np.int64),
              "report": np.array(json.dumps(dataclasses.asdict(data.report)))}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old state or the whole new file
    except OSError as err:
        log(f"data: warning: could not write the tokenized cache {path}: {err}")
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load(path: Path, log: Callable[[str], None]) -> Tokenized | None:
    """The cached entry, or None when there is none or it cannot be read (then re-tokenize)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            report = DataReport(**json.loads(str(z["report"])))
            return Tokenized(_unpack(z, "train"), _unpack(z, "eval"), report, z["train_counts"].tolist())
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        log(f"data: warning: ignoring unreadable tokenized cache {path}: {err}")
        return None


def _pack(split: str, samples: list[Sample]) -> dict[str, np.ndarray]:
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum([len(s.input_ids) for s in samples], out=offsets[1:])
    total = int(offsets[-1])
    ids = np.fromiter(chain.from_iterable(s.input_ids for s in samples), dtype=np.int32, count=total)
    targets = np.fromiter(chain.from_iterable(s.targets for s in samples), dtype=np.int64, count=total)
    # Only "has a target" is stored: the target itself is the next input id (see Sample).
    return {f"{split}_ids": ids, f"{split}_has_target": targets != IGNORE_INDEX, f"{split}_offsets": offsets}


def _unpack(z: Any, split: str) -> list[Sample]:
    ids, has_target, offsets = z[f"{split}_ids"], z[f"{split}_has_target"], z[f"{split}_offsets"]
    # targets[i] = ids[i+1] where it has a target; the last flag of each sample is always False,
    # so reading ids one past a sample's end never leaks into a target.
    next_ids = np.append(ids[1:], np.int32(IGNORE_INDEX))
    targets = np.where(has_target, next_ids, IGNORE_INDEX).astype(np.int64)
    ids_list, targets_list = ids.tolist(), targets.tolist()
    bounds = offsets.tolist()
    return [Sample(ids_list[a:b], targets_list[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
