"""Model side of the worker: tokenizer, HF causal LM (local directory or built-in shape), ZeRO-3
partitioned creation, LoRA, gradient checkpointing, and the token-loss wrapper that DeepSpeed
trains.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clustertune.config import LoraSection, ModelSection, RecipeError
from clustertune.data.types import IGNORE_INDEX
from clustertune.preflight import tokenizer_location
from clustertune.shapes import lookup_shape, shape_from_model_path


def load_tokenizer(model: ModelSection):
    """From preflight.tokenizer_location's directory (the one rule launcher and worker share)."""
    from transformers import AutoTokenizer
    directory, key = tokenizer_location(model)
    if not directory.is_dir():
        raise RecipeError(f"{key} {str(directory)!r} is not a directory (the tokenizer is read from it)")
    tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def hf_config(model: ModelSection):
    from transformers import AutoConfig, Qwen2Config
    if lookup_shape(model.path) is not None:  # a built-in shape, maybe cut to model.num_layers
        return Qwen2Config(**shape_from_model_path(model.path, model.num_layers).hf_config_dict())
    return AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)


def attention_implementation(model: ModelSection, *, on_gpu: bool = False, packing: bool = False) -> str:
    """auto: flash varlen for packed rows on GPU when torch has it, else sdpa (which takes the
    block-diagonal mask transformers derives from restarting position ids)."""
    if model.attn_implementation != "auto":
        return model.attn_implementation
    if on_gpu and packing:
        from clustertune.worker import kernels
        if kernels.varlen_available():
            return kernels.register_varlen_attention()
    return "sdpa"


def use_liger(model: ModelSection, *, on_gpu: bool) -> bool:
    return model.liger == "on" or (model.liger == "auto" and on_gpu)


def build_causal_lm(model: ModelSection, *, dtype: torch.dtype, zero3_context=None,
                    gradient_checkpointing: bool = False, checkpoint_every_n_layers: int = 1,
                    attn: str | None = None, liger: bool = False, lean_mlp: bool = False,
                    init_device: torch.device | None = None):
    """Create (random shape) or load (local directory) the HF model.

    `zero3_context` (from engine.zero3_init_context) makes every rank build only its partition.
    `lean_mlp`: the MLP recomputes silu(gate) * up in backward (plan.lean_mlp_applies decides).
    `init_device`: where a random-init shape is built without ZeRO-3 (the rank's GPU: random init
    of billions of parameters on host cores takes tens of seconds before the first step).
    """
    from transformers import AutoModelForCausalLM

    config = hf_config(model)
    config.use_cache = False
    attn = attn or attention_implementation(model)
    random_init = lookup_shape(model.path) is not None
    if zero3_context is not None:
        ctx = zero3_context
    elif random_init and init_device is not None:
        ctx = torch.device(init_device)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        if random_init:
            lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        else:
            lm = AutoModelForCausalLM.from_pretrained(
                model.path, config=config, dtype=dtype, attn_implementation=attn,
                trust_remote_code=model.trust_remote_code)
    # from_pretrained hands the model back in eval mode, and HF's decoder layers checkpoint only
    # when `self.training`: without this, a model loaded from a directory (the real fine-tuning
    # case) silently trained with gradient checkpointing off, 6-7 GiB over plan on a 1.5B model.
    lm.train()
    if liger:
        from clustertune.worker import kernels
        kernels.apply_liger(lm)
        kernels.install_fused_head_loss(lm.lm_head)
    if lean_mlp:
        from clustertune.worker import kernels
        kernels.install_lean_mlp(lm)
    if gradient_checkpointing:
        enable_activation_checkpointing(lm, every_n_layers=checkpoint_every_n_layers)
    return lm


