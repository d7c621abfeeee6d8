"""Direct preference optimization (train.objective = "dpo", Rafailov et al. 2023), sigmoid loss:

    logit  = beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))
    loss   = -(1 - label_smoothing) * log sigmoid(logit) - label_smoothing * log sigmoid(-logit)

per pair, where log pi(x) is the sum of the policy's log-probs of the completion tokens of x
(the pair's trained tokens, data/preference.py). One loss unit per pair: the step's loss is the
mean over the step's pairs, whatever the accumulation, packing or world size.

A micro-batch holds whole pairs: packed, its pairs' chosen and rejected sequences are the
segments of one row (position ids restart per segment, so attention never crosses them);
unpacked, each sequence is a padded row. Either way the forward returns one log-prob sum per
segment, in the order chosen0, rejected0, chosen1, ...

The reference log-probs are not a second model: they come from a first stage
(worker/reference.py) over the train and eval pairs with the initial policy, stored in
RUN_DIR/reference_logps and looked up here by pair.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from clustertune.config import DpoSection
from clustertune.data.types import PreferencePair
from clustertune.worker import batching
from clustertune.worker.model import TokenLossModel
from clustertune.worker.objectives import MicroBatchLoss

# Metric sums over the step's pairs; step_metrics divides by the pair count.
PAIR_METRICS = ("reward_margin", "pref_accuracy", "logps_chosen", "logps_rejected", "rewards_chosen",
                "rewards_rejected")


class SegmentLogProbModel(TokenLossModel):
    """Forward returns the summed log-prob of the trained tokens of each segment: each row when
    padded, each `segment_lengths` piece of the one row when packed."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                max_length: int | None = None, segment_lengths: list[int] | None = None) -> torch.Tensor:
        token_logps = -self.token_losses(input_ids, position_ids, targets, attention_mask, cu_seq_lens, max_length)
        if segment_lengths is None:
            return token_logps.sum(dim=-1)
        # one scatter-add instead of a split and a sum per segment (hundreds of tiny kernels)
        lengths = torch.tensor(segment_lengths)
        segment_of_token = torch.repeat_interleave(torch.arange(len(segment_lengths)), lengths)
        sums = token_logps.new_zeros(len(segment_lengths))
        return sums.index_add(0, segment_of_token.to(token_logps.device, non_blocking=True), token_logps[0])


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, *, beta: float, label_smoothing: float,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO losses and the implicit rewards beta * (policy - reference) of the
    chosen and the rejected completions."""
    rewards_chosen = beta * (policy_chosen - reference_chosen)
    rewards_rejected = beta * (policy_rejected - reference_rejected)
    logits = rewards_chosen - rewards_rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, rewards_chosen.detach(), rewards_rejected.detach()


class DirectPreferenceOptimization:
    name = "dpo"
    loss_unit = "pairs"

    def __init__(self, *, packing: bool, pad_id: int, dpo: DpoSection, token_budget: int):
        self.packing, self.pad_id, self.dpo = packing, pad_id, dpo
        self.token_budget = token_budget  # train.micro_batch_tokens: the reference stage packs like training
        self.reference: dict[str, tuple[float, float]] = {}  # pair key -> (chosen, rejected) log-probs
        self._reference_by_id: dict[int, tuple[float, float]] = {}  # the same, by the pair object held

    def module(self, lm: Any, *, varlen: bool) -> torch.nn.Module:
        return SegmentLogProbModel(lm, varlen=varlen)

    def loss_units(self, sample: PreferencePair) -> int:
        return 1

    def segment_logps(self, ds_engine: Any, pairs: Sequence[PreferencePair], *, device: torch.device) -> torch.Tensor:
        """[2 * len(pairs)] summed completion log-probs: chosen0, rejected0, chosen1, ... (one
        ignored token's 0 for an empty filler micro-batch)."""
        segments = [s for pair in pairs for s in (pair.chosen, pair.rejected)]
        batch = batching.collate(segments, packing=self.packing, pad_id=self.pad_id)
        if self.packing and segments:
            batch["segment_lengths"] = [len(s.input_ids) for s in segments]
        return ds_engine(**batching.to_device(batch, device))

    def set_reference(self, reference: dict[str, tuple[float, float]], pairs: Sequence[PreferencePair]) -> None:
        self.reference = reference
        self._reference_by_id = {id(p): reference[p.key] for p in pairs if p.key in reference}

    def _reference_of(self, pair: PreferencePair) -> tuple[float, float]:
        found = self._reference_by_id.get(id(pair))
        return found if found is not None else self.reference[pair.key]

    def micro_batch_loss(self, ds_engine: Any, samples: Sequence[PreferencePair], *,
                         device: torch.device) -> MicroBatchLoss:
        logps = self.segment_logps(ds_engine, samples, device=device)
        if not samples:  # a filler micro-batch: a forward/backward that adds nothing
            zero = logps.sum() * 0.0
            return MicroBatchLoss(zero, {name: zero.detach() for name in PAIR_METRICS})
        policy = logps.float().view(-1, 2)
        reference = torch.tensor([self._reference_of(p) for p in samples], dtype=policy.dtype, device=policy.device)
        losses, rewards_chosen, rewards_rejected = dpo_losses(
            policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1],
            beta=self.dpo.beta, label_smoothing=self.dpo.label_smoothing)
        detached = policy.detach()
        metrics = {"reward_margin": (rewards_chosen - rewards_rejected).sum(),
                   "pref_accuracy": (rewards_chosen > rewards_rejected).float().sum(),
                   "logps_chosen": detached[:, 0].sum(), "logps_rejected": detached[:, 1].sum(),
                   "rewards_chosen": rewards_chosen.sum(), "rewards_rejected": rewards_rejected.sum()}
        return MicroBatchLoss(losses.sum(), metrics)

    def step_metrics(self, sums: dict[str, float], plan: batching.StepPlan) -> dict[str, float]:
        pairs = max(1, plan.loss_units)
        return {"pairs": plan.loss_units, **{name: sums[name] / pairs for name in PAIR_METRICS}}

    def before_training(self, parts: Any, data: Any, *, rt: Any, run_dir: Any, resuming: bool,
                        heartbeat: Any) -> None:
        """The reference stage: log-probs of every train and eval pair under the initial policy
        (computed, or loaded from RUN_DIR/reference_logps where an earlier attempt stored them)."""
        from clustertune.worker.reference import reference_logps
        pairs = list(data.train) + list(data.eval)
        values = reference_logps(parts, self, pairs, rt=rt, run_dir=run_dir, resuming=resuming,
                                 token_budget=self.token_budget, packing=self.packing, heartbeat=heartbeat,
                                 log=print if rt.is_main else (lambda *_: None))
        self.set_reference(values, pairs)
