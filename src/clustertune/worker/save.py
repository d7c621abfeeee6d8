"""The checkpoint save protocol, collective: every rank writes (and fsyncs) its shards and its
RNG state; after a barrier the completion marker is written; after a second barrier the old
checkpoints are rotated away, so a crash between markers never leaves nodes without a common
complete step. (Markers, rotation and discovery: worker/checkpoint.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clustertune import watchdog
from clustertune.batch_math import steps_per_epoch
from clustertune.config import Recipe
from clustertune.worker import checkpoint, distributed, engine
from clustertune.worker.runtime import Runtime, rng_file, rng_state


def save_checkpoint(ds_engine: Any, run_dir: Path, step: int, recipe: Recipe, rt: Runtime,
                    best: tuple[int, float] | None = None, *, total_steps: int, num_samples: int) -> None:
    """Save step `step` as checkpoints/step_N (collective: call on every rank).

    `best`: (step, eval loss) of the best checkpoint so far (keep_best), recorded and kept."""
    tag = checkpoint.tag_for(step)
    root = checkpoint.checkpoint_root(run_dir)
    (root / tag).mkdir(parents=True, exist_ok=True)
    watchdog.fault_point("before_shards", rank=rt.rank, step=step)  # TEST-ONLY fault hook (no-op normally)
    torch.save(rng_state(rt), root / tag / rng_file(rt.rank))
    engine.save_checkpoint(ds_engine, root, tag, client_state={"step": step})
    watchdog.fault_point("after_shards", rank=rt.rank, step=step)
    distributed.barrier()
    watchdog.fault_point("after_barrier", rank=rt.rank, step=step)
    # One marker writer and one rotator per filesystem: global rank 0 with a shared filesystem,
    # each node's local rank 0 when every node has its own directory (CLUSTERTUNE_NODE_LOCAL_DIR).
    writer = rt.local_rank == 0 if checkpoint.node_local_dir() is not None else rt.is_main
    if writer:
        per_epoch = steps_per_epoch(num_samples, recipe.train.global_batch_size)
        checkpoint.write_marker(root / tag, checkpoint.marker_info(
            step=step, world_size=rt.world_size, zero_stage=recipe.zero.stage, recipe=recipe,
            total_steps=total_steps, num_samples=num_samples,
            global_batch_size=recipe.train.global_batch_size, steps_per_epoch=max(1, per_epoch),
            nodes=distributed.node_count(rt.world_size), deepspeed_version=engine.deepspeed_version()))
        if best is not None:
            checkpoint.write_best(run_dir, step=best[0], eval_loss=best[1])
    distributed.barrier()
    if writer:
        checkpoint.rotate(run_dir, recipe.checkpoint.keep_last, protect={best[0]} if best else frozenset())
    distributed.barrier()
