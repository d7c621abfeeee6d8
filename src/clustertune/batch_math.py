"""Batch arithmetic and the learning-rate schedule: pure functions of recipe sections.

Standard library (and the torch-free config) only, so the launcher can check a recipe's batch
arithmetic before any worker starts, and the worker uses the very same functions:

    from clustertune.batch_math import batch_layout, total_steps, lr_multiplier
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clustertune.config import RecipeError, TrainSection


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's samples split over ranks and micro-batches."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    gradient_accumulation_steps: int


def batch_layout(train: TrainSection, *, world_size: int, packing: bool) -> BatchLayout:
    """global = micro x accumulation x world, checked with the arithmetic in the message.

    With packing a micro-batch is one packed row of up to train.micro_batch_tokens tokens, and the
    number of rows per step follows from the data; the nominal accumulation is still derived here
    so that DeepSpeed's train_batch_size bookkeeping is consistent.
    """
    if world_size < 1:
        raise RecipeError(f"world size must be >= 1 (got {world_size})")
    micro = 1 if packing else train.micro_batch_size
    per_step = micro * world_size
    if packing:
        gas = max(1, train.global_batch_size // world_size // max(1, train.micro_batch_size))
    else:
        if train.global_batch_size % per_step:
            raise RecipeError(
                f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({micro}) x world size ({world_size}) = {per_step}")
        gas = train.global_batch_size // per_step
    return BatchLayout(train.global_batch_size, micro, world_size, gas)


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    return num_samples // global_batch_size


def total_steps(*, num_samples: int, global_batch_size: int, max_steps: int | None, epochs: float | None) -> int:
    per_epoch = steps_per_epoch(num_samples, global_batch_size)
    if per_epoch == 0:
        raise RecipeError(f"the training set has {num_samples} samples, fewer than one global batch "
                          f"(train.global_batch_size = {global_batch_size})")
    if max_steps is not None:
        return max_steps
    assert epochs is not None
    return max(1, int(epochs * per_epoch))


def lr_multiplier(step: int, *, train: TrainSection, total_steps: int) -> float:
    """Linear warmup, then cosine / linear decay to min_lr_ratio, or constant. Pure: the LR of a
    step depends on nothing else, so resume restores no scheduler state."""
    warmup = train.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if train.schedule == "constant" or total_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = train.min_lr_ratio
    if train.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
