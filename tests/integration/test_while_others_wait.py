"""distributed.while_others_wait on 2 real gloo processes: waiting ranks outlast the training group's
collective timeout while others work, and a failure anywhere reaches every rank as an error
(PeerFailed on the ranks that did not fail), not a hang."""

from __future__ import annotations

import datetime
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration

# (which ranks work, which rank fails, if any)
SCENARIOS = [((0,), None), ((0,), 0), ((0, 1), 1)]


def _rank_main(rank: int, init_file: str, results) -> None:
    import time

    from clustertune.worker import distributed
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    outcomes = []
    for workers, failing in SCENARIOS:
        def work(failing=failing):
            time.sleep(4)  # twice the collective timeout
            if rank == failing:
                raise ValueError("boom")
            return f"done by {rank}"
        try:
            outcomes.append(distributed.while_others_wait(work, works=rank in workers, timeout_s=60))
        except Exception as err:  # noqa: BLE001 - recorded for the assertions
            outcomes.append(f"{type(err).__name__}: {err}")
    dist.barrier()  # the training group still works afterwards
    dist.destroy_process_group()
    results[rank] = outcomes


def test_waiting_ranks_outlast_the_collective_timeout_and_learn_of_any_failure(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_rank_main, args=(rank, str(tmp_path / "init"), results)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, 9)
    assert [p.exitcode for p in procs] == [0, 0]
    assert results[0] == ["done by 0", "ValueError: boom", "PeerFailed: rank 1 failed: ValueError: boom"]
    assert results[1] == [None, "PeerFailed: rank 0 failed: ValueError: boom", "ValueError: boom"]
