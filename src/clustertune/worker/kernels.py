"""GPU fast paths, each optional and each with a plain-PyTorch equivalent used on CPU:

- varlen attention for packed rows (flash varlen inside torch), so attention never crosses
  sample boundaries and no dense [T, T] mask is built;
- Liger kernels: RMSNorm, RoPE, SwiGLU, and fused linear cross-entropy so the vocabulary-wide
  logits are never materialized in fp32;
- the lean MLP: down_proj(silu(gate) * up) that keeps gate and up for backward, not the product
  (on a GPU Liger's SwiGLU forward kernel and worker/swiglu_triton.py's backward; torch's
  elementwise ops elsewhere).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from typing import Any

import torch
import torch.nn.functional as F

from clustertune.data.types import IGNORE_INDEX

VARLEN_ATTENTION = "clustertune_varlen"


def varlen_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: q/k/v [1, heads, T, d] of one packed row."""
    from torch.nn.attention.varlen import varlen_attn

    if "cu_seq_lens_q" not in kwargs:
        # A call that is not one of our packed rows (e.g. generate): plain causal sdpa.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    cu = kwargs["cu_seq_lens_q"]
    max_len = kwargs["max_length_q"]
    q = query.squeeze(0).transpose(0, 1)  # [T, heads, d]
    k = key.squeeze(0).transpose(0, 1)
    v = value.squeeze(0).transpose(0, 1)
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _VARLEN_GQA:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **_VARLEN_EXTRA)
    if isinstance(out, tuple):
        out = out[0]
    return out.unsqueeze(0), None  # [1, T, heads, d], as the HF interface expects


# torch 2.11 varlen_attn takes fewer k/v heads than q heads (probed on H100, benchmarks/NOTES.md)
_VARLEN_GQA = True
_VARLEN_EXTRA: dict[str, Any] = {}


def register_varlen_attention() -> str:
    """Register the varlen function with transformers; returns the attn_implementation name."""
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface

    global _VARLEN_EXTRA
    params = inspect.signature(varlen_attn).parameters
    # The signature moved between torch releases: causal masking is a flag on some, a
    # window on others.
    if "is_causal" in params:
        _VARLEN_EXTRA = {"is_causal": True}
    elif "window_size" in params:
        _VARLEN_EXTRA = {"window_size": (-1, 0)}
    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    return VARLEN_ATTENTION


