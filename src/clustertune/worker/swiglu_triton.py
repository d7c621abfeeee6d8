"""The lean MLP's backward as one Triton kernel (CUDA only; worker/kernels.py imports it lazily).

Reads grad_product, gate and up once and writes grad_gate and grad_up into gate's and up's storage
(as Liger's SwiGLU backward does: they are dead after it) and, when asked, the recomputed product
silu(gate) * up for down_proj's weight gradient into grad_product's. A separate forward kernel for the product would
read gate and up a second time: measured 5-6% of the step on one H100 (benchmarks/NOTES.md,
session 7, call 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # columns per program; a 2-D grid keeps every SM busy at any intermediate size


@triton.jit
def _swiglu_backward_kernel(grad_ptr, gate_ptr, up_ptr, stride, n_cols,
                            WRITE_PRODUCT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    offsets = row * stride + cols
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0).to(tl.float32)
    up_raw = tl.load(up_ptr + offsets, mask=mask, other=0)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0).to(tl.float32)
    up = up_raw.to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    if WRITE_PRODUCT:  # as the forward rounds it: silu in the activation dtype, times up
        tl.store(grad_ptr + offsets, silu.to(up_raw.dtype) * up_raw, mask=mask)
    tl.store(gate_ptr + offsets, (grad * up * sig * (1 + gate * (1 - sig))).to(up_raw.dtype), mask=mask)
    tl.store(up_ptr + offsets, (grad * silu).to(up_raw.dtype), mask=mask)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad_product: torch.Tensor, want_product: bool):
    """(grad_gate, grad_up, product or None); gate, up and grad_product are overwritten."""
    n_cols = gate.shape[-1]
    gate2, up2 = gate.view(-1, n_cols), up.view(-1, n_cols)
    grad2 = grad_product.reshape(-1, n_cols).contiguous()
    # The product goes into grad_product's storage (each element is read before it is written):
    # the backward then allocates nothing HF's MLP does not.
    grid = (gate2.shape[0], triton.cdiv(n_cols, _BLOCK))
    with torch.cuda.device(gate.device):
        _swiglu_backward_kernel[grid](grad2, gate2, up2, gate2.stride(0), n_cols,
                                      WRITE_PRODUCT=want_product, BLOCK=_BLOCK, num_warps=4)
    return gate, up, grad2.view(gate.shape) if want_product else None
