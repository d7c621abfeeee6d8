"""One optimizer step's forwards and backwards, for any objective: this rank's micro-batches of
the step plan through `objective.micro_batch_loss`, each loss scaled so that the step's gradient
is sum(unit losses) / (the step's loss units) over every micro-batch and rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from clustertune import watchdog
from clustertune.worker import engine
from clustertune.worker.batching import StepPlan
from clustertune.worker.objectives import Objective
from clustertune.worker.runtime import Runtime


@dataclass(frozen=True)
class StepLoss:
    loss: float  # mean loss per loss unit over every rank: what the gradient is of
    metric_sums: dict[str, float]  # the objective's metric sums over every micro-batch and rank


def forward_backward(ds_engine: Any, objective: Objective, plan: StepPlan, samples: Sequence[Any], *,
                     rt: Runtime) -> StepLoss:
    """Forward and backward over this rank's micro-batches of `plan`; the gradients are left
    accumulated for the optimizer step. Collective (the loss is summed over ranks)."""
    mine = plan.per_rank[rt.rank]
    # DeepSpeed averages gradients over ranks; scaling by world size turns that average into the
    # sum over ranks, so the gradient is sum(unit losses) / (step's loss units).
    scale = rt.world_size / max(1, plan.loss_units)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for m, group in enumerate(mine):
        out = objective.micro_batch_loss(ds_engine, [samples[i] for i in group], device=rt.device)
        if m == 0 and watchdog.fault_point("loss", rank=rt.rank, step=plan.step + 1):  # TEST-ONLY hook
            out.loss_sum = out.loss_sum * float("nan")
        engine.backward(ds_engine, out.loss_sum * scale, is_last_micro_batch=m == len(mine) - 1)
        loss_sum += out.loss_sum.detach().double()
        for name, value in out.metric_sums.items():  # the same names on every micro-batch and rank
            metric_sums[name] = metric_sums.get(name, 0.0) + value.detach().double()
    names = sorted(metric_sums)
    totals = torch.stack([loss_sum, *(metric_sums[n] for n in names)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    values = totals.tolist()
    return StepLoss(loss=values[0] / max(1, plan.loss_units), metric_sums=dict(zip(names, values[1:])))
