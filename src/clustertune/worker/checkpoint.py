"""Checkpoint lifecycle: step-numbered DeepSpeed checkpoints with a completion marker, rotation,
resume discovery and the best-checkpoint record. Standard library only. (The save protocol:
worker/save.py; resume: worker/resume.py; the Hugging Face export: worker/export.py.)

A checkpoint counts only when its marker exists: the marker is written atomically after every
rank has saved (and flushed) its shards and passed a barrier, so a crash mid-save leaves a
directory resume ignores.

The marker (COMPLETE.json) records what resume must check: step, world size, ZeRO stage, data
position, DeepSpeed version, and the recipe hash (`recipe_fingerprint`). The hash leaves out the
fields that may change on resume without changing the steps already trained: where things are
written (run.*, data.cache_dir), checkpoint.* and eval.* cadence, train.log_every, and the run's
length (train.max_steps / train.epochs; a longer run changes a decaying LR schedule, which resume
reports separately through the marker's total_steps).

Filesystems. With a shared filesystem one process (global rank 0) writes the marker and rotates.
Without one (CLUSTERTUNE_NODE_LOCAL_DIR set on every node) each node keeps its own ranks' shards in
its own directory, local rank 0 of each node writes that node's marker and rotates it, and resume
takes the newest step complete on every node (`newest_common_step`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from clustertune import contract
from clustertune.errors import UserError

MARKER = "COMPLETE.json"
_TAG = re.compile(r"^step_(\d{8})$")


NODE_LOCAL_ENV = contract.NODE_LOCAL_DIR_ENV


class CheckpointError(UserError):
    """Checkpoints that cannot be used as asked: none complete, no best one, shards missing (export),
    or a world-size change that node-local checkpoints cannot follow (resume)."""


def node_local_dir() -> Path | None:
    """The node's own checkpoint directory when nodes share no filesystem (env, set per node)."""
    value = os.environ.get(NODE_LOCAL_ENV, "").strip()
    return Path(value) if value else None


def checkpoint_root(run_dir: Path) -> Path:
    """RUN_DIR/checkpoints, or $CLUSTERTUNE_NODE_LOCAL_DIR/checkpoints on a node without a shared
    filesystem (each node its own copy; see the module docstring)."""
    local = node_local_dir()
    return (local if local is not None else run_dir) / "checkpoints"


# Recipe fields that may legitimately change on resume (see the module docstring).
_UNHASHED_SECTIONS = {"run", "checkpoint", "eval"}
_UNHASHED_FIELDS = {"train.max_steps", "train.epochs", "train.log_every", "train.max_nonfinite_steps",
                    "data.cache_dir"}


def recipe_fingerprint(recipe) -> dict[str, Any]:
    """The flat {"section.key": value} of every recipe field that shapes the trained steps."""
    tree = recipe.model_dump(mode="json")
    flat = {}
    for section, values in tree.items():
        if section in _UNHASHED_SECTIONS or not isinstance(values, dict):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in _UNHASHED_FIELDS:
                flat[name] = value
    return flat


def recipe_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def marker_info(*, step: int, world_size: int, zero_stage: int, recipe, total_steps: int, num_samples: int,
                global_batch_size: int, steps_per_epoch: int, nodes: int, deepspeed_version: str) -> dict[str, Any]:
    fingerprint = recipe_fingerprint(recipe)
    epoch, within = divmod(step, steps_per_epoch)
    return {"step": step, "world_size": world_size, "zero_stage": zero_stage, "nodes": nodes,
            "recipe_hash": recipe_hash(fingerprint), "recipe": fingerprint, "total_steps": total_steps,
            "data": {"samples_consumed": step * global_batch_size, "epoch": epoch, "step_in_epoch": within,
                     "num_samples": num_samples},
            "deepspeed_version": deepspeed_version}


def read_marker(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def resume_problems(marker: dict[str, Any], *, recipe, total_steps: int, num_samples: int) -> list[str]:
    """Why resuming from `marker` would not reproduce the uninterrupted run (empty: exact)."""
    problems = []
    old = marker.get("recipe")
    if old is not None and marker.get("recipe_hash") != recipe_hash(recipe_fingerprint(recipe)):
        new = recipe_fingerprint(recipe)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        problems.append("recipe changed since the checkpoint: " + ", ".join(
            f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
    data = marker.get("data") or {}
    if data.get("num_samples") not in (None, num_samples):
        problems.append(f"the training set now has {num_samples} samples (checkpoint: {data['num_samples']}), "
                        "so the data order differs")
    if marker.get("total_steps") not in (None, total_steps) and recipe.train.schedule != "constant":
        problems.append(f"the run now has {total_steps} steps (checkpoint: {marker['total_steps']}); "
                        f"the {recipe.train.schedule} LR schedule is stretched accordingly")
    return problems


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _TAG.match(child.name)
        if match and (child / MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def newest_complete(run_dir: Path) -> tuple[int, Path] | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def newest_common_step(steps_per_rank: list[list[int]]) -> int | None:
    """The newest step complete for every rank (each rank lists the complete steps it sees on its
    own node), or None. With a shared filesystem all lists are equal."""
    if not steps_per_rank:
        return None
    common = set(steps_per_rank[0]).intersection(*map(set, steps_per_rank[1:]))
    return max(common) if common else None


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path`, so a completion marker written after it never
    points at data still in the page cache."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_marker(directory: Path, info: dict[str, Any]) -> None:
    tmp = directory / (MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MARKER)


def rotate(run_dir: Path, keep_last: int, protect: set[int] = frozenset()) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (never the newest one, nor the
    steps in `protect`, e.g. the best one), and incomplete ones older than the newest complete.
    Call from one process per filesystem."""
    complete = complete_checkpoints(run_dir)
    removed = []
    for step, path in complete[:-max(1, keep_last)]:
        if step not in protect:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    newest = complete[-1][0] if complete else None
    root = checkpoint_root(run_dir)
    if newest is not None and root.is_dir():
        for child in root.iterdir():
            match = _TAG.match(child.name)
            if match and int(match.group(1)) < newest and not (child / MARKER).exists():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


# ------------------------------------------------------------------------------ best checkpoint

BEST = "best.json"  # in the checkpoints directory: {"step", "eval_loss", "tag"} (checkpoint.keep_best)


def write_best(run_dir: Path, *, step: int, eval_loss: float) -> None:
    """Record the checkpoint with the best eval loss; written after that checkpoint's marker."""
    root = checkpoint_root(run_dir)
    tmp = root / (BEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "eval_loss": eval_loss, "tag": tag_for(step)}, indent=2))
    os.replace(tmp, root / BEST)


def read_best(run_dir: Path) -> dict[str, Any] | None:
    path = checkpoint_root(run_dir) / BEST
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def best_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """(step, dir) of the recorded best checkpoint, if it is still there and complete."""
    best = read_best(run_dir)
    if best is None:
        return None
    directory = checkpoint_root(run_dir) / tag_for(int(best["step"]))
    return (int(best["step"]), directory) if (directory / MARKER).is_file() else None
