"""Throughput records and the rank-0 metrics sinks: progress bar, JSONL, TensorBoard.

The arithmetic (FLOPs per token, MFU at any world size) is clustertune.flops, shared with the
planner and the benchmarks; the per-GPU peak comes from the one catalog, clustertune.gpus, by the
CUDA device name. Every record carries the cluster's tokens/s and tokens/s per GPU; MFU is per
GPU (cluster FLOPs over world size x one GPU's peak); memory is in GiB (2**30 bytes).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from clustertune.flops import effective_context, flops_per_token, mfu  # noqa: F401  (re-exported)
from clustertune.gpus import peak_flops_for_device

GIB = 2**30


def detect_peak_flops() -> float:
    """bf16 dense peak of the local accelerator (0 when unknown or CPU: MFU is then not shown)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return 0.0
        name = torch.cuda.get_device_name()
    except Exception:
        return 0.0
    return peak_flops_for_device(name) or 0.0


def throughput(*, document_lengths: Sequence[int], elapsed_s: float, world_size: int, matmul_params: int,
               layers: int, hidden: int, peak_flops_per_gpu: float) -> dict[str, float]:
    """The throughput part of a step record: the documents of one optimizer step (all ranks)
    processed in `elapsed_s`. Keys: tokens_per_s (cluster), tokens_per_s_per_gpu, mfu (per GPU)."""
    cluster = sum(document_lengths) / elapsed_s
    fpt = flops_per_token(matmul_params=matmul_params, layers=layers, hidden=hidden,
                          t_eff=effective_context(document_lengths))
    return {"tokens_per_s": cluster, "tokens_per_s_per_gpu": cluster / world_size,
            "mfu": mfu(cluster_tokens_per_s=cluster, flops_per_tok=fpt, world_size=world_size,
                       peak_flops_per_gpu=peak_flops_per_gpu),
            "world_size": world_size}


def peak_memory_gib() -> float:
    """torch.cuda.max_memory_allocated() of this rank's device, in GiB."""
    import torch
    return torch.cuda.max_memory_allocated() / GIB


def allocated_gib() -> float:
    """torch.cuda.memory_allocated() now, in GiB."""
    import torch
    return torch.cuda.memory_allocated() / GIB


def peak_reserved_gib() -> float:
    """torch.cuda.max_memory_reserved(): what the caching allocator held at most, allocated or not.
    The gap to peak_memory_gib is the allocator slack the planner counts as FRAGMENTATION."""
    import torch
    return torch.cuda.max_memory_reserved() / GIB


def alloc_retries() -> int:
    """Times the caching allocator found no free block, freed its cache and retried (cumulative). Each
    one synchronises the GPU and costs a slow step: the memory plan's margin was too thin."""
    import torch
    return int(torch.cuda.memory_stats().get("num_alloc_retries", 0))


def alloc_retry_warning(*, step: int, retries: int, warned: bool) -> str | None:
    """The log line for the first step after which this rank's allocator has retried (None otherwise):
    memory at the card's edge slows steps silently, so say it once and name what gives headroom."""
    if warned or retries <= 0:
        return None
    return (f"warning: by step {step} the CUDA caching allocator found no free block {retries} time(s), freed "
            "its cache and retried; each retry synchronises the GPU and slows that step. This run's memory is "
            "at the card's edge: a smaller train.micro_batch_tokens or more recompute (train.gradient_checkpointing, "
            "a smaller train.checkpoint_every_n_layers) gives headroom; `clustertune plan` shows the plan. "
            "metrics.jsonl counts every retry (alloc_retries).")


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
        from tqdm import tqdm
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception as err:  # JSONL stays the record of truth; say what is missing, once
            self._tb = None
            self.write(f"warning: TensorBoard events are not written ({type(err).__name__}: {err}); "
                       f"metrics.jsonl has every value. Install it with: pip install tensorboard")

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
        text = f"{record['tokens_per_s']:,.0f} tok/s"
        if "tokens_per_s_per_gpu" in record:
            text += f" ({record['tokens_per_s_per_gpu']:,.0f}/{'GPU' if record.get('mfu') else 'rank'})"
        parts.append(text)
    if record.get("mfu"):
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "mem_gib" in record:
        parts.append(f"{record['mem_gib']:.1f} GiB")
    return " | ".join(parts)
