"""Resume: find the newest checkpoint complete on every node, convert it when the world size or
ZeRO stage changed, and load model, optimizer and this rank's RNG from it. Data order and LR are
pure functions of the step, so nothing else needs restoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from clustertune import watchdog
from clustertune.config import Recipe
from clustertune.worker import checkpoint, distributed, engine
from clustertune.worker.runtime import Runtime, restore_rng, rng_file


@dataclass(frozen=True)
class ResumePoint:
    step: int
    directory: Path  # checkpoints/step_N (on this node)
    marker: dict[str, Any]
    universal: bool  # saved on another world size / ZeRO stage: load its universal conversion


def find_resume_point(run_dir: Path, rt: Runtime, recipe: Recipe, *, total_steps: int,
                      num_samples: int) -> ResumePoint | None:
    """The newest step complete on every node (ranks agree by all-gathering the complete steps
    each one sees), prepared for loading: converted to a universal checkpoint (by one process)
    when it was saved on another world size or ZeRO stage. Collective: call on every rank."""
    mine = [step for step, _ in checkpoint.complete_checkpoints(run_dir)]
    everyone: list[Any] = [mine]
    if dist.is_initialized() and rt.world_size > 1:
        everyone = [None] * rt.world_size
        dist.all_gather_object(everyone, mine)
    step = checkpoint.newest_common_step(everyone)
    if step is None:
        if rt.is_main:
            seen = sorted({s for steps in everyone for s in steps})
            print("--resume: no checkpoint complete on every node" + (f" (complete somewhere: {seen})" if seen
                  else "") + ", starting from step 0", flush=True)
        return None
    directory = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(step)
    marker = checkpoint.read_marker(directory)
    if rt.is_main:
        if mine and mine[-1] != step:
            print(f"resume: step {mine[-1]} is not complete on every node; taking step {step}", flush=True)
        for problem in checkpoint.resume_problems(marker, recipe=recipe, total_steps=total_steps,
                                                  num_samples=num_samples):
            print(f"warning: resume will not be exact: {problem}", flush=True)
    old_world, old_stage = marker.get("world_size", rt.world_size), marker.get("zero_stage", recipe.zero.stage)
    universal = old_world != rt.world_size or old_stage != recipe.zero.stage
    if universal:
        node_local = checkpoint.node_local_dir() is not None
        if node_local and max(int(marker.get("nodes", 1)), distributed.node_count(rt.world_size)) > 1:
            raise checkpoint.CheckpointError(  # every rank reaches it alike: one line each, exit 2
                f"resume: checkpoint step {step} was saved by world size {old_world} (ZeRO-{old_stage}) and this "
                f"run has world size {rt.world_size} (ZeRO-{recipe.zero.stage}); changing it needs every rank's "
                f"shards in one directory, but {checkpoint.NODE_LOCAL_ENV} keeps them per node. Copy every "
                f"node's {directory.name} into one directory and resume with a shared checkpoint directory")

        def convert() -> None:
            print(f"resume: step {step} was saved with world size {old_world} (ZeRO-{old_stage}); converting it "
                  f"to a universal checkpoint for world size {rt.world_size}", flush=True)
            watchdog.fault_point("universal_conversion", rank=rt.rank, step=step)  # TEST-ONLY hook
            engine.convert_to_universal(directory, directory / "universal")

        distributed.while_others_wait(convert, works=rt.is_main, timeout_s=distributed.LONG_WAIT_S)
    return ResumePoint(step, directory, marker, universal)


def resume_from(ds_engine: Any, point: ResumePoint, rt: Runtime) -> int:
    """Load model, optimizer and this rank's RNG; returns the step to continue from."""
    if point.universal:
        state = engine.load_checkpoint(ds_engine, point.directory, "universal")
    else:
        state = engine.load_checkpoint(ds_engine, point.directory.parent, point.directory.name)
    step = int(state.get("step", point.step))
    rng = point.directory / rng_file(rt.rank)
    if rng.is_file():
        restore_rng(torch.load(rng, weights_only=False), rt)
    elif rt.is_main:
        print(f"resume: no saved RNG state for rank {rt.rank} (world size changed); keeping the seeded one",
              flush=True)
    if rt.is_main:
        print(f"resumed from {point.directory} (step {step})", flush=True)
    return step
