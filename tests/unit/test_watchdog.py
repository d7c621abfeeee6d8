"""Hang detection logic (clustertune.watchdog) and its use by the launcher's output router: which
rank is named, when, and that heartbeats never reach the logs. Pure: no processes, fake clocks."""

from __future__ import annotations

import os
import time

from clustertune import contract
from clustertune.supervisor import OutputRouter
from clustertune.watchdog import STALL_EXIT_CODE, Heartbeat, StallMonitor, fault_point, heartbeat_interval


def test_silent_rank_is_named_after_the_timeout():
    m = StallMonitor(10)
    m.record(0, "node1", 3, "train", now=100)
    m.record(1, "node2", 3, "train", now=100)
    m.record(0, "node1", 3, "train", now=109)
    assert m.check(now=109) is None
    m.record(0, "node1", 3, "train", now=111)
    why = m.check(now=111)
    assert why.startswith("hang: rank 1 on node2 sent no heartbeat for 11 s (last at step 3")


def test_no_progress_names_the_slowest_rank():
    m = StallMonitor(10)
    for t in range(100, 125, 2):
        m.record(0, "node1", 5, "train", now=t)
        m.record(1, "node2", 4 if t < 104 else 5, "train", now=t)
    assert m.check(now=108) is None
    assert "slowest: rank 0 on node1, rank 1 on node2" in m.check(now=114)  # step 5 since t=100
    m2 = StallMonitor(10)
    for t in range(100, 125, 2):
        m2.record(0, "node1", 6, "train", now=t)
        m2.record(1, "node2", 5, "train", now=t)
    why = m2.check(now=124)
    assert why is not None and "no step completed" in why and "rank 1 on node2" in why and "rank 0" not in why


def test_setup_and_export_phases_need_no_progress_and_finished_ranks_are_ignored():
    m = StallMonitor(5)
    for t in range(0, 60, 1):
        m.record(0, "a", 0, "setup", now=t)
        m.record(1, "b", 0, "final", now=t)
    assert m.check(now=59) is None
    m.exited(1)
    assert m.check(now=200) is not None  # rank 0 silent
    assert StallMonitor(0).check(now=1e9) is None  # off


def test_heartbeat_line_roundtrip_and_interval():
    lines = []
    hb = Heartbeat(rank=3, stall_timeout_s=30, write=lines.append, exit_on_stall=False)
    hb.beat(7, "train")
    hb.start()  # the first beat is written at once
    deadline = time.monotonic() + 5
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    hb.stop()
    assert contract.parse_heartbeat("[rank 3] " + lines[0]) == contract.Heartbeat(3, 7, "train")
    assert contract.parse_heartbeat("loss 1.0") is None
    assert heartbeat_interval(30) == 6 and heartbeat_interval(2) == 1 and heartbeat_interval(600) == 10


def test_router_swallows_heartbeats_and_prefers_the_rank_killed_by_a_signal(tmp_path):
    shown = []
    router = OutputRouter(["node1", "node2"], tmp_path, [], echo=shown.append, monitor=StallMonitor(10))
    router.feed("node2: [rank 1] clustertune-heartbeat rank=1 step=4 phase=train")
    assert router.monitor.ranks[1].node == "node2" and router.monitor.ranks[1].step == 4
    router.feed("node1: [rank 0] RuntimeError: Connection closed by peer")
    router.feed("node1: [rank 0] clustertune-rank-exit rank=0 node=0 code=1 seconds=3.0")
    router.feed("node2: [rank 1] clustertune-rank-exit rank=1 node=1 code=-9 seconds=3.0")
    router.close()
    assert router.failure == "rank 1 on node2 was killed by SIGKILL (exit code -9)"
    assert not any("heartbeat" in s for s in shown)
    assert "heartbeat" not in (tmp_path / "node2.log").read_text()
    assert 1 in router.monitor.finished


def test_exits_after_the_stop_began_do_not_replace_the_cause(tmp_path):
    router = OutputRouter(["node1", "node2"], tmp_path, [], echo=lambda s: None)
    router._fail("hang: rank 1 on node2 sent no heartbeat", STALL_EXIT_CODE)
    router.stopping = True
    router.feed("node2: [rank 1] clustertune-rank-exit rank=1 node=1 code=-9 seconds=3.0")
    router.close()
    assert router.failure.startswith("hang: rank 1") and router.failed_code == STALL_EXIT_CODE


def test_fault_hook_is_a_no_op_unless_it_matches(monkeypatch):
    monkeypatch.delenv("CLUSTERTUNE_FAULT", raising=False)
    fault_point("before_shards", rank=1, step=4)
    monkeypatch.setenv("CLUSTERTUNE_FAULT", "kill_during_save:after_shards:1:4")
    fault_point("before_shards", rank=1, step=4)  # other point
    fault_point("after_shards", rank=0, step=4)  # other rank
    fault_point("after_shards", rank=1, step=6)  # other step
    assert os.getpid() > 0  # still alive


def test_fault_hook_sleeps_only_the_named_rank_at_the_named_point(monkeypatch, capfd):
    monkeypatch.setenv("CLUSTERTUNE_FAULT", "sleep:universal_conversion:0:0.2")
    started = time.monotonic()
    fault_point("universal_conversion", rank=1, step=4)  # other rank
    fault_point("after_shards", rank=0, step=4)  # other point
    assert time.monotonic() - started < 0.1
    fault_point("universal_conversion", rank=0, step=4)
    assert time.monotonic() - started >= 0.2
    assert "rank 0 sleeps 0.2 s at universal_conversion" in capfd.readouterr().out
