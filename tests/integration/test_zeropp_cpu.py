"""ZeRO++ hierarchical partitioning (zero.hpz_partition_size) on CPU with gloo, 2 processes: it
trains, and the losses are those of plain ZeRO-3 (the secondary partition changes where the
weights are gathered from, not the arithmetic). The quantized variants need CUDA kernels (DeepSpeed:
"This op had not been implemented on CPU backend"): benchmarks/gpu_sandbox.sh measures them."""

from __future__ import annotations

import pytest

from conftest import metrics, run_train, write_recipe

pytestmark = pytest.mark.integration


def test_hpz_trains_with_the_losses_of_plain_zero3(task_dir, tmp_path):
    losses = {}
    for name, zero in (("plain", {"stage": 3}), ("hpz", {"stage": 3, "hpz_partition_size": 2})):
        run_dir = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.toml", task_dir, run_dir, train={"max_steps": 3}, zero=zero)
        proc = run_train(recipe)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses[name] = [m["loss"] for m in metrics(run_dir) if "loss" in m]
        assert '"zero_hpz_partition_size": 2' in (run_dir / "ds_config.json").read_text() or name == "plain"
    assert len(losses["hpz"]) == 3
    assert losses["hpz"] == pytest.approx(losses["plain"], rel=1e-5)
