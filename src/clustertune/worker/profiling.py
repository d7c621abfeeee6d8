"""One optimizer step under torch.profiler: where the step's wall time goes.

`train.profile_step = N` profiles step N of a real run and writes RUN_DIR/profile/step_N.txt
(GPU busy share and the top kernels) and a Chrome trace beside it. The benchmark harness calls
the same function, so both paths are profiled the same way.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import torch


def busy_summary(events, wall_s: float) -> str:
    """GPU busy share of the step: the union of kernel intervals (kernels on several streams
    overlap; summing op rows would count a kernel and its aten op twice)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy_us, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy_us += stop - max(start, end)
            end = stop
    wall_us = wall_s * 1e6
    share = 100 * busy_us / wall_us if wall_us else 0.0
    return (f"profiled step wall {wall_us / 1e3:.1f} ms; GPU busy (union of kernel intervals) "
            f"{busy_us / 1e3:.1f} ms = {share:.1f}% of wall; idle {100 - share:.1f}%\n")


@contextlib.contextmanager
def profile_step(out_dir: Path, step: int, *, enabled: bool, kernels_only: bool = False) -> Iterator[None]:
    """Profile the enclosed work when `enabled` (CPU and CUDA activity), else do nothing.

    kernels_only: record GPU activity only (no CPU ops), which barely slows the host, so the
    busy share is close to the unprofiled step's; the table then lists kernels only.
    """
    if not enabled:
        yield
        return
    activities = [] if kernels_only and torch.cuda.is_available() else [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities) as prof:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    averages = prof.key_averages()
    sort_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = busy_summary(prof.events(), wall) + "\n" + averages.table(sort_by=sort_key, row_limit=45)
    (out_dir / f"step_{step}.txt").write_text(text)
    prof.export_chrome_trace(str(out_dir / f"step_{step}.trace.json"))
    print(f"profile of step {step}: {out_dir / f'step_{step}.txt'}", flush=True)