@contextlib.contextmanager
def dense_attention(config: Any):
    """sdpa instead of the varlen kernel while generating with the model of this (HF) config.

    The varlen kernel needs a packed row's cu_seqlens, which generate does not pass; and
    transformers builds no attention mask for an attention it has no mask function for, so in a
    left-padded generate batch the padding (and a static KV cache's unwritten slots) would be
    attended. sdpa gets the proper mask: the same weights, the same math."""
    old = config._attn_implementation
    if old != VARLEN_ATTENTION:
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = old


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """cu_seqlens of one packed row from its restarting position ids."""
    pos = position_ids.view(-1)
    starts = torch.nonzero(pos == 0, as_tuple=False).view(-1)
    total = torch.tensor([pos.numel()], device=pos.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def compile_decoder_layers(lm) -> int:
    """Regional torch.compile of every decoder layer's attention and MLP blocks, in place (the
    same code and shapes in every layer, so the layers share compiled graphs; dynamic sequence
    length avoids a recompile per row length). The blocks, not the whole layer: the layer's
    forward is what activation checkpointing wraps, and dynamo cannot trace the checkpoint around
    Liger's RMSNorm autograd function (AssertionError in overwrite_tensor_vt_proxy, torch 2.11,
    H100, 2026-11-26). Returns the number of layers compiled."""
    from clustertune.worker.model import decoder_layers
    layers = decoder_layers(lm)
    for layer in layers:
        layer.self_attn.compile(dynamic=True)
        layer.mlp.compile(dynamic=True)
    return len(layers)


# The decoder-layer ops Liger can swap (apply_liger_kernel_to_qwen2's flags), and those swapped.
LIGER_LAYER_OPS = ("rope", "rms_norm", "swiglu")
LIGER_LAYER_KERNELS = LIGER_LAYER_OPS


def apply_liger(lm) -> None:
    """Swap the LIGER_LAYER_KERNELS of a Qwen2 model instance for Liger's Triton kernels."""
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2
    apply_liger_kernel_to_qwen2(**{op: op in LIGER_LAYER_KERNELS for op in LIGER_LAYER_OPS},
                                cross_entropy=False, fused_linear_cross_entropy=False, model=lm)


def install_fused_head_loss(lm_head) -> None:
    """Make `lm_head(hidden, targets)` return the summed cross-entropy via Liger's fused linear
    cross-entropy. Going through the module call (not reading lm_head.weight directly) keeps
    ZeRO-3's gather/release hooks in charge of the partitioned weight. The chunk size of its pass
    over the vocabulary is plan.LIGER_CHUNK_MEM_CONST, the value the planner counts."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from clustertune.plan import LIGER_CHUNK_MEM_CONST

    def forward(self, hidden, targets=None):
        if targets is None:
            return F.linear(hidden, self.weight, self.bias)
        return liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), self.weight, targets.reshape(-1),
                                                self.bias, ignore_index=IGNORE_INDEX, reduction="sum",
                                                chunk_mem_const=LIGER_CHUNK_MEM_CONST)

    lm_head.forward = types.MethodType(forward, lm_head)
    lm_head.clustertune_fused_loss = True


# ------------------------------------------------------------------------------------ lean MLP

def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.is_cuda and _liger_swiglu() is not None:
        return _liger_swiglu()(gate, up)[2]
    return F.silu(gate) * up


def _silu_mul_backward(gate: torch.Tensor, up: torch.Tensor, grad_product: torch.Tensor, want_product: bool):
    """(grad of gate, grad of up, silu(gate) * up or None). On a GPU one Triton kernel, which writes
    the grads into gate's and up's storage."""
    if gate.is_cuda and _triton_swiglu() is not None:
        return _triton_swiglu().swiglu_backward(gate, up, grad_product, want_product)
    wide = torch.promote_types(gate.dtype, torch.float32)  # bf16 math in fp32, as the kernel does
    gate_w, up_w, grad_w = gate.to(wide), up.to(wide), grad_product.to(wide)
    sig = torch.sigmoid(gate_w)
    grad_up = grad_w * gate_w * sig
    grad_gate = grad_w * up_w * sig * (1 + gate_w * (1 - sig))
    product = _silu_mul(gate, up) if want_product else None
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype), product


@functools.cache
def _liger_swiglu():
    try:
        from liger_kernel.ops.swiglu import swiglu_forward
    except ImportError:
        return None
    return swiglu_forward


@functools.cache
def _triton_swiglu():
    from clustertune.worker import swiglu_triton
    return swiglu_triton if swiglu_triton.AVAILABLE else None


class SwiGLUDown(torch.autograd.Function):
    """down_proj(silu(gate) * up) keeping gate, up and the weight for backward, not the product.

    HF's MLP (and Liger's) leaves the product as down_proj's saved input: i values per token per
    layer, a quarter of what a non-recomputed Qwen2.5-1.5B layer keeps. Recomputing it is one
    elementwise pass in backward, against a whole layer's forward for each layer that activation
    checkpointing would otherwise recompute to fit the same memory."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up, weight)
        return F.linear(_silu_mul(gate, up), weight)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        want_weight_grad = ctx.needs_input_grad[2]  # False: frozen under LoRA of other modules
        grad_gate, grad_up, product = _silu_mul_backward(gate, up, grad_out @ weight, want_weight_grad)
        grad_weight = None
        if want_weight_grad:
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ product.reshape(-1, product.shape[-1])
        return grad_gate, grad_up, grad_weight


LEAN_MLP_MARK = "clustertune_lean_mlp"


def _down_proj_forward(self, x, up=None):
    """down_proj(x) as nn.Linear, or down_proj(gate, up) through SwiGLUDown. Going through the module
    call keeps ZeRO-3's gather/release hooks in charge of the partitioned weight."""
    if up is None:
        return F.linear(x, self.weight, self.bias)
    return SwiGLUDown.apply(x, up, self.weight)


def _lean_mlp_forward(self, x):
    if isinstance(self.down_proj, torch.nn.Linear) and getattr(self.down_proj, LEAN_MLP_MARK, False):
        return self.down_proj(self.gate_proj(x), self.up_proj(x))
    return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # down_proj wrapped since (LoRA)


def install_lean_mlp(lm) -> int:
    """Give every decoder layer's SiLU MLP the lean forward (after Liger's swap, which it replaces).
    Returns the number of MLPs changed: 0 for a model whose MLP is not gate/up/down with SiLU and
    no bias."""
    from clustertune.worker.model import decoder_layers
    changed = 0
    for layer in decoder_layers(lm):
        mlp = layer.mlp
        down = getattr(mlp, "down_proj", None)
        if (getattr(getattr(mlp, "config", None), "hidden_act", None) not in ("silu", "swish")
                or type(down) is not torch.nn.Linear
                or down.bias is not None or not hasattr(mlp, "gate_proj") or not hasattr(mlp, "up_proj")):
            continue
        down.forward = types.MethodType(_down_proj_forward, down)
        setattr(down, LEAN_MLP_MARK, True)
        mlp.forward = types.MethodType(_lean_mlp_forward, mlp)
        changed += 1
    return changed
