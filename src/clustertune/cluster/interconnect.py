"""The doctor's question about a measured interconnect: how much of the planned training step would
the traffic between nodes take, and which ZeRO++ keys would cut it.

    est = planned_step(recipe, shape, gpu="NVIDIA H100 80GB HBM3", world_size=4, gpus_per_node=2,
                       inter_node_gbs=2.7, intra_node_gbs=140.0)
    comm_share(est)                                   # exposed communication / step time
    zeropp_advice(comm_share(est), recipe.zero, gpus_per_node=2)   # the [zero] keys, or None

The step is clustertune.timing's estimate (compute from FLOPs and a measured MFU, the ZeRO stage's
collectives per step including ZeRO++'s smaller volumes, the part not hidden behind compute), fed
with the bandwidths the doctor measured (bus bandwidth in GB/s; timing counts in Gb/s). Tokens
per step: the recipe's global batch times the tokens per sample when the caller measured them,
else one micro-batch of the token budget per rank (said in the note). Pure arithmetic.
"""

from __future__ import annotations

from typing import Any

from clustertune import timing

COMM_SHARE_WARN = 0.20  # the doctor warns above this share of the step


def planned_step(recipe: Any, shape: Any, *, gpu: str, world_size: int, gpus_per_node: int, inter_node_gbs: float,
                 intra_node_gbs: float | None = None, tokens_per_sample: float | None = None,
                 t_eff: float | None = None) -> timing.TimeEstimate:
    """timing.estimate_run_time for the recipe on the measured links (GB/s of bus bandwidth); "auto"
    train keys as a launch on these GPUs would resolve them (clustertune.auto)."""
    from clustertune.auto import resolve_auto
    from clustertune.gpus import lookup_gpu
    from clustertune.plan_cli import tokens_per_micro_batch
    spec = lookup_gpu(gpu)
    recipe = resolve_auto(recipe, on_gpu=True, gpu_mem_gib=spec.mem_gib if spec else None, gpu_source=gpu,
                          nodes=max(1, world_size // gpus_per_node), gpus_per_node=gpus_per_node).recipe
    per_micro_batch = tokens_per_micro_batch(recipe)
    if tokens_per_sample is not None:
        tokens_per_step = recipe.train.global_batch_size * tokens_per_sample
    else:
        tokens_per_step = float(per_micro_batch * world_size)
    zero = recipe.zero
    return timing.estimate_run_time(
        shape, gpu=gpu, world_size=world_size, gpus_per_node=gpus_per_node, zero_stage=zero.stage,
        gradient_checkpointing=recipe.train.gradient_checkpointing, tokens_per_step=tokens_per_step,
        t_eff=t_eff if t_eff is not None else float(min(recipe.data.max_length, per_micro_batch)),
        tokens_per_micro_batch=per_micro_batch,
        inter_node_gbps=inter_node_gbs * 8,
        intra_node_gbps=intra_node_gbs * 8 if intra_node_gbs else timing.DEFAULT_INTRA_NODE_GBPS,
        hpz=bool(zero.hpz_partition_size and zero.hpz_partition_size > 1),
        quantized_weights=zero.quantized_weights, quantized_gradients=zero.quantized_gradients,
        offload_optimizer=zero.offload_optimizer)


def comm_share(est: timing.TimeEstimate) -> float:
    """The part of the step spent waiting on communication (not hidden behind compute)."""
    return est.exposed_communication_s / est.step_s if est.step_s > 0 else 0.0


def zeropp_advice(share: float, zero: Any, *, gpus_per_node: int) -> str | None:
    """What to change when the link between nodes would take more than COMM_SHARE_WARN of the step.

    Quantized weights (and hpz where a node has several GPUs) come first; quantized gradients only
    once those are set, with their cost: measured in the GPU sandbox (2 nodes x 1 H100, 10 Gbit
    between them, 0.5B shape, 20 steps; benchmarks/RESULTS.md), int8 weights ran 1.20x plain ZeRO-3
    with the loss within 0.2% of it, int4 gradients 1.07x with the loss 2-4% away by step 10."""
    if share <= COMM_SHARE_WARN:
        return None
    hpz = f"zero.hpz_partition_size = {gpus_per_node}, " if gpus_per_node > 1 else ""
    # zero.stage "auto" (not resolved yet when the doctor runs) becomes 3 only with a ZeRO-3-only key
    stage3 = zero.stage == 3 or (zero.stage == "auto" and bool(zero.stage3_keys_set()))
    if not stage3:
        return (f"communication between nodes ~{share:.0%} of each step: ZeRO++ (zero.stage = 3 with "
                f"{hpz}zero.quantized_weights = true) halves the bytes of ZeRO-3's weight gathers between nodes")
    keys = []
    if not (zero.hpz_partition_size and zero.hpz_partition_size > 1) and gpus_per_node > 1:
        keys.append(f"zero.hpz_partition_size = {gpus_per_node}")
    if not zero.quantized_weights:
        keys.append("zero.quantized_weights = true")
    if keys:
        return f"communication between nodes ~{share:.0%} of each step: set {', '.join(keys)} (ZeRO++)"
    if not zero.quantized_gradients:
        return (f"communication between nodes ~{share:.0%} of each step with ZeRO++ weights: "
                "zero.quantized_gradients = true quarters the gradient bytes, but moved the loss 2-4% "
                "from plain ZeRO-3 within 20 steps where we measured it: compare the loss before keeping it")
    return (f"communication between nodes ~{share:.0%} of each step even with ZeRO++: a faster "
            "interconnect, or more tokens per micro-batch")
