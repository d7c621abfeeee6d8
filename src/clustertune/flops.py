"""Model FLOPs and MFU at any world size. Pure arithmetic: the worker, the planner and the
benchmarks all call these, so "MFU" means one thing everywhere.

    from clustertune.flops import flops_per_token, effective_context, mfu
    fpt = flops_per_token(matmul_params=shape.matmul_parameter_count(), layers=shape.num_hidden_layers,
                          hidden=shape.hidden_size, t_eff=effective_context(document_lengths))
    mfu(cluster_tokens_per_s=50_407, flops_per_tok=fpt, world_size=2, peak_flops_per_gpu=989e12)

The convention: FLOPs per token = 6 * N_matmul + 12 * L * h * T_eff, with N_matmul the
parameters minus the input embedding (lm_head counted), T_eff = sum(l^2) / sum(l) over the
documents of a packed batch (attention only sees its own document), real tokens only; the
recompute of gradient checkpointing is not counted. MFU divides the FLOPs the whole cluster does
per second by what the whole cluster could do: world size x the per-GPU peak of clustertune.gpus.
Never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from clustertune.gpus import peak_flops_for_device


class _ShapeLike(Protocol):
    num_hidden_layers: int
    hidden_size: int

    def matmul_parameter_count(self) -> int: ...


def effective_context(document_lengths: Sequence[int]) -> float:
    """T_eff = sum(l^2) / sum(l): the context an average token attends over (0 for no tokens)."""
    total = sum(document_lengths)
    return sum(l * l for l in document_lengths) / total if total else 0.0


def flops_per_token(*, matmul_params: int, layers: int, hidden: int, t_eff: float) -> float:
    """Training FLOPs (forward + backward) per real token: 6 per matmul parameter + attention."""
    return 6.0 * matmul_params + 12.0 * layers * hidden * t_eff


def model_flops_per_token(shape: _ShapeLike, t_eff: float) -> float:
    """flops_per_token for a clustertune.shapes.Shape."""
    return flops_per_token(matmul_params=shape.matmul_parameter_count(), layers=shape.num_hidden_layers,
                           hidden=shape.hidden_size, t_eff=t_eff)


def tokens_per_s_per_gpu(cluster_tokens_per_s: float, world_size: int) -> float:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    return cluster_tokens_per_s / world_size


def mfu(*, cluster_tokens_per_s: float, flops_per_tok: float, world_size: int, peak_flops_per_gpu: float) -> float:
    """Model FLOPs utilization of the whole job: cluster tokens/s x FLOPs per token over
    world size x per-GPU peak. The same as one GPU's tokens/s x FLOPs per token over one GPU's
    peak when every rank does the same work. 0 when the peak is unknown (CPU, an unlisted card)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    if not peak_flops_per_gpu or peak_flops_per_gpu <= 0:
        return 0.0
    return cluster_tokens_per_s * flops_per_tok / (world_size * peak_flops_per_gpu)


def peak_flops_per_gpu(gpu: str) -> float | None:
    """Dense bf16 peak of a GPU named like `--gpu` ("h100") or like the CUDA device
    ("NVIDIA H100 80GB HBM3"); None when the catalog (clustertune.gpus) does not know it."""
    return peak_flops_for_device(gpu)
