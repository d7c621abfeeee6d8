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


@dataclass
class PendingStepLoss:
    """The step's loss and metric sums on their way to the host: all-reduced and copied behind the
    backward in the GPU's queue, ahead of the optimizer update, so reading them (`result`) after
    queueing the update waits for the copy, not for the update."""
    values: torch.Tensor  # [loss sum, metric sums...] summed over ranks (host memory once `ready`)
    names: list[str]
    loss_units: int
    ready: Any = None  # a CUDA event after the copy to the host (None: nothing left to wait for)

    def result(self) -> StepLoss:
        if self.ready is not None:
            self.ready.synchronize()
        values = self.values.tolist()
        return StepLoss(loss=values[0] / max(1, self.loss_units), metric_sums=dict(zip(self.names, values[1:])))


def _to_host_behind_queue(totals: torch.Tensor, names: list[str], loss_units: int) -> PendingStepLoss:
    """Sum `totals` over ranks and start its copy to the host without blocking the host."""
    if dist.is_initialized():
        work = dist.all_reduce(totals, async_op=True)
        work.wait()  # NCCL: the current stream waits for the all-reduce, the host does not
    if not totals.is_cuda:
        return PendingStepLoss(values=totals, names=names, loss_units=loss_units)
    host = torch.empty(totals.shape, dtype=totals.dtype, pin_memory=True)
    host.copy_(totals, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return PendingStepLoss(values=host, names=names, loss_units=loss_units, ready=ready)


def forward_backward(ds_engine: Any, objective: Objective, plan: StepPlan, samples: Sequence[Any], *,
                     rt: Runtime) -> PendingStepLoss:
    """Forward and backward over this rank's micro-batches of `plan`; the gradients are left
    accumulated for the optimizer step. Collective (the loss is summed over ranks, asynchronously:
    call `.result()` after `engine.optimizer_step`, so the host never waits on the GPU in between)."""
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
    return _to_host_behind_queue(torch.stack([loss_sum, *(metric_sums[n] for n in names)]), names, plan.loss_units)
