"""How much of a training step the traffic between nodes takes, from a measured bandwidth, and
when ZeRO++ is worth it. A local estimate, pure arithmetic (the planner has no time model yet):

    est = step_comm_estimate(shape, zero, tokens_per_micro_batch=8192, world_size=16, gpus_per_node=8,
                             inter_node_busbw_gbs=2.7, peak_flops_per_gpu=989e12)
    est.share            # communication / (compute + communication) of one micro-batch
    zeropp_advice(...)   # the [zero] keys to set when est.share > COMM_SHARE_WARN, else None

Volumes per micro-batch and rank across the nodes, in units of M = the model's bf16 weights
(2 bytes x parameters), as the ZeRO++ paper counts them (Wang et al. 2023, section 3):
  * ZeRO-3: all-gather of the weights in forward (M) and again in backward (M), reduce-scatter of
    the gradients (M): 3M;
  * ZeRO-1/2: the gradients' reduce-scatter (M), plus the weights' all-gather once per step (M);
  * ZeRO++ hierarchical partitioning (zero.hpz_partition_size = GPUs per node): the backward
    all-gather stays inside the node: -M; quantized weights (int8): forward all-gather M/2;
    quantized gradients (int4, hierarchical all-to-all): M/4. All three: 0.75M.
A collective of S bytes over n ranks takes S x (n-1)/n / busbw, with busbw the bus bandwidth that
`clustertune cluster doctor` measures across all nodes (NCCL / nccl-tests convention). Compute:
model FLOPs per token (clustertune.flops) x tokens / (peak x ASSUMED_MFU). No overlap of
communication with compute is assumed: the estimate is what an exposed link costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clustertune.flops import model_flops_per_token

COMM_SHARE_WARN = 0.20  # the doctor warns above this share of the step
ASSUMED_MFU = 0.40  # compute efficiency assumed for the planned step's compute time
GB = 1e9


def zero_volume_factor(*, stage: int, hpz: bool = False, quantized_weights: bool = False,
                       quantized_gradients: bool = False) -> float:
    """Bytes crossing the nodes per micro-batch and rank, in units of the bf16 weights (M)."""
    if stage in (0, 1, 2):
        return 2.0  # gradients + the weights' all-gather (accumulation only lowers this)
    forward = 0.5 if quantized_weights else 1.0
    backward = 0.0 if hpz else 1.0
    gradients = 0.25 if quantized_gradients else 1.0
    return forward + backward + gradients


@dataclass(frozen=True)
class CommEstimate:
    compute_s: float  # one micro-batch's forward + backward at ASSUMED_MFU
    comm_s: float  # its traffic between nodes at the measured bus bandwidth

    @property
    def share(self) -> float:
        total = self.compute_s + self.comm_s
        return self.comm_s / total if total > 0 else 0.0


def step_comm_estimate(shape: Any, zero: Any, *, tokens_per_micro_batch: int, world_size: int,
                       gpus_per_node: int, inter_node_busbw_gbs: float, peak_flops_per_gpu: float,
                       t_eff: float | None = None) -> CommEstimate:
    """`shape`: a clustertune.shapes.Shape; `zero`: the recipe's ZeroSection (stage and ZeRO++ keys)."""
    if inter_node_busbw_gbs <= 0 or peak_flops_per_gpu <= 0:
        raise ValueError("bandwidth and peak must be > 0")
    hpz = bool(zero.hpz_partition_size and zero.hpz_partition_size > 1)
    factor = zero_volume_factor(stage=zero.stage, hpz=hpz, quantized_weights=zero.quantized_weights,
                                quantized_gradients=zero.quantized_gradients)
    if world_size <= gpus_per_node:
        factor = 0.0  # one node: nothing crosses a node boundary
    weights = 2.0 * shape.parameter_count()
    comm_s = factor * weights * (world_size - 1) / world_size / (inter_node_busbw_gbs * GB)
    t_eff = float(tokens_per_micro_batch) if t_eff is None else t_eff
    compute_s = model_flops_per_token(shape, t_eff) * tokens_per_micro_batch / (peak_flops_per_gpu * ASSUMED_MFU)
    return CommEstimate(compute_s=compute_s, comm_s=comm_s)


def zeropp_advice(estimate: CommEstimate, zero: Any, *, gpus_per_node: int) -> str | None:
    """What to change when the link between nodes would take more than COMM_SHARE_WARN of the step."""
    if estimate.share <= COMM_SHARE_WARN:
        return None
    keys = []
    if zero.stage != 3:
        return (f"communication between nodes ~{estimate.share:.0%} of each step: ZeRO++ (zero.stage = 3 with "
                f"zero.hpz_partition_size = {gpus_per_node}, quantized_weights, quantized_gradients) cuts it to "
                "about a quarter of ZeRO-3's")
    if not (zero.hpz_partition_size and zero.hpz_partition_size > 1) and gpus_per_node > 1:
        keys.append(f"zero.hpz_partition_size = {gpus_per_node}")
    if not zero.quantized_weights:
        keys.append("zero.quantized_weights = true")
    if not zero.quantized_gradients:
        keys.append("zero.quantized_gradients = true")
    if not keys:
        return (f"communication between nodes ~{estimate.share:.0%} of each step even with ZeRO++: a faster "
                "interconnect, or more tokens per micro-batch")
    return f"communication between nodes ~{estimate.share:.0%} of each step: set {', '.join(keys)} (ZeRO++)"
