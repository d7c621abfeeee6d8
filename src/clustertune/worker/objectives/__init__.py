"""Training objectives: the one place where an objective differs from another.

The loop core (worker/loop.py, worker/step.py) is the same for every objective:

    step plan (which samples, how they pack, the loss denominator)
      -> for each of this rank's micro-batches: objective.micro_batch_loss -> backward
      -> optimizer step (non-finite guard) -> metrics (+ objective.step_metrics) -> eval -> checkpoint

An objective decides only how samples become a loss and which metrics it adds:

* `module(lm, varlen=...)`: the nn.Module DeepSpeed trains (its forward is the objective's);
* `loss_units(sample)`: what one sample adds to the step's loss denominator (SFT: its trained
  tokens; a preference pair: 1). The step's loss is sum(unit losses) / sum(units) over every
  micro-batch of every rank, so accumulation and world size never change the gradient;
* `micro_batch_loss(ds_engine, samples, device=...)`: forward of one micro-batch: the SUM of its
  unit losses (in the graph) and metric sums (detached) that add up over micro-batches and ranks;
* `step_metrics(sums, plan)`: the objective's entries of the step's metrics record;
* `before_training(parts, data, ...)`: a stage after assembly, before resume and the first step
  (DPO: the reference log-probs; SFT: nothing).

Objectives are plain classes that satisfy `Objective` (no base class to inherit from). An
objective with a generation phase (GRPO) runs it before the step's forwards from the loop, on the
step's sample indices; a preference objective brings its own data preparation and collation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from clustertune.config import DpoSection, GrpoSection

    from clustertune.worker.batching import StepPlan


@dataclass
class MicroBatchLoss:
    loss_sum: "torch.Tensor"  # 0-d, in the autograd graph: the sum of the micro-batch's unit losses
    metric_sums: dict[str, "torch.Tensor"] = field(default_factory=dict)  # 0-d, detached, summed over ranks


class Objective(Protocol):
    name: str
    loss_unit: str  # what loss_units counts ("tokens", "pairs"): eval names its count after it

    def module(self, lm: Any, *, varlen: bool) -> "torch.nn.Module": ...

    def loss_units(self, sample: Any) -> int: ...

    def micro_batch_loss(self, ds_engine: Any, samples: Sequence[Any], *, device: "torch.device") -> MicroBatchLoss: ...

    def step_metrics(self, sums: dict[str, float], plan: "StepPlan") -> dict[str, float]: ...

    def before_training(self, parts: Any, data: Any, *, rt: Any, run_dir: Any, resuming: bool,
                        heartbeat: Any) -> None: ...


def objective_for(name: str = "sft", *, packing: bool, pad_id: int, dpo: "DpoSection | None" = None,
                  token_budget: int = 0, grpo: "GrpoSection | None" = None, tokenizer: Any = None) -> Objective:
    """The recipe's objective (train.objective): "sft", "dpo" (with the [dpo] section and
    train.micro_batch_tokens, which its reference stage packs with) or "grpo" (the [grpo] section;
    the tokenizer decodes completions for the rewards)."""
    if name == "grpo":
        from clustertune.config import GrpoSection
        from clustertune.worker.objectives.grpo import GroupRelativePolicyOptimization
        return GroupRelativePolicyOptimization(packing=packing, pad_id=pad_id, grpo=grpo or GrpoSection(),
                                               tokenizer=tokenizer)
    if name == "dpo":
        from clustertune.config import DpoSection, GrpoSection
        from clustertune.worker.objectives.dpo import DirectPreferenceOptimization
        return DirectPreferenceOptimization(packing=packing, pad_id=pad_id, dpo=dpo or DpoSection(),
                                            token_budget=token_budget)
    from clustertune.worker.objectives.sft import SupervisedFineTuning
    return SupervisedFineTuning(packing=packing, pad_id=pad_id)
