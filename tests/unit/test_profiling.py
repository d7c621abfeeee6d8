"""worker/profiling.profile_step: what `train.profile_step` writes, and the busy arithmetic it prints.

    python -m pytest -q tests/unit/test_profiling.py
"""

import json
from types import SimpleNamespace

import torch

from clustertune.worker.profiling import busy_summary, profile_step


def kernel(start_us: float, end_us: float):
    return SimpleNamespace(device_type=torch.autograd.DeviceType.CUDA,
                           time_range=SimpleNamespace(start=start_us, end=end_us))


def host_op(start_us: float, end_us: float):
    return SimpleNamespace(device_type=torch.autograd.DeviceType.CPU,
                           time_range=SimpleNamespace(start=start_us, end=end_us))


def test_busy_share_is_the_union_of_kernel_intervals_not_their_sum():
    # Two streams overlap on 100-200 us; a host op is not GPU time; 300 us of 1 ms are busy.
    events = [kernel(0, 200), kernel(100, 250), kernel(900, 950), host_op(0, 1000)]
    line = busy_summary(events, wall_s=0.001)
    assert "GPU busy (union of kernel intervals) 0.3 ms = 30.0% of wall; idle 70.0%" in line


def test_a_kernel_inside_another_adds_nothing():
    line = busy_summary([kernel(0, 500), kernel(100, 200)], wall_s=0.001)
    assert "0.5 ms = 50.0% of wall" in line


def test_disabled_writes_nothing(tmp_path):
    with profile_step(tmp_path / "profile", 3, enabled=False):
        torch.ones(4) @ torch.ones(4)
    assert not (tmp_path / "profile").exists()


def test_profiled_step_writes_the_table_and_a_chrome_trace(tmp_path):
    # kernels_only has no GPU to record here: the profile falls back to CPU ops rather than record nothing.
    with profile_step(tmp_path / "profile", 7, enabled=True, kernels_only=True):
        torch.randn(64, 64) @ torch.randn(64, 64)
    text = (tmp_path / "profile" / "step_7.txt").read_text()
    assert text.startswith("profiled step wall ")
    assert "aten::mm" in text  # the op table lists the step's work
    trace = json.loads((tmp_path / "profile" / "step_7.trace.json").read_text())
    assert any("aten::mm" in event.get("name", "") for event in trace["traceEvents"])
