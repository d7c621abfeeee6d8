"""ZeRO-1 in bf16, the stage `auto` picks on one GPU, accumulates gradients in fp32 through DeepSpeed's
BF16_Optimizer (zero.grad_accum_dtype "auto"): on 2 CPU ranks in bf16 that path trains with several
micro-batches per step, skips and logs a NaN step, resumes from its checkpoint to the same losses as
an uninterrupted run, and `clustertune export` writes a model that loads (zero_to_fp32 does not read
this optimizer's files: engine.consolidated_parameters reads the model file instead)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import metrics, run_export, run_train, write_recipe
from test_resume import crash_after

pytestmark = pytest.mark.integration

BF16_ZERO1 = {"zero": {"stage": 1}, "train": {"precision": "bf16", "max_steps": 6, "lr": 3e-3}}


def _losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def test_fp32_accumulation_trains_skips_a_nan_step_resumes_and_exports(tmp_path, task_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir, zero=BF16_ZERO1["zero"],
                          train={**BF16_ZERO1["train"], "max_steps": 4},
                          checkpoint={"every_steps": 2, "keep_last": 5})
    proc = run_train(recipe, env={"CLUSTERTUNE_FAULT": "nan:loss:1:3"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["data_types"] == {"grad_accum_dtype": "fp32"} and ds_config["zero_optimization"]["stage"] == 1
    assert "warning: step 3: non-finite loss nan" in proc.stdout + proc.stderr
    records = {m["step"]: m for m in metrics(run_dir) if "loss" in m}
    assert records[3]["skipped"] is True and all("skipped" not in records[s] for s in (1, 2, 4))

    # The same recipe continued to 6 steps from the step-4 checkpoint (a run extended after it ended).
    longer = write_recipe(tmp_path / "r6.toml", task_dir, run_dir, zero=BF16_ZERO1["zero"],
                          train=BF16_ZERO1["train"], checkpoint={"every_steps": 2, "keep_last": 5})
    proc = run_train(longer, "--resume")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    losses = _losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(losses[s]) for s in (4, 5, 6))

    export = run_export(run_dir, tmp_path / "x")
    assert export.returncode == 0, export.stderr
    assert "exported step 6" in export.stdout
    # the offline export of the step-6 checkpoint = the run's own final/ export from the live engine
    offline = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    live = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    probe = torch.tensor([[1, 5, 9, 12, 40, 41, 77, 3]])
    with torch.no_grad():
        torch.testing.assert_close(offline(probe).logits, live(probe).logits)
    assert all(torch.isfinite(t).all() for t in offline.state_dict().values())
    # Its model file holds the whole model: a node without the other rank's optimizer shard (checkpoints
    # kept per node) exports the same weights, where a ZeRO-2/3 checkpoint needs every shard.
    for f in (run_dir / "checkpoints" / "step_00000006").glob("*rank_1_*optim_states.pt"):
        f.unlink()
    assert not list((run_dir / "checkpoints" / "step_00000006").glob("*rank_1_*optim_states.pt"))
    alone = run_export(run_dir, tmp_path / "y")
    assert alone.returncode == 0, alone.stderr
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "y")(probe).logits,
                                   live(probe).logits)


def test_resume_gives_the_uninterrupted_runs_losses(tmp_path, task_dir):
    """A 6-step run as if it had died after its step-4 checkpoint, resumed: the same losses at steps 5
    and 6 as the uninterrupted run, so ZeRO-1's fp32 master and Adam states come back exactly."""
    straight = tmp_path / "straight"
    six = write_recipe(tmp_path / "six.toml", task_dir, straight, **BF16_ZERO1,
                       checkpoint={"every_steps": 2, "keep_last": 10})
    assert run_train(six).returncode == 0
    crashed = tmp_path / "crashed"
    crash_after(straight, crashed, 4)
    again = write_recipe(tmp_path / "again.toml", task_dir, crashed, **BF16_ZERO1,
                         checkpoint={"every_steps": 2, "keep_last": 10})
    proc = run_train(again, "--resume")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a, b = _losses(straight), _losses(crashed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, a, b)


def test_a_one_gpu_checkpoint_resumes_on_two_ranks(tmp_path, task_dir):
    """Trained on one rank (what `auto` gives one GPU), resumed on two: the BF16_Optimizer checkpoint
    goes through DeepSpeed's universal conversion like the other stages' and training continues on
    the uninterrupted run's trajectory (bf16: the step's samples split over 2 ranks round differently)."""
    straight = tmp_path / "straight"
    six = write_recipe(tmp_path / "six.toml", task_dir, straight, **BF16_ZERO1,
                       checkpoint={"every_steps": 2, "keep_last": 10})
    assert run_train(six, nproc=1).returncode == 0
    crashed = tmp_path / "crashed"
    crash_after(straight, crashed, 4)
    again = write_recipe(tmp_path / "again.toml", task_dir, crashed, **BF16_ZERO1,
                         checkpoint={"every_steps": 2, "keep_last": 10})
    proc = run_train(again, "--resume", nproc=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "saved with world size 1" in proc.stderr
    a, b = _losses(straight), _losses(crashed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        assert b[step] == pytest.approx(a[step], rel=2e-2), (step, a, b)
    assert b[5] < 0.9 * a[1]


def test_freeing_each_bf16_gradient_at_once_trains_the_same_steps(tmp_path, task_dir):
    """zero.immediate_grad_update (the default) adds each parameter's bf16 gradient into the fp32 buffer
    inside backward and frees it; DeepSpeed's own way copies them all after each micro-batch. Same
    samples, same weights, several micro-batches per step on 2 ranks: the same losses and gradient norms."""
    runs = {}
    for immediate in (True, False):
        run_dir = tmp_path / f"immediate_{immediate}"
        recipe = write_recipe(tmp_path / f"{immediate}.toml", task_dir, run_dir,
                              zero={**BF16_ZERO1["zero"], "immediate_grad_update": immediate},
                              train={**BF16_ZERO1["train"], "max_steps": 4})
        proc = run_train(recipe)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert json.loads((run_dir / "ds_config.json").read_text())["bf16"]["immediate_grad_update"] is immediate
        runs[immediate] = {m["step"]: m for m in metrics(run_dir) if "loss" in m}
    assert sorted(runs[True]) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        for key in ("loss", "grad_norm"):
            assert runs[True][step][key] == pytest.approx(runs[False][step][key], rel=1e-3), (step, key, runs)
    assert runs[True][4]["loss"] < runs[True][1]["loss"]
