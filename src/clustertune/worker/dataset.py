"""The worker's data: each node's local rank 0 validates and tokenizes (filling the cache); the
other ranks then load the cache, so every rank trains the identical filtered, shuffled list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clustertune import watchdog
from clustertune.config import DataSection, tokenized_cache_dir
from clustertune.data import PreparedData, prepare_dataset
from clustertune.worker import distributed
from clustertune.worker.runtime import Runtime


def prepare_data(data: DataSection, tokenizer: Any, *, seed: int, rt: Runtime, run_dir: Path,
                 objective: str = "sft") -> PreparedData:
    """Collective: every rank returns the same samples (one tokenizing process per node).
    objective "dpo": preference pairs (clustertune.data.preference)."""
    cache_dir = tokenized_cache_dir(data, run_dir=run_dir)

    def tokenize() -> PreparedData:
        watchdog.fault_point("data_preparation", rank=rt.rank, step=0)  # TEST-ONLY hook
        return prepare_dataset(data, tokenizer, seed=seed, cache_dir=cache_dir,
                               log=print if rt.is_main else (lambda *_: None), objective=objective)

    result = distributed.while_others_wait(tokenize, works=rt.local_rank == 0, timeout_s=distributed.LONG_WAIT_S)
    if result is None:
        result = prepare_dataset(data, tokenizer, seed=seed, cache_dir=cache_dir, log=lambda *_: None,
                                 objective=objective)
    return result
