"""The lean MLP's backward as one Triton kernel (CUDA; worker/kernels.py falls back to torch's
elementwise ops where triton is missing, as in CPU builds of torch).

Reads grad_product, gate and up once and writes grad_gate and grad_up into gate's and up's storage
(as Liger's SwiGLU backward does: they are dead after it) and, when asked, the recomputed product
silu(gate) * up for down_proj's weight gradient into grad_product's storage, so the backward
allocates nothing HF's MLP does not. Measured on one H100 (benchmarks/NOTES.md, session 7, at the
same recompute): Liger's product kernel into a new buffer cost 4-6% of the step; this one 0.5% on W1
(every 2nd layer recomputed), but still 5.5% on W3 with every layer recomputed: in isolation the MLP
tail's forward and backward take 24.7 vs 22.9 ms there (benchmarks/lean_mlp_gemm.py), a quarter of
the end-to-end cost; the rest not found. The planner recomputes fewer layers there, where it pays.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

AVAILABLE = triton is not None
_BLOCK = 1024  # columns per program; a 2-D grid keeps every SM busy at any intermediate size

if AVAILABLE:
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
    """(grad_gate, grad_up, product or None) of contiguous CUDA tensors [..., n]; gate, up and
    grad_product are overwritten (each element is read before it is written)."""
    n_cols = gate.shape[-1]
    gate2, up2 = gate.view(-1, n_cols), up.view(-1, n_cols)
    grad2 = grad_product.reshape(-1, n_cols).contiguous()
    grid = (gate2.shape[0], triton.cdiv(n_cols, _BLOCK))
    with torch.cuda.device(gate.device):
        _swiglu_backward_kernel[grid](grad2, gate2, up2, gate2.stride(0), n_cols,
                                      WRITE_PRODUCT=want_product, BLOCK=_BLOCK, num_warps=4)
    return gate, up, grad2.view(gate.shape) if want_product else None
