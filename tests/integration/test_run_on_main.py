"""engine.run_on_main on 2 real gloo processes: the other rank waits past the group's collective
timeout while rank 0 works, and a failure on rank 0 reaches it as an error, not a hang."""

from __future__ import annotations

import datetime
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration


def _rank_main(rank: int, init_file: str, results) -> None:
    from clustertune import engine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    outcomes = []
    for fail in (False, True):
        def work(fail=fail):
            import time
            time.sleep(4)  # twice the collective timeout
            if fail:
                raise ValueError("boom")
            return "converted"
        try:
            outcomes.append(engine.run_on_main(work, is_main=rank == 0, timeout_s=60))
        except Exception as err:  # noqa: BLE001 - recorded for the assertions
            outcomes.append(f"{type(err).__name__}: {err}")
    dist.barrier()  # the training group still works afterwards
    dist.destroy_process_group()
    results[rank] = outcomes


def test_other_ranks_wait_past_the_collective_timeout_and_get_rank0_failure(tmp_path):
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
    assert results[0] == ["converted", "ValueError: boom"]
    assert results[1] == [None, "RuntimeError: rank 0 failed: ValueError: boom"]
