"""Throughput arithmetic (pure) and the rank-0 metrics sinks: progress bar, JSONL, TensorBoard.

MFU follows DESIGN.md: (6 * N_matmul + 12 * L * h * T_eff) * tokens/s / peak, with
T_eff = sum(l^2) / sum(l) over the documents of a batch; gradient-checkpoint recompute is not
counted.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "h20": 148e12, "a100": 312e12, "cpu": 0.0}


def effective_context(document_lengths: Sequence[int]) -> float:
    total = sum(document_lengths)
    return sum(l * l for l in document_lengths) / total if total else 0.0


def flops_per_token(*, matmul_params: int, layers: int, hidden: int, t_eff: float) -> float:
    return 6.0 * matmul_params + 12.0 * layers * hidden * t_eff


def mfu(*, tokens_per_s: float, flops_per_tok: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_tok / peak_flops if peak_flops > 0 else 0.0


def detect_peak_flops() -> float:
    """bf16 dense peak of the local accelerator (0 when unknown or CPU: MFU is then not shown)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return 0.0
        name = torch.cuda.get_device_name().lower()
    except Exception:
        return 0.0
    for key in ("h200", "h100", "h20", "a100"):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return 0.0


class MetricsSink:
    """Writes one JSON object per line to RUN_DIR/metrics.jsonl and mirrors scalars to
    TensorBoard (RUN_DIR/tensorboard) when the package is installed. Rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run appends to the record it continues; a fresh run starts a new one.
        self._file = open(run_dir / "metrics.jsonl", "a" if start_step else "w", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional; JSONL is the record of truth
            self._tb = None
        from tqdm import tqdm
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record.get("step", 0))
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        if "loss" in record and self._bar is not None:
            # postfix first: update() redraws, so the bar shows this step's numbers, not the last.
            self._bar.set_postfix_str(_postfix(record), refresh=False)
            self._bar.update(step - self._bar.n)

    def write(self, text: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def _postfix(record: dict[str, Any]) -> str:
    parts = [f"loss {record['loss']:.4f}"]
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "grad_norm" in record:
        parts.append(f"gnorm {record['grad_norm']:.2f}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu"):
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    return " | ".join(parts)
