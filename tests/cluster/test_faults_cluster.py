"""Fault injection on a real 2-node run (network-namespace nodes, DeepSpeed launcher over pdsh/ssh,
the real worker, tiny Qwen2, ZeRO-2, gloo over the namespaces' eth0):

  * SIGKILL rank 1 on node2 mid-step: every process of the run on every node ends within a bound,
    the launcher exits non-zero naming node2 and rank 1; `launch --resume` resumes from the last
    complete checkpoint and finishes;
  * SIGSTOP rank 1: the launcher's stall monitor names rank 1 on node2 (its heartbeat stopped)
    within run.stall_timeout_s and stops everything;
  * node2's link down (eth0 inside the test's own namespace): same, rank 1 on node2 named, and
    every process of the run, including node2's which the launcher cannot reach, ends by itself
    (collective timeout / the rank's own stall backstop).

Bounded: every launch has a wall-clock limit, and each test SIGKILLs by PID whatever of its own
run is left (processes whose environment holds the run's id) before the sandbox is torn down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from clusterlib import Harness, base_env, needs_sandbox, ns_exists, pid_alive, run_pids
from clustertune.cluster.sandbox import Sandbox
from tinytask import make_task, tiny_recipe

pytestmark = [pytest.mark.cluster, needs_sandbox]

STALL_S = 8
COLLECTIVE_S = 20
ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One 2-node sandbox with ssh set up, shared by this module's tests; always torn down, and the
    teardown checked (no namespace, sshd or state directory left)."""
    tmp = tmp_path_factory.mktemp("faults")
    sb = Sandbox(f"f{uuid.uuid4().hex[:8]}", 2)
    try:
        sb.up()
        h = Harness(sb, tmp)
        h.setup_ssh()
        tokenizer, _ = make_task(tmp)
        yield h, tokenizer
    finally:
        state = sb.state
        problems = sb.down()
        if state is not None:
            problems += [f"namespace {ns} left" for ns in state.namespaces if ns_exists(ns)]
            problems += [f"sshd {n.sshd_pid} left" for n in state.nodes if n.sshd_pid and pid_alive(n.sshd_pid)]
            problems += [f"{state.dir} left"] if Path(state.dir).exists() else []
        assert not problems, problems


def recipe(h: Harness, tokenizer: Path, name: str, *, steps: int, every: int) -> Path:
    path = h.tmp / f"{name}.toml"
    path.write_text(tiny_recipe(name, tokenizer, steps=steps, stage=2,
                                run={"collective_timeout_s": COLLECTIVE_S, "stall_timeout_s": STALL_S},
                                checkpoint={"every_steps": every, "keep_last": 2}))
    return path


