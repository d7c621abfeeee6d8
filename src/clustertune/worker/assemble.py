"""Model assembly: the HF model (partitioned at creation under ZeRO-3), kernels, LoRA, the
objective's module around it, and the DeepSpeed engine that trains it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustertune.batch_math import BatchLayout, batch_layout
from clustertune.config import Recipe
from clustertune.plan import lean_mlp_applies
from clustertune.shapes import Shape, shape_from_model_path
from clustertune.worker import checkpoint, engine
from clustertune.worker.kernels import VARLEN_ATTENTION
from clustertune.worker.model import apply_lora, attention_implementation, build_causal_lm, model_dtype, use_liger
from clustertune.worker.objectives import Objective
from clustertune.worker.runtime import Runtime


@dataclass
class TrainingParts:
    """What assembly hands the loop: the pieces, not an engine of their own."""

    ds_engine: Any  # DeepSpeed's engine around objective.module(lm): forward, backward, step, save/load
    lm: Any  # the HF causal LM (maybe PEFT-wrapped): export and generation read it
    layout: BatchLayout
    shape: Shape  # sizes for the FLOPs count
    ds_config: dict[str, Any]  # exactly what DeepSpeed got (written to RUN_DIR/ds_config.json)
    hf_ds_config: Any  # keeps transformers' ZeRO-3 registration alive while the model lives


def assemble(recipe: Recipe, rt: Runtime, objective: Objective, *, load_universal: bool = False) -> TrainingParts:
    """Model, kernels, LoRA, the objective's module, DeepSpeed engine. Collective.

    load_universal: the run resumes from a checkpoint of another world size or ZeRO stage."""
    layout = batch_layout(recipe.train, world_size=rt.world_size, packing=recipe.data.packing)
    shape = shape_from_model_path(recipe.model.path, recipe.model.num_layers)
    ds_config = engine.build_deepspeed_config(recipe.train, recipe.zero, layout=layout,
                                              precision=rt.precision, hidden_size=shape.hidden_size,
                                              load_universal=load_universal,
                                              node_local_storage=checkpoint.node_local_dir() is not None)
    zero3 = recipe.zero.stage == 3
    hf_ds_config, zero_init = engine.zero3_init_context(ds_config) if zero3 else (None, None)
    attn = attention_implementation(recipe.model, on_gpu=rt.on_gpu, packing=recipe.data.packing)
    lm = build_causal_lm(recipe.model, dtype=model_dtype(rt.precision), zero3_context=zero_init,
                         gradient_checkpointing=recipe.train.gradient_checkpointing,
                         checkpoint_every_n_layers=recipe.train.checkpoint_every_n_layers, attn=attn,
                         liger=use_liger(recipe.model, on_gpu=rt.on_gpu), init_device=rt.device,
                         lean_mlp=lean_mlp_applies(recipe.train.compile, recipe.lora.wrapped_modules))
    if recipe.train.compile:
        from clustertune.worker.kernels import compile_decoder_layers
        compile_decoder_layers(lm)
    lm = apply_lora(lm, recipe.lora)
    module = objective.module(lm, varlen=attn == VARLEN_ATTENTION)
    ds_engine = engine.initialize(module, ds_config=ds_config, train=recipe.train, on_gpu=rt.on_gpu)
    return TrainingParts(ds_engine, lm, layout, shape, ds_config, hf_ds_config)
