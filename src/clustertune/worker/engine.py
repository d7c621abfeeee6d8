"""The one module that talks to DeepSpeed: config generation (pure), initialize, save/load.

`build_deepspeed_config` is a pure function of recipe sections and the world size; it resolves
every number (no "auto") so the JSON written to the run directory is exactly what ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clustertune.config import RecipeError, TrainSection, ZeroSection


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's samples split over ranks and micro-batches."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    gradient_accumulation_steps: int


def batch_layout(train: TrainSection, *, world_size: int, packing: bool) -> BatchLayout:
    """global = micro x accumulation x world, checked with the arithmetic in the message.

    With packing a micro-batch is one packed row of up to train.micro_batch_tokens tokens, and the
    number of rows per step follows from the data; the nominal accumulation is still derived here
    so that DeepSpeed's train_batch_size bookkeeping is consistent.
    """
    if world_size < 1:
        raise RecipeError(f"world size must be >= 1 (got {world_size})")
    micro = 1 if packing else train.micro_batch_size
    per_step = micro * world_size
    if packing:
        gas = max(1, train.global_batch_size // world_size // max(1, train.micro_batch_size))
    else:
        if train.global_batch_size % per_step:
            raise RecipeError(
                f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({micro}) x world size ({world_size}) = {per_step}")
        gas = train.global_batch_size // per_step
    return BatchLayout(train.global_batch_size, micro, world_size, gas)


def resolve_precision(train: TrainSection, *, on_gpu: bool) -> str:
    if train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    if train.precision == "bf16" and not on_gpu:
        # DeepSpeed's CPU accelerator runs bf16, but slowly and with gloo reductions in bf16;
        # allow it (users may want parity checks) rather than refuse.
        return "bf16"
    return train.precision


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
        # We gather weights ourselves, shard by shard, at export (checkpoint.export_hf_model).
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
    if load_universal or node_local_storage:
        config["checkpoint"] = {"load_universal": load_universal, "use_node_local_storage": node_local_storage}
    if zero.offload_optimizer:
        # CPU-offloaded optimizer states need DeepSpeed's vectorized CPU Adam to be fast.
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": train.lr, "betas": [train.adam_beta1, train.adam_beta2], "eps": 1e-8,
            "weight_decay": train.weight_decay}}
    return config


def lr_multiplier(step: int, *, train: TrainSection, total_steps: int) -> float:
    """Linear warmup, then cosine / linear decay to min_lr_ratio, or constant. Pure."""
    warmup = train.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if train.schedule == "constant" or total_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = train.min_lr_ratio
    if train.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    import math
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------- runtime (imports torch)

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


def optimizer_step(engine) -> float:
    """Apply the accumulated gradients; returns the global gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def save_checkpoint(engine, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
    """Every rank writes its shards; then fsyncs what it sees of the tag directory, so the
    completion marker written after the next barrier never points at data still in page cache."""
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    fsync_tree(directory / tag)


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def consolidated_parameters(checkpoint_root: Path, tag: str):
    """(name, full fp32 tensor) of a ZeRO checkpoint, one tensor materialized at a time
    (DeepSpeed's lazy mode), so exporting a 32B model never holds it whole in host memory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_root), tag=tag, lazy_mode=True)
    for name, tensor in lazy.items():
        yield name, tensor.contiguous()


def gathered(params, *, zero_stage: int):
    """Context giving full (un-partitioned) values of `params` on every rank under ZeRO-3."""
    import contextlib
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


class PeerFailed(Exception):
    """Work this rank waited for failed on another rank, which reports its own error.

    Not a UserError: it says only that this rank stops; the cause (a user error or a bug) is
    printed, with its own exit code, by the rank where it happened."""


def while_others_wait(work, *, works: bool, timeout_s: float):
    """Ranks with `works` run `work()` while the others wait up to `timeout_s`, which may be far
    longer than the collective timeout (tokenizing a large dataset; converting a 32B checkpoint
    moves about half a terabyte). The wait happens in a gloo group of its own, so its timeout
    leaves the training group's alone. Every rank learns of a failure: the failing rank
    re-raises its own error, the others raise PeerFailed naming it, instead of hanging."""
    import datetime
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return work() if works else None
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    result, error = None, None
    if works:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - told to the other ranks, then re-raised below
            error = err
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}", group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if failed:
        rank, outcome = failed[0]
        raise PeerFailed(f"rank {rank} failed: {outcome.splitlines()[0]}")
    return result


def shutdown_distributed(*, wait_for_peers: bool = True) -> None:
    """Tear the process group down while the interpreter is still whole.

    Without this, gloo's worker threads can outlive the Python objects they hold and the rank
    dies at exit with "terminate called without an active exception" (SIGABRT), which would
    hide a clean exit code. wait_for_peers=False only where no rank can be inside a collective
    (an error every rank learned of together): with a peer mid-collective the teardown hangs.
    """
    import torch.distributed as dist
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))
