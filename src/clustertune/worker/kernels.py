"""GPU fast paths, each optional and each with a plain-PyTorch equivalent used on CPU:

- varlen attention for packed rows (flash varlen inside torch), so attention never crosses
  sample boundaries and no dense [T, T] mask is built;
- Liger kernels: RMSNorm, RoPE, SwiGLU, and fused linear cross-entropy so the vocabulary-wide
  logits are never materialized in fp32.
"""

from __future__ import annotations

import contextlib
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
