"""Supervised fine-tuning: cross-entropy on the trained (assistant) tokens, normalized by the
step's trained-token count over every micro-batch and rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from clustertune.worker import batching
from clustertune.worker.objectives import MicroBatchLoss
from clustertune.worker.model import TokenLossModel


@dataclass(frozen=True)
class SupervisedFineTuning:
    packing: bool  # data.packing: one packed row per micro-batch, else padded rows
    pad_id: int
    name: str = "sft"
    loss_unit: str = "tokens"

    def module(self, lm: Any, *, varlen: bool) -> torch.nn.Module:
        return TokenLossModel(lm, varlen=varlen)

    def loss_units(self, sample: Any) -> int:
        return sample.num_trained

    def micro_batch_loss(self, ds_engine: Any, samples: Sequence[Any], *, device: torch.device) -> MicroBatchLoss:
        batch = batching.collate(samples, packing=self.packing, pad_id=self.pad_id)
        return MicroBatchLoss(ds_engine(**batching.to_device(batch, device)))

    def step_metrics(self, sums: dict[str, float], plan: batching.StepPlan) -> dict[str, float]:
        return {"trained_tokens": plan.loss_units}

    def before_training(self, parts: Any, data: Any, *, rt: Any, run_dir: Any, resuming: bool,
                        heartbeat: Any) -> None:
        """Nothing before SFT's first step."""