# transformers renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn
# and go in v6); the GPU image's older transformers has only the old ones.
def enable_activation_checkpointing(lm, every_n_layers: int = 1) -> None:
    """Non-reentrant checkpointing of decoder layers 0, n, 2n, ... (every layer for n = 1).

    Selection goes through each decoder layer's public `gradient_checkpointing` flag
    (GradientCheckpointingLayer), which both the GPU image's transformers and newer ones read;
    only the newer ones take an `every_n_layers` argument."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if every_n_layers > 1:
        for index, layer in enumerate(decoder_layers(lm)):
            layer.gradient_checkpointing = index % every_n_layers == 0


def decoder_layers(lm) -> list:
    """The decoder layers of a causal LM, LoRA-wrapped or not (HF's `model.layers`)."""
    return list(base_causal_lm(lm).model.layers)


def is_activation_checkpointing(lm) -> bool:
    name = "is_activation_checkpointing" if hasattr(type(lm), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(lm, name, False))


def apply_lora(lm, lora: LoraSection):
    if not lora.enabled:
        return lm
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(lm, config)
    if is_activation_checkpointing(lm):
        # Frozen embeddings give checkpointed blocks inputs without grad; this keeps them in the graph.
        peft_model.enable_input_require_grads()
    return peft_model


def base_causal_lm(lm):
    """The HF *ForCausalLM under an optional PEFT wrapper."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class TokenLossModel(nn.Module):
    """Forward returns the SUM of the cross-entropy over trained tokens of the micro-batch.

    The loop divides by the step's trained-token count (all micro-batches, all ranks), so
    accumulation and uneven lengths give exactly the big-batch gradient. `token_losses` gives
    the per-token values ([batch, seq], 0 where ignored) for evaluation and tests.
    """

    def __init__(self, lm, *, varlen: bool = False):
        super().__init__()
        self.lm = lm
        self.varlen = varlen  # packed rows go through the varlen attention kernel (kernels.py)

    def _hidden(self, input_ids, position_ids, attention_mask, cu_seq_lens=None, max_length=None):
        causal_lm = base_causal_lm(self.lm)
        extra = {}
        if self.varlen and attention_mask is None:
            from clustertune.worker.kernels import varlen_kwargs
            if cu_seq_lens is not None:  # from collate, computed on the CPU (no host-device sync)
                extra = {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                         "max_length_q": max_length, "max_length_k": max_length}
            else:
                extra = varlen_kwargs(position_ids)
        hidden = causal_lm.model(input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=attention_mask, use_cache=False, **extra).last_hidden_state
        return causal_lm, hidden

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor,
                attention_mask: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                max_length: int | None = None) -> torch.Tensor:
        causal_lm, hidden = self._hidden(input_ids, position_ids, attention_mask, cu_seq_lens, max_length)
        if getattr(causal_lm.lm_head, "clustertune_fused_loss", False):
            return causal_lm.lm_head(hidden, targets).float()
        return self._plain_token_losses(causal_lm, hidden, targets).sum()

    def token_losses(self, input_ids, position_ids, targets, attention_mask=None, cu_seq_lens=None,
                     max_length=None) -> torch.Tensor:
        causal_lm, hidden = self._hidden(input_ids, position_ids, attention_mask, cu_seq_lens, max_length)
        # Materializes [tokens, vocab] fp32 logits (DPO/GRPO log-probs, eval). Measured on one H100
        # (2026-11-26): clustertune DPO 0.32x TRL's tokens/s at 2.2x its peak memory. Liger >= 0.8's
        # fused linear cross-entropy with reduction="none" would avoid it; not yet run on a GPU.
        return self._plain_token_losses(causal_lm, hidden, targets)

    @staticmethod
    def _plain_token_losses(causal_lm, hidden, targets) -> torch.Tensor:
        logits = causal_lm.lm_head(hidden).float()
        losses = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none")
        return losses.view(targets.shape)


def model_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def describe(lm) -> dict[str, Any]:
    trainable = sum(p.numel() if getattr(p, "ds_numel", None) is None else p.ds_numel
                    for p in lm.parameters() if p.requires_grad)
    total = sum(p.numel() if getattr(p, "ds_numel", None) is None else p.ds_numel for p in lm.parameters())
    return {"parameters": total, "trainable": trainable}
