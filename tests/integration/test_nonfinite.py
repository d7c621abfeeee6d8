"""The non-finite guard on the real worker (2 CPU ranks, ZeRO-2): a NaN loss injected on one
rank (test-only fault hook, CLUSTERTUNE_FAULT=nan:loss:<rank>:<steps>) makes the step's loss and
gradients non-finite on every rank; the update is skipped and logged, training goes on, and
train.max_nonfinite_steps such steps in a row stop the run (exit 4) with its last checkpoint
intact."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import metrics, run_export, run_train, write_recipe

pytestmark = pytest.mark.integration


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:08d}")


def test_a_nan_step_is_skipped_and_logged_and_training_goes_on(tmp_path, task_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir, train={"max_steps": 5},
                          checkpoint={"every_steps": 1, "keep_last": 10})
    proc = run_train(recipe, env={"CLUSTERTUNE_FAULT": "nan:loss:1:3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "rank 1 makes its loss NaN at step 3" in output
    assert "warning: step 3: non-finite loss nan" in output and "update skipped (1 in a row of at most 3" in output

    records = {m["step"]: m for m in metrics(run_dir) if "loss" in m}
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert math.isnan(records[3]["loss"]) and records[3]["skipped"] is True
    assert not math.isfinite(records[3]["grad_norm"])
    assert all(math.isfinite(records[s]["loss"]) and "skipped" not in records[s] for s in (1, 2, 4, 5))
    assert records[5]["loss"] < records[1]["loss"]

    # Step 3 changed no weight; the steps around it did.
    before, after, next_step = _weights(run_dir, 2), _weights(run_dir, 3), _weights(run_dir, 4)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert any(not torch.equal(next_step[name], tensor) for name, tensor in before.items())


def test_max_nonfinite_steps_in_a_row_stop_the_run_and_the_last_checkpoint_loads(tmp_path, task_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir, train={"max_steps": 8, "max_nonfinite_steps": 3},
                          checkpoint={"every_steps": 2, "keep_last": 10})
    proc = run_train(recipe, env={"CLUSTERTUNE_FAULT": "nan:loss:0:3-9"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output[-3000:]
    assert "step 5: 3 steps in a row with a non-finite loss or gradient norm" in output
    assert "train.max_nonfinite_steps = 3" in output and "the last complete checkpoint is intact" in output
    assert "Traceback" not in output

    records = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5]
    assert [m.get("skipped", False) for m in records] == [False, False, True, True, True]

    # Checkpoints at steps 2 and 4 only (the run stopped at 5); step 4 holds step 2's weights,
    # and the newest checkpoint exports and loads.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    good, last = _weights(run_dir, 2), _weights(run_dir, 4)
    for name, tensor in good.items():
        assert torch.equal(last[name], tensor), name
        assert torch.isfinite(tensor).all(), name
    assert not (run_dir / "final").exists()
    export = run_export(run_dir, tmp_path / "x")
    assert export.returncode == 0, export.stderr
    assert "exported step 4" in export.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
