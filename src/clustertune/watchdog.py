"""Hang detection: per-rank heartbeats (worker side) and the stall monitor (launcher side).

Worker: `Heartbeat` is a daemon thread that prints one line every few seconds,

    clustertune-heartbeat rank=R step=S phase=P      (clustertune.contract.heartbeat_line)

through the rank's stdout, which rankexec prefixes and the launcher already reads (no shared
filesystem needed). The thread keeps beating while the main thread waits inside a collective
(torch releases the GIL there), so a beat that stops means the process is stopped (SIGSTOP),
dead, or its node unreachable; a step that stops advancing means the run is stuck.

Launcher: `StallMonitor` gets those beats (via supervisor.OutputRouter) and, after
run.stall_timeout_s, names the rank whose heartbeat went silent (the stuck one), or, when every
rank beats but no step completes, the run's stuck step and the rank(s) behind. The launcher then
stops every process of the run.

As a backstop without a launcher monitor (torchrun/Slurm, or a node cut off from the launcher),
a rank that sees no step progress for twice the timeout prints why and exits by itself.

Standard library only: the launcher side imports this module and must never import torch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from clustertune.contract import FAULT_ENV, heartbeat_line

STALL_EXIT_CODE = 3
PROGRESS_PHASES = ("train",)  # phases where a step must complete within the timeout


def heartbeat_interval(stall_timeout_s: float) -> float:
    """Several beats per timeout, at most one per second, at least one per 10 s."""
    return min(10.0, max(1.0, stall_timeout_s / 5))


class Heartbeat:
    """Worker side. `beat(step, phase)` from the training loop; the thread does the printing."""

    def __init__(self, *, rank: int, stall_timeout_s: float, write=None, exit_on_stall: bool = True):
        self.rank = rank
        self.timeout = stall_timeout_s
        self.interval = heartbeat_interval(stall_timeout_s)
        self.step = 0
        self.phase = "setup"
        self.progress_at = time.monotonic()
        self.exit_on_stall = exit_on_stall
        self._write = write or _write_stdout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rank-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def beat(self, step: int, phase: str = "train") -> None:
        if step != self.step or phase != self.phase:
            self.progress_at = time.monotonic()
        self.step, self.phase = step, phase

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._write(heartbeat_line(self.rank, self.step, self.phase))
            idle = time.monotonic() - self.progress_at
            if self.exit_on_stall and self.phase in PROGRESS_PHASES and idle > 2 * self.timeout:
                self._write(f"clustertune-stall rank={self.rank}: no step progress for {idle:.0f} s at step "
                            f"{self.step} (run.stall_timeout_s={self.timeout:g}); exiting")
                os._exit(STALL_EXIT_CODE)
            self._stop.wait(self.interval)


def _write_stdout(line: str) -> None:
    # One write(2) per line, so the beat never splits another thread's line in two.
    try:
        os.write(sys.stdout.fileno(), (line + "\n").encode())
    except (OSError, ValueError):
        pass


def start_heartbeat(*, rank: int, stall_timeout_s: float) -> Heartbeat:
    """A started heartbeat; with stall_timeout_s = 0 (off) the object only records the step."""
    hb = Heartbeat(rank=rank, stall_timeout_s=stall_timeout_s)
    return hb.start() if stall_timeout_s > 0 else hb


# ------------------------------------------------------------------------------ launcher side

@dataclass
class _RankState:
    node: str | None
    step: int
    phase: str
    seen_at: float


@dataclass
class StallMonitor:
    """Launcher side: fed every heartbeat line; `check(now)` returns why the run is stuck, or None."""

    timeout: float
    ranks: dict[int, _RankState] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    progress_step: int = -1
    progress_at: float = 0.0

    def record(self, rank: int, node: str | None, step: int, phase: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.ranks[rank] = _RankState(node, step, phase, now)
        top = max(s.step for s in self.ranks.values())
        if top > self.progress_step or self.progress_at == 0.0:
            self.progress_step, self.progress_at = top, now

    def exited(self, rank: int) -> None:
        self.finished.add(rank)

    def check(self, now: float | None = None) -> str | None:
        if self.timeout <= 0:
            return None
        now = time.monotonic() if now is None else now
        live = {r: s for r, s in self.ranks.items() if r not in self.finished}
        silent = sorted((r for r, s in live.items() if now - s.seen_at > self.timeout),
                        key=lambda r: live[r].seen_at)
        if silent:
            r = silent[0]
            s = live[r]
            others = f" (also silent: {', '.join(_who(x, live[x]) for x in silent[1:])})" if silent[1:] else ""
            return (f"hang: {_who(r, s)} sent no heartbeat for {now - s.seen_at:.0f} s (last at step {s.step}, "
                    f"{s.phase}; run.stall_timeout_s={self.timeout:g}): the process is stopped or hung, or its "
                    f"node is unreachable{others}")
        training = [r for r, s in live.items() if s.phase in PROGRESS_PHASES]
        if training and len(training) == len(live) and now - self.progress_at > self.timeout:
            low = min(live[r].step for r in training)
            behind = sorted(r for r in training if live[r].step == low)
            return (f"hang: no step completed for {now - self.progress_at:.0f} s (stuck at step {low}; "
                    f"run.stall_timeout_s={self.timeout:g}); slowest: "
                    f"{', '.join(_who(r, live[r]) for r in behind)}")
        return None


def _who(rank: int, s: _RankState) -> str:
    return f"rank {rank} on {s.node}" if s.node else f"rank {rank}"


# ------------------------------------------------------------------- fault injection (TEST-ONLY)


def fault_point(point: str, *, rank: int, step: int) -> bool:
    """TEST-ONLY hook for the fault-injection tests (tests/cluster/test_faults*.py,
    tests/integration/test_resume.py); a no-op unless CLUSTERTUNE_FAULT is set to

    * kill_during_save:<point>:<rank>:<step>: that rank SIGKILLs itself at that named point of the
      checkpoint save of that step. Points: before_shards (nothing of this rank written),
      after_shards (shards written, before the barrier), after_barrier (every rank's shards
      written, before the completion marker);
    * sleep:<point>:<rank>:<seconds>: that rank sleeps there (points data_preparation and
      universal_conversion: one process's work that outlasts run.collective_timeout_s, as
      tokenizing a large dataset or converting a 32B checkpoint does);
    * nan:<point>:<rank>:<first>[-<last>]: returns True at that point of those (1-based) optimizer
      steps, and the caller makes its value NaN (point loss: the rank's first micro-batch loss of
      the step, so the step's loss and gradients are non-finite; tests of the non-finite guard).

    Returns False except where a `nan` fault applies.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return False
    kind, _, rest = spec.partition(":")
    want_point, want_rank, value = (rest.split(":") + ["", "", ""])[:3]
    if want_point != point or str(rank) != want_rank:
        return False
    if kind == "nan":
        first, _, last = value.partition("-")
        if int(first) <= step <= int(last or first):
            _write_stdout(f"fault injection: rank {rank} makes its {point} NaN at step {step}")
            return True
        return False
    if kind == "kill_during_save" and str(step) == value:
        _write_stdout(f"fault injection: rank {rank} SIGKILLs itself at {point} of the step-{step} save")
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sleep":
        _write_stdout(f"fault injection: rank {rank} sleeps {value} s at {point}")
        time.sleep(float(value))
    return False
