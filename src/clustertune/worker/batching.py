"""Which samples each rank trains in each optimizer step, and how they become tensors.

Every rank holds the identical sample list, so every rank computes the identical plan locally:
no communication is needed to agree on the step's loss units (the loss denominator)
or on the number of micro-batches (ZeRO-3 needs all ranks to run the same number of forwards).
The plan is a pure function of (step, sample lengths, layout), which also makes resume exact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from clustertune.batch_math import BatchLayout, steps_per_epoch
from clustertune.data.types import IGNORE_INDEX


@dataclass(frozen=True)
class StepPlan:
    step: int
    # per_rank[r][m] = dataset indices of micro-batch m on rank r; [] is a filler micro-batch
    # that runs a forward/backward on one ignored token so collectives stay matched.
    per_rank: tuple[tuple[tuple[int, ...], ...], ...]
    # The loss denominator: the objective's loss units (SFT: trained tokens) of the step's samples,
    # over all ranks and micro-batches.
    loss_units: int

    @property
    def micro_batches_per_rank(self) -> int:
        return len(self.per_rank[0])


def epoch_permutation(num_samples: int, epoch: int, seed: int) -> list[int]:
    """Epoch 0 keeps the data module's seeded shuffle; later epochs reshuffle, seeded by epoch."""
    order = list(range(num_samples))
    if epoch > 0:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_sample_indices(step: int, *, num_samples: int, global_batch_size: int, seed: int) -> list[int]:
    """The dataset indices consumed by optimizer step `step` (incomplete epoch tails are skipped)."""
    per_epoch = steps_per_epoch(num_samples, global_batch_size)
    epoch, within = divmod(step, per_epoch)
    order = epoch_permutation(num_samples, epoch, seed)
    return order[within * global_batch_size:(within + 1) * global_batch_size]


def pack_bins(indices: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: few rows, each holding whole samples of at most `budget` tokens."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > budget:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the packing budget {budget}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return bins


def _balance(groups: list[list[int]], lengths: Sequence[int], world_size: int) -> list[list[list[int]]]:
    """Largest group first to the least-loaded rank, so ranks finish a step at about the same time."""
    per_rank: list[list[list[int]]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for group in sorted(groups, key=lambda g: (-sum(lengths[i] for i in g), g)):
        r = min(range(world_size), key=lambda k: (load[k], len(per_rank[k]), k))
        per_rank[r].append(group)
        load[r] += sum(lengths[i] for i in group)
    return per_rank


def plan_step(step: int, indices: Sequence[int], *, lengths: Sequence[int], units: Sequence[int],
              layout: BatchLayout, packing: bool, token_budget: int) -> StepPlan:
    world = layout.world_size
    if packing:
        per_rank = _balance(pack_bins(indices, lengths, token_budget), lengths, world)
    else:
        per_rank_count = len(indices) // world
        per_rank = []
        for r in range(world):
            mine = list(indices[r * per_rank_count:(r + 1) * per_rank_count])
            per_rank.append([mine[m:m + layout.micro_batch_size]
                             for m in range(0, len(mine), layout.micro_batch_size)])
    depth = max(1, max(len(groups) for groups in per_rank))
    padded = tuple(tuple(tuple(g) for g in groups) + ((),) * (depth - len(groups)) for groups in per_rank)
    return StepPlan(step=step, per_rank=padded, loss_units=sum(units[i] for i in indices))


# ------------------------------------------------------------------------ tensors (torch side)

def to_device(batch: dict, device) -> dict:
    """Tensors to `device` through pinned memory without blocking the host; other values as is."""
    import torch

    if device.type != "cuda":
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return {k: (v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def collate(samples: Sequence, *, packing: bool, pad_id: int, pad_to_multiple: int = 1) -> dict:
    """Samples (input_ids, pre-shifted targets) -> model inputs.

    Packed: one row, position ids restart at every sample; transformers derives the
    block-diagonal (document) mask from the position ids, so attention never crosses samples.
    Padded: right padding with an attention mask. An empty list gives one ignored pad token.
    """
    import torch

    if not samples:
        one = torch.tensor([[pad_id]])
        return {"input_ids": one, "position_ids": torch.zeros_like(one),
                "targets": torch.full_like(one, IGNORE_INDEX), "attention_mask": None}
    if packing:
        ids = [t for s in samples for t in s.input_ids]
        tgt = [t for s in samples for t in s.targets]
        pos = [p for s in samples for p in range(len(s.input_ids))]
        # The varlen kernel's sample boundaries, computed here on the CPU: deriving them from
        # position ids on the GPU costs two host-device syncs per micro-batch.
        lens = [len(s.input_ids) for s in samples]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
                "targets": torch.tensor([tgt]), "attention_mask": None,
                "cu_seq_lens": torch.tensor(cu, dtype=torch.int32), "max_length": max(lens)}
    width = max(len(s.input_ids) for s in samples)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(samples), width), pad_id)
    tgt = torch.full((len(samples), width), IGNORE_INDEX)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        tgt[row, :n] = torch.tensor(s.targets)
        mask[row, :n] = 1
    pos = torch.arange(width).unsqueeze(0).expand(len(samples), width).contiguous()
    return {"input_ids": ids, "position_ids": pos, "targets": tgt, "attention_mask": mask}
