"""The one module that talks to DeepSpeed: config generation (pure), process group, initialize,
backward and step, save/load, universal conversion, ZeRO-3 gathers.

`build_deepspeed_config` is a pure function of recipe sections and the world size; it resolves
every number (no "auto") so the JSON written to the run directory is exactly what ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.batch_math import BatchLayout
from clustertune.config import TrainSection, ZeroSection
from clustertune.plan import fp32_grad_accumulation
from clustertune.worker.checkpoint import fsync_tree


DEEPSPEED_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's own default, written out so the JSON says what ran


def build_deepspeed_config(train: TrainSection, zero: ZeroSection, *, layout: BatchLayout,
                           precision: str, hidden_size: int, load_universal: bool = False,
                           node_local_storage: bool = False) -> dict[str, Any]:
    """The complete DeepSpeed JSON for one run. Pure: no I/O, no processes, no torch.

    load_universal: the run resumes from a universal checkpoint (a different world size).
    node_local_storage: nodes share no filesystem; each node's local rank 0 writes the
    non-ZeRO model-states file into its own checkpoint directory (DeepSpeed's own switch).
    """
    layout_total = layout.micro_batch_size * layout.gradient_accumulation_steps * layout.world_size
    zero_block: dict[str, Any] = {
        "stage": zero.stage,
        "overlap_comm": zero.overlap_comm,
        "contiguous_gradients": True,
        # Bucket defaults follow DeepSpeed's HF integration heuristics (hidden^2 based), resolved
        # here so the written JSON is exactly what ran.
        "reduce_bucket_size": zero.reduce_bucket_size or hidden_size * hidden_size,
    }
    if zero.stage in (1, 2):
        zero_block["allgather_bucket_size"] = zero.allgather_bucket_size or max(int(5e8), hidden_size * hidden_size)
        zero_block["reduce_scatter"] = True
    if zero.stage == 3:
        zero_block["stage3_prefetch_bucket_size"] = zero.prefetch_bucket_size or int(0.9 * hidden_size * hidden_size)
        zero_block["stage3_param_persistence_threshold"] = (
            10 * hidden_size if zero.param_persistence_threshold is None else zero.param_persistence_threshold)
        zero_block["sub_group_size"] = zero.sub_group_size or DEEPSPEED_SUB_GROUP_SIZE
        if zero.hpz_partition_size and zero.hpz_partition_size > 1:  # ZeRO++ hierarchical partitioning
            zero_block["zero_hpz_partition_size"] = zero.hpz_partition_size
        if zero.quantized_weights:
            zero_block["zero_quantized_weights"] = True
        if zero.quantized_gradients:
            zero_block["zero_quantized_gradients"] = True
        zero_block["stage3_max_live_parameters"] = int(1e9)
        zero_block["stage3_max_reuse_distance"] = int(1e9)
        # We gather weights ourselves, shard by shard, at export (export.export_hf_model).
        zero_block["stage3_gather_16bit_weights_on_model_save"] = False
    if zero.offload_optimizer:
        zero_block["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if zero.offload_params:
        zero_block["offload_param"] = {"device": "cpu", "pin_memory": True}

    config: dict[str, Any] = {
        "train_batch_size": layout_total,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.gradient_accumulation_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero_block,
        # torch's AdamW is what we pass in; DeepSpeed only lists its own optimizers as tested.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own metrics do the logging
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
        if fp32_grad_accumulation(zero.grad_accum_dtype, stage=zero.stage, precision=precision,
                                  offload_optimizer=zero.offload_optimizer):
            config["data_types"] = {"grad_accum_dtype": "fp32"}  # DeepSpeed's BF16_Optimizer
            config["bf16"]["immediate_grad_update"] = zero.immediate_grad_update
    if load_universal or node_local_storage:
        config["checkpoint"] = {"load_universal": load_universal, "use_node_local_storage": node_local_storage}
    if zero.offload_optimizer:
        # CPU-offloaded optimizer states need DeepSpeed's vectorized CPU Adam to be fast.
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": train.lr, "betas": [train.adam_beta1, train.adam_beta2], "eps": 1e-8,
            "weight_decay": train.weight_decay}}
    return config


# ------------------------------------------------------------------- DeepSpeed at run time

def init_distributed(*, on_gpu: bool, timeout_s: float | None = None) -> None:
    """timeout_s: how long any collective may wait for a peer (run.collective_timeout_s)."""
    import datetime
    import deepspeed
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", **kwargs)


def zero3_init_context(ds_config: dict[str, Any]):
    """Context in which models are created partitioned (no rank materializes the whole model).

    Also registers the config with transformers so `from_pretrained` loads shard by shard into
    the partitioned parameters. The returned object must stay alive while loading.
    """
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    if ds_config["zero_optimization"].get("zero_hpz_partition_size", 1) > 1:
        # ZeRO++: transformers enters zero.Init itself (for the config registered above); ours around
        # it would make the nested Init create the node-local partition group a second time, which
        # DeepSpeed refuses ("ZeRO parameter intra parallel group is already initialized").
        import contextlib
        return hf_ds_config, contextlib.nullcontext()
    return hf_ds_config, deepspeed.zero.Init(config_dict_or_path=ds_config)


def initialize(module, *, ds_config: dict[str, Any], train: TrainSection, on_gpu: bool):
    """Wrap `module` in a DeepSpeed engine with our AdamW (the LR is set per step by set_lr)."""
    import deepspeed
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                                      eps=1e-8, fused=on_gpu)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=module, model_parameters=groups if optimizer is None else None,
        optimizer=optimizer, config=ds_config)
    return engine


def backward(engine, loss, *, is_last_micro_batch: bool) -> None:
    """Backward without DeepSpeed's 1/accumulation scaling: our loss is already normalized by
    the step's trained-token count, and the number of micro-batches may vary per step."""
    engine.set_gradient_accumulation_boundary(is_last_micro_batch)
    engine.backward(loss, scale_wrt_gas=False)


def set_lr(engine, lr: float) -> None:
    """The schedule is a pure function of the step (lr_multiplier), so resume needs no state."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


@dataclass(frozen=True)
class OptimizerStep:
    grad_norm: float | None  # global gradient norm before clipping (None: this path reports none)
    applied: bool  # False: DeepSpeed skipped the update (non-finite gradients), weights unchanged


def optimizer_step(engine) -> OptimizerStep:
    """Apply the accumulated gradients. DeepSpeed's ZeRO optimizers check the gradient norm first
    and, when it is not finite, drop the gradients instead (its overflow path; see
    worker/nonfinite.py): the step counts, the weights and optimizer states stay as they were."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return OptimizerStep(grad_norm=float(norm) if norm is not None else None, applied=engine.was_step_applied())


def save_checkpoint(engine, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
    """Every rank writes its shards; then fsyncs what it sees of the tag directory, so the
    completion marker written after the next barrier never points at data still in page cache."""
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    fsync_tree(directory / tag)


def load_checkpoint(engine, directory: Path, tag: str) -> dict[str, Any]:
    """Load model, optimizer (ZeRO shards) and client state. With a universal checkpoint (engine
    built with load_universal) `directory/tag` is the converted folder."""
    load_path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint at {directory / tag}")
    return client_state or {}


def convert_to_universal(tag_dir: Path, out: Path) -> Path:
    """DeepSpeed checkpoint (any ZeRO stage, any world size) -> DeepSpeed's universal checkpoint,
    which loads on a different world size. Written to out.tmp and renamed, so a crash mid-way
    leaves nothing that looks usable. Single process; the caller makes the others wait."""
    import argparse
    import shutil

    from deepspeed.checkpoint import ds_to_universal

    if (out / "zero").is_dir():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = max(1, min(4, (os.cpu_count() or 1)))
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    ds_to_universal.main(args)
    fsync_tree(tmp)
    os.replace(tmp, out)
    return out


def deepspeed_version() -> str:
    import deepspeed
    return deepspeed.__version__


def _is_bf16_optimizer_checkpoint(tag_dir: Path) -> bool:
    return any(Path(tag_dir).glob("bf16_zero_pp_rank_*_optim_states.pt"))


def export_needs_every_rank(tag_dir: Path) -> bool:
    """Whether consolidated_parameters reads every rank's shard (zero_to_fp32) or only the model file
    (a BF16_Optimizer checkpoint: see there), which every node's copy holds whole."""
    return not _is_bf16_optimizer_checkpoint(tag_dir)


def consolidated_parameters(checkpoint_root: Path, tag: str):
    """(name, full fp32 tensor) of a ZeRO checkpoint, one tensor materialized at a time
    (DeepSpeed's lazy mode), so exporting a 32B model never holds it whole in host memory."""
    tag_dir = Path(checkpoint_root) / tag
    if _is_bf16_optimizer_checkpoint(tag_dir):
        # ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer) writes optimizer files that
        # zero_to_fp32 does not read. Its model file holds the whole module (stage 1 partitions no
        # weights): the bf16 copies DeepSpeed made of the fp32 masters after the step, i.e. exactly what
        # a bf16 export writes. Memory-mapped, so tensors are read as they are written out.
        import torch
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True,
                            weights_only=False)
        for name, tensor in states["module"].items():
            yield name, tensor.float().contiguous()
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root), tag=tag, lazy_mode=True)
    for name, tensor in lazy.items():
        yield name, tensor.contiguous()


def generation_weights(ds_engine, *, zero_stage: int):
    """Context for generating with the engine's model: under ZeRO-3 the whole model is gathered
    once and ZeRO's per-module fetch/release hooks are off (DeepSpeed's
    unwrap_model_for_generation), so a rollout of N tokens costs one gather, not one per token
    and layer; the hooks are restored on exit. Other stages: nothing to do. Collective under ZeRO-3."""
    import contextlib
    if zero_stage != 3:
        return contextlib.nullcontext()
    from deepspeed.runtime.zero import unwrap_model_for_generation
    return unwrap_model_for_generation(ds_engine)


def gathered(params, *, zero_stage: int):
    """Context giving full (un-partitioned) values of `params` on every rank under ZeRO-3."""
    import contextlib
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