class Launcher:
    """`clustertune launch` on node1, in the background, output to a file, bounded."""

    def __init__(self, h: Harness, recipe_path: Path, *extra: str):
        self.h = h
        self.out = h.tmp / f"launch-{uuid.uuid4().hex[:6]}.out"
        argv = [sys.executable, "-m", "clustertune.cli", "launch", str(recipe_path), "--cluster",
                str(h.sb.cluster_file), "--skip-doctor", *extra]
        self.handle = open(self.out, "w")
        self.proc = subprocess.Popen(h.sb.exec_argv("node1", argv), env=dict(base_env(), **ENV), cwd=h.tmp,
                                     stdin=subprocess.DEVNULL, stdout=self.handle, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.run_dir = h.tmp / "runs" / recipe_path.stem

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.handle.close()

    @property
    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def run_id(self, timeout: float = 60) -> str:
        info = self.run_dir / "launch" / "run.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "clustertune: run " in self.text and info.exists():
                return json.loads(info.read_text())["run_id"]
            assert self.proc.poll() is None, self.text[-3000:]
            time.sleep(0.2)
        raise AssertionError("the launch did not start: " + self.text[-3000:])

    def kill_leftovers(self, run_id: str | None) -> None:
        """Cleanup of this test's own processes only: the launcher's session and the run's pids."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in run_pids(run_id) if run_id else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self.handle.closed:
            self.handle.close()


def wait_step(run_dir: Path, step: int, launcher: Launcher, timeout: float = 180) -> None:
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return
        assert launcher.proc.poll() is None, launcher.text[-4000:]
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached: " + launcher.text[-4000:])


def worker_pid(run_id: str, rank: int) -> int:
    for pid in run_pids(run_id):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"clustertune.worker" in cmd:
            return pid
    raise AssertionError(f"no worker process of rank {rank}")


def wait_gone(run_id: str, timeout: float) -> float:
    start = time.monotonic()
    while run_pids(run_id):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"processes of run {run_id} still alive after {timeout} s: {run_pids(run_id)}")
        time.sleep(0.2)
    return time.monotonic() - start


def test_sigkill_rank_mid_step_stops_everything_then_resume_finishes(cluster):
    h, tokenizer = cluster
    r = recipe(h, tokenizer, "kill", steps=40, every=4)
    first = Launcher(h, r)
    run_id = None
    try:
        run_id = first.run_id()
        wait_step(first.run_dir, 5, first)  # the step-4 checkpoint is complete by now
        pid = worker_pid(run_id, 1)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        code = first.wait(90)
        ended = wait_gone(run_id, 60)
        took = time.monotonic() - killed_at
    finally:
        first.kill_leftovers(run_id)
    out = first.text
    assert code != 0, out[-3000:]
    assert "rank 1 on node2 was killed by SIGKILL" in out, out[-3000:]
    assert "run failed: rank 1 on node2 was killed by SIGKILL" in out
    assert took < 60, took
    assert ended < 5
    markers = sorted(first.run_dir.glob("checkpoints/*/COMPLETE.json"))
    assert markers, list(first.run_dir.rglob("*"))[:50]

    second = Launcher(h, r, "--resume")
    run_id = None
    try:
        run_id = second.run_id()
        code = second.wait(240)
    finally:
        second.kill_leftovers(run_id)
    out = second.text
    assert code == 0, out[-4000:]
    resumed = [line for line in out.splitlines() if "resumed from" in line]
    assert resumed and "(step 0)" not in resumed[0], out[-4000:]
    steps = [json.loads(x)["step"] for x in (second.run_dir / "metrics.jsonl").read_text().splitlines()
             if x.strip() and "loss" in x]
    assert max(steps) == 40
    assert run_pids(run_id) == []


def _hang_test(h: Harness, tokenizer: Path, name: str, inject, undo) -> tuple[str, float, float]:
    r = recipe(h, tokenizer, name, steps=400, every=0)
    launch = Launcher(h, r)
    run_id = None
    try:
        run_id = launch.run_id()
        wait_step(launch.run_dir, 3, launch)
        at = time.monotonic()
        inject(run_id)
        code = launch.wait(STALL_S + 60)
        detected = time.monotonic() - at
        # node2 may be cut off from the launcher: its ranks end by themselves (collective timeout,
        # stall backstop at 2 x stall_timeout_s)
        wait_gone(run_id, COLLECTIVE_S + 2 * STALL_S + 20)
        ended = time.monotonic() - at
    finally:
        undo(run_id)
        launch.kill_leftovers(run_id)
    assert code == 3, launch.text[-4000:]
    return launch.text, detected, ended


def test_sigstop_rank_is_reported_as_hang_and_stopped(cluster):
    h, tokenizer = cluster
    stopped: list[int] = []

    def inject(run_id):
        stopped.append(worker_pid(run_id, 1))
        os.kill(stopped[0], signal.SIGSTOP)

    def undo(_run_id):
        for pid in stopped:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    out, detected, ended = _hang_test(h, tokenizer, "stop", inject, undo)
    assert "hang: rank 1 on node2 sent no heartbeat" in out, out[-4000:]
    assert STALL_S <= detected < STALL_S + 30, detected
    assert ended < 60, ended


def test_node_link_down_is_reported_as_hang_and_everything_ends(cluster):
    h, tokenizer = cluster
    ns = h.sb.node("node2").ns

    def link(state):
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", state], check=True, timeout=10)

    def undo(_run_id):
        link("up")

    out, detected, ended = _hang_test(h, tokenizer, "link", lambda _id: link("down"), undo)
    assert "hang: rank 1 on node2 sent no heartbeat" in out, out[-4000:]
    assert STALL_S <= detected < STALL_S + 45, detected
    assert ended < 90, ended
