"""torch.distributed helpers of the worker: who this rank is, barriers, one process's long work
while the others wait, and teardown. (The process group itself is created by DeepSpeed:
engine.init_distributed.)
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch.distributed as dist

from clustertune import contract

# How long ranks wait for one process's work: tokenizing a large dataset, or converting a 32B
# checkpoint for a new world size (~0.5 TB of bf16 weights + fp32 master and Adam states).
LONG_WAIT_S = 6 * 3600


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment."""
    return (int(os.environ.get(contract.RANK, 0)), int(os.environ.get(contract.LOCAL_RANK, 0)),
            int(os.environ.get(contract.WORLD_SIZE, 1)))


def node_count(world_size: int) -> int:
    """Nodes in the run: ranks per node from the launcher (torch's or DeepSpeed's name)."""
    local = int(os.environ.get(contract.LOCAL_WORLD_SIZE, os.environ.get(contract.DEEPSPEED_LOCAL_SIZE, world_size))
                or world_size)
    return max(1, world_size // max(1, local))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class PeerFailed(Exception):
    """Work this rank waited for failed on another rank, which reports its own error.

    Not a UserError: it says only that this rank stops; the cause (a user error or a bug) is
    printed, with its own exit code, by the rank where it happened."""


def while_others_wait(work, *, works: bool, timeout_s: float):
    """Ranks with `works` run `work()` while the others wait up to `timeout_s`, which may be far
    longer than the collective timeout (tokenizing a large dataset; converting a 32B checkpoint
    moves about half a terabyte). The wait happens in a gloo group of its own, so its timeout
    leaves the training group's alone. Every rank learns of a failure: the failing rank
    re-raises its own error, the others raise PeerFailed naming it, instead of hanging."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work() if works else None
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    result, error = None, None
    if works:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - told to the other ranks, then re-raised below
            error = err
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}", group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if failed:
        rank, outcome = failed[0]
        raise PeerFailed(f"rank {rank} failed: {outcome.splitlines()[0]}")
    return result


def shutdown_distributed(*, wait_for_peers: bool = True) -> None:
    """Tear the process group down while the interpreter is still whole.

    Without this, gloo's worker threads can outlive the Python objects they hold and the rank
    dies at exit with "terminate called without an active exception" (SIGABRT), which would
    hide a clean exit code. wait_for_peers=False only where no rank can be inside a collective
    (an error every rank learned of together): with a peer mid-collective the teardown hangs.
    """
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
