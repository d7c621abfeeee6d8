"""The non-finite guard: a step whose loss or gradient norm is NaN or infinite changes no weight.

DeepSpeed itself skips such an update (ZeRO 1-3 treat a non-finite gradient norm as an overflow:
gradients dropped, no optimizer step, `was_step_applied()` False, its step counter still
advancing), so the step counter, the data position and the LR schedule (a pure function of the
step) all stay consistent. This guard counts those steps, reports each with its step, and stops
the run after `train.max_nonfinite_steps` in a row: the weights are then still those of the last
good step, and no checkpoint of a poisoned model is ever written, because the run stops before
the next save. Should an update with a non-finite loss or norm ever be applied (a DeepSpeed path
without the overflow check), the run stops at once, before any save.

Pure bookkeeping (no torch): every rank sees the same all-reduced loss and global norm, so every
rank reaches the same verdict and they stop together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clustertune.errors import UserError


class TrainingDiverged(UserError):
    """Non-finite losses or gradient norms: the run stops; its last complete checkpoint is intact."""

    exit_code = 4


def is_nonfinite(loss: float, grad_norm: float | None) -> bool:
    """grad_norm None: the optimizer path reports no norm; the loss decides alone."""
    return not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))


@dataclass
class NonFiniteGuard:
    max_in_row: int  # train.max_nonfinite_steps
    in_row: int = 0
    total: int = 0

    def check(self, *, step: int, loss: float, grad_norm: float | None, applied: bool) -> bool:
        """After optimizer step `step` (1-based): True when it was non-finite (and skipped).
        Raises TrainingDiverged when the run must stop. grad_norm None: not reported."""
        if not is_nonfinite(loss, grad_norm):
            self.in_row = 0
            return False
        self.in_row += 1
        self.total += 1
        what = f"loss {loss}, gradient norm {grad_norm}"
        if applied:
            raise TrainingDiverged(
                f"step {step}: non-finite {what}, and the optimizer applied the update (this DeepSpeed path "
                "has no overflow check), so the weights are no longer usable; stopping before any checkpoint "
                "is saved. Resume from the last complete checkpoint (--resume) with a lower train.lr, or "
                "train.precision = \"fp32\"")
        if self.in_row >= self.max_in_row:
            raise TrainingDiverged(
                f"step {step}: {self.in_row} steps in a row with a non-finite loss or gradient norm ({what}; "
                f"train.max_nonfinite_steps = {self.max_in_row}); no update was applied since the last good "
                "step and the last complete checkpoint is intact. Lower train.lr, raise train.warmup_steps or "
                "check the data of these steps, then resume with --resume")
        return True

    def message(self, step: int, *, loss: float, grad_norm: float | None) -> str:
        return (f"warning: step {step}: non-finite loss {loss} / gradient norm {grad_norm}: update skipped "
                f"({self.in_row} in a row of at most {self.max_in_row}, train.max_nonfinite_steps; "
                f"{self.total} in this run)")
