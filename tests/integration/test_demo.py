"""The main job with no arguments: the embedded demo learns its task (README's first command)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.integration


def test_demo_learns_the_task_and_exports_a_loadable_model(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "clustertune.cli", "demo", "--set", f"run.output_dir={tmp_path / 'demo'}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    before = float(re.search(r"exact match before training.*?: ([\d.]+)%", output).group(1))
    after = float(re.search(r"exact match after training.*?: ([\d.]+)%", output).group(1))
    print(f"demo: {before}% -> {after}% in {elapsed:.0f} s")
    assert before <= 10.0
    assert after >= 90.0
    assert "loaded with from_pretrained" in output
    assert (tmp_path / "demo" / "final" / "model.safetensors").is_file()
    # Budget: under 3 minutes on 2 idle cores; allow for a loaded CI machine.
    assert elapsed < 360
