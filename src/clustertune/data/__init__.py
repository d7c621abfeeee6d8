"""Data pipeline: data files (JSONL, JSON arrays, .gz/.zst, Parquet, Arrow, saved datasets: see
sources.py) -> validated conversations (records.py) -> chat-template rendering with an
assistant-only loss mask -> length policy -> cached, seeded, identical on every rank.

    from clustertune.data import prepare_dataset
    prepared = prepare_dataset(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=cache_dir)

Imports no torch: the launcher side (validate) uses it too.
"""

from clustertune.data.chat import tokenize_conversation
from clustertune.data.prepare import check_records, prepare_dataset
from clustertune.data.records import read_records
from clustertune.data.types import IGNORE_INDEX, DataError, DataReport, PreparedData, Sample

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataReport",
    "PreparedData",
    "Sample",
    "check_records",
    "prepare_dataset",
    "read_records",
    "tokenize_conversation",
]
