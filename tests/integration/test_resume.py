"""Resume, proven on the real worker (2 CPU processes, gloo, tiny model, deterministic):

* exact resume: per-step losses after a resume equal an uninterrupted run's, for a resume that
  crosses epoch boundaries and one that starts mid-epoch, with a partial (marker-less) newer
  checkpoint on disk that resume must ignore;
* world-size change: a 2-rank checkpoint resumes on 1 rank and a 1-rank one on 2 ranks (ZeRO-2), and
  a 2-rank ZeRO-3 one on 1 rank, through an automatic conversion to DeepSpeed's universal
  checkpoint; training continues where it was.

A small dataset (24 samples, global batch 8) makes an epoch 3 steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import metrics, run_train, write_recipe, write_uppercase_task

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_task(tmp_path_factory, task_dir) -> Path:
    root = tmp_path_factory.mktemp("small")
    write_uppercase_task(root / "train.jsonl", count=24, seed=1)
    return root


def recipe_for(tmp_path: Path, name: str, task_dir: Path, small_task: Path, run_dir: Path, *, zero_stage: int = 2,
               run: dict | None = None, **train) -> Path:
    return write_recipe(tmp_path / f"{name}.toml", task_dir, run_dir, run=run or {},
                        data={"train_files": [str(small_task / "train.jsonl")], "cache_dir": str(small_task / "cache")},
                        train={"max_steps": 7, "schedule": "cosine", **train},
                        zero={"stage": zero_stage},
                        checkpoint={"every_steps": 2, "keep_last": 10})


def by_step(run_dir: Path) -> dict[int, dict]:
    """One record per step; a resume's later lines win."""
    return {m["step"]: m for m in metrics(run_dir) if "loss" in m}


def crash_after(src: Path, dst: Path, step: int, *, partial: int | None = None) -> None:
    """A copy of run `src` as if it had died right after the checkpoint of `step` (optionally
    mid-save of the checkpoint `partial`: its directory without the marker)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    for ckpt in (dst / "checkpoints").glob("step_*"):
        n = int(ckpt.name.split("_")[1])
        if n == partial:
            (ckpt / "COMPLETE.json").unlink()
        elif n > step:
            shutil.rmtree(ckpt)
    lines = [line for line in (src / "metrics.jsonl").read_text().splitlines()
             if line.strip() and json.loads(line).get("step", 0) <= step]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def test_exact_resume_mid_epoch_and_across_epoch_boundaries(tmp_path, task_dir, small_task):
    full_dir = tmp_path / "full"
    assert run_train(recipe_for(tmp_path, "full", task_dir, small_task, full_dir)).returncode == 0
    reference = by_step(full_dir)
    assert sorted(reference) == list(range(1, 8))
    marker = json.loads((full_dir / "checkpoints" / "step_00000004" / "COMPLETE.json").read_text())
    assert marker["step"] == 4 and marker["world_size"] == 2 and marker["zero_stage"] == 2
    assert marker["data"] == {"samples_consumed": 32, "epoch": 1, "step_in_epoch": 1, "num_samples": 24}
    assert len(marker["recipe_hash"]) == 64 and marker["deepspeed_version"]
    assert (full_dir / "checkpoints" / "step_00000004" / "rng_state_rank00001.pt").is_file()

    # step 2 (epoch 0) -> 7 crosses the epoch boundaries at steps 3 and 6; the newer step-4
    # checkpoint is partial (died mid-save) and must be ignored. Step 4 -> 7 starts mid-epoch 1.
    for start, partial in ((2, 4), (4, None)):
        cut = tmp_path / f"cut{start}"
        crash_after(full_dir, cut, start, partial=partial)
        proc = run_train(recipe_for(tmp_path, f"cut{start}", task_dir, small_task, cut), "--resume")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"(step {start})" in proc.stderr and "warning: resume" not in proc.stderr
        resumed = by_step(cut)
        assert sorted(resumed) == list(range(1, 8))
        for step in range(start + 1, 8):
            assert resumed[step]["loss"] == reference[step]["loss"], (start, step, resumed[step], reference[step])
            assert resumed[step]["grad_norm"] == reference[step]["grad_norm"]
            assert resumed[step]["lr"] == reference[step]["lr"]


def test_resume_with_a_changed_recipe_warns(tmp_path, task_dir, small_task):
    """A changed lr breaks exactness: the resume says which field changed (and still runs);
    a longer max_steps is not a recipe change, but a cosine schedule stretches, which it says too."""
    run_dir = tmp_path / "run"
    assert run_train(recipe_for(tmp_path, "a", task_dir, small_task, run_dir, max_steps=2)).returncode == 0
    proc = run_train(recipe_for(tmp_path, "b", task_dir, small_task, run_dir, max_steps=4, lr=1e-3), "--resume",
                     nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 2)" in proc.stderr
    assert "train.lr 0.003 -> 0.001" in proc.stderr
    assert "the run now has 4 steps (checkpoint: 2)" in proc.stderr
    # resumed on 1 rank from a 2-rank checkpoint: converted to a universal checkpoint first
    assert "converting it to a universal checkpoint for world size 1" in proc.stderr
    assert sorted(by_step(run_dir)) == [1, 2, 3, 4]


@pytest.mark.parametrize("first, then, zero_stage", [(2, 1, 2), (1, 2, 2), (2, 1, 3)],
                         ids=["2to1", "1to2", "zero3-2to1"])
def test_resume_on_a_different_world_size(tmp_path, task_dir, small_task, first, then, zero_stage):
    """The step's samples are split differently over ranks but the loss is normalized over the
    whole step, so the resumed trajectory stays on the uninterrupted one (not restarted).
    Under ZeRO-3 the parameters themselves are partitioned too, so the conversion must also
    rebuild them, not only the optimizer state."""
    full_dir = tmp_path / "full"
    assert run_train(recipe_for(tmp_path, "full", task_dir, small_task, full_dir, max_steps=6, zero_stage=zero_stage),
                     nproc=first).returncode == 0
    reference = by_step(full_dir)
    cut = tmp_path / "cut"
    crash_after(full_dir, cut, 4)
    # Onto 2 ranks, rank 0 converts for longer than the collective timeout, as it does for a 32B
    # model: rank 1 must wait for it, not time out.
    slow, timeouts = ({"CLUSTERTUNE_FAULT": "sleep:universal_conversion:0:15"}, {"collective_timeout_s": 10}) \
        if then > 1 else ({}, {})
    proc = run_train(recipe_for(tmp_path, "cut", task_dir, small_task, cut, max_steps=6, zero_stage=zero_stage,
                                run=timeouts), "--resume", nproc=then, env=slow)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("sleeps 15 s at universal_conversion" in proc.stdout + proc.stderr) == (then > 1)
    assert f"saved with world size {first}" in proc.stderr and "(step 4)" in proc.stderr
    assert (cut / "checkpoints" / "step_00000004" / "universal" / "zero").is_dir()
    resumed = by_step(cut)
    assert sorted(resumed) == list(range(1, 7))
    for step in (5, 6):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4), (step, resumed, reference)
    # continued, not restarted: well below the first steps' loss
    assert resumed[5]["loss"] < 0.9 * reference[1]["loss"]
    marker = json.loads((cut / "checkpoints" / "step_00000006" / "COMPLETE.json").read_text())
    assert marker["world_size"] == then and marker["step"] == 6
