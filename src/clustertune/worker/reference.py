"""DPO's reference stage: the summed completion log-probs of every preference pair under the
initial policy, computed once with the training engine itself before its first update (with
LoRA: the same engine with the adapter switched off), so no second model sits in memory.

Stored with the run, keyed by pair (PreferencePair.key, a hash of its tokens):

    RUN_DIR/reference_logps/logps.jsonl     {"key": "<sha256>", "chosen": -12.5, "rejected": -14.0}

Rank 0 appends a round of results (REFERENCE_ROUND micro-batches per rank) at a time, flushed and
fsynced, so a stage interrupted halfway continues where it stopped: a relaunch loads what is
there (a torn last line is ignored) and computes only the missing pairs. A resumed run whose
values are gone cannot recompute them once the weights have moved (without LoRA): that is an
error naming the directory.

Collective: every rank runs the same number of forwards (evaluate.eval_plan), which ZeRO-3 needs.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from clustertune import watchdog
from clustertune.data.types import PreferencePair
from clustertune.errors import UserError
from clustertune.worker.evaluate import eval_plan

REFERENCE_DIR = "reference_logps"
REFERENCE_FILE = "logps.jsonl"
REFERENCE_ROUND = 16  # micro-batches per rank between two appends to the file


class ReferenceMissing(UserError):
    """A resumed DPO run whose stored reference log-probs are gone (and cannot be recomputed)."""


def reference_path(run_dir: Path) -> Path:
    return Path(run_dir) / REFERENCE_DIR / REFERENCE_FILE


def read_stored(path: Path) -> dict[str, tuple[float, float]]:
    """The stored values; a line that does not parse (the torn end of an interrupted append) is skipped."""
    values: dict[str, tuple[float, float]] = {}
    if not path.is_file():
        return values
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            values[row["key"]] = (float(row["chosen"]), float(row["rejected"]))
        except (ValueError, KeyError, TypeError):
            continue
    return values


def append_stored(path: Path, rows: dict[str, tuple[float, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for key, (chosen, rejected) in rows.items():
            fh.write(json.dumps({"key": key, "chosen": chosen, "rejected": rejected}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def reference_logps(parts: Any, objective: Any, pairs: Sequence[PreferencePair], *, rt: Any, run_dir: Path,
                    resuming: bool, token_budget: int, packing: bool, heartbeat: Any = None,
                    log=print) -> dict[str, tuple[float, float]]:
    """{pair key: (chosen, rejected) reference log-probs} for every pair. Collective."""
    path = reference_path(run_dir)
    stored = _broadcast(read_stored(path) if rt.is_main else None)
    missing: dict[str, PreferencePair] = {}
    for pair in pairs:
        if pair.key not in stored:
            missing.setdefault(pair.key, pair)
    if not missing:
        if rt.is_main:
            log(f"dpo: reference log-probs of {len(pairs)} pairs loaded from {path}")
        return stored
    lora = hasattr(parts.lm, "disable_adapter")
    if resuming and not lora:
        raise ReferenceMissing(
            f"{path} lacks the reference log-probs of {len(missing)} of {len(pairs)} preference pairs, and this run "
            "resumes from a checkpoint whose weights are no longer the initial policy: restore that file, or "
            "start the run again in a new run.output_dir")
    todo = list(missing.values())
    if rt.is_main:
        log(f"dpo: reference log-probs of {len(todo)} pairs ({len(stored)} already in {path})")
    plan = eval_plan([len(p.input_ids) for p in todo], world_size=rt.world_size,
                     micro_batch_size=parts.layout.micro_batch_size, packing=packing,
                     token_budget=token_budget)[rt.rank]
    engine = parts.ds_engine
    was_training = engine.module.training
    engine.eval()
    adapter_off = parts.lm.disable_adapter() if lora else contextlib.nullcontext()
    values = dict(stored)
    try:
        with torch.no_grad(), adapter_off:
            for round_index, start in enumerate(range(0, len(plan), REFERENCE_ROUND)):
                if heartbeat is not None:
                    heartbeat.beat(round_index, "reference")
                found: dict[str, tuple[float, float]] = {}
                for group in plan[start:start + REFERENCE_ROUND]:
                    chunk = [todo[i] for i in group]
                    logps = objective.segment_logps(engine, chunk, device=rt.device).float().view(-1).tolist()
                    for k, pair in enumerate(chunk):
                        found[pair.key] = (logps[2 * k], logps[2 * k + 1])
                everyone = [found]
                if dist.is_initialized() and rt.world_size > 1:
                    everyone = [{} for _ in range(rt.world_size)]
                    dist.all_gather_object(everyone, found)
                for part in everyone:
                    values.update(part)
                if rt.is_main:
                    append_stored(path, {k: v for part in everyone for k, v in part.items()})
                # TEST-ONLY hook: CLUSTERTUNE_FAULT=kill_during_save:reference_round:<rank>:<round> kills the
                # rank after that (1-based) round is stored, as an interrupted stage (tests/integration/test_dpo.py).
                watchdog.fault_point("reference_round", rank=rt.rank, step=round_index + 1)
    finally:
        engine.train(was_training)
    if parts.ds_config["zero_optimization"]["stage"] == 3:
        # Forwards with no backward leave ZeRO-3's prefetched parameters in flight, and its recorded
        # module order is the forward-only one: release them all, so training starts clean (without
        # this, the export at the end of a DPO run failed with "Cannot partition a param in flight").
        engine.empty_partition_cache()
    still = [k for k in missing if k not in values]
    if still:
        raise RuntimeError(f"the reference stage left {len(still)} pairs without log-probs")
    return values
