"""How long a run will take: step time and wall time from FLOPs, a measured MFU and the ZeRO
stage's communication. Pure arithmetic (no torch, no I/O besides reading the bundled table);
`clustertune plan` prints it, and the benchmarks compare it with measured runs:

    from clustertune.timing import estimate_run_time, compare_with_measured
    est = estimate_run_time(shape, gpu="h100", world_size=2, gpus_per_node=2, zero_stage=2,
                            gradient_checkpointing=True, tokens_per_step=2 * 23_892, t_eff=1_500,
                            tokens_per_micro_batch=16_384)
    compare_with_measured(est, measured_step_s=0.95)   # {'estimated_step_s': ..., 'error': ...}

The model, kept simple and printed with every estimate:

  compute = cluster tokens per step x FLOPs per token / (GPUs x per-GPU peak x achieved MFU)
      FLOPs per token and the peak are clustertune.flops / clustertune.gpus (the one MFU
      definition); the achieved MFU comes from data_tables/achieved_mfu.toml: single-GPU runs
      measured here, so it holds the kernels' and the framework's efficiency and no communication.
  communication per optimizer step (ring collectives: a rank moves (n-1)/n of each tensor):
      ZeRO-1: gradients reduce-scattered once per step + updated params all-gathered once (2 x P).
      ZeRO-2: gradients reduce-scattered every micro-batch (DeepSpeed reduces in the backward
              hooks, so accumulation does not save it) + params all-gathered once (m + 1) x P.
      ZeRO-3: per micro-batch, params all-gathered in the forward and again in the backward, and
              gradients reduce-scattered: 3 x P x m. Activation checkpointing adds no third
              gather: the recompute runs right before the layer's backward and DeepSpeed keeps the
              gathered params until that backward (partitioned_param_coordinator: params are not
              released while their next use is within stage3_max_reuse_distance, which the engine
              sets to 1e9 elements, more than one layer).
      P = parameters x 2 bytes (bf16), gradients only of trainable parameters (LoRA), the ZeRO-3
      gathers of every parameter (the frozen base is partitioned too). m = micro-batches per rank
      per step. ZeRO++ (the ZeRO++ paper's volumes, as cluster/interconnect.py counts them):
      quantized weights halve the forward gather, quantized gradients quarter the reduce-scatter,
      and hierarchical partitioning (zero.hpz_partition_size) moves the backward gather inside
      the node.
  bandwidth: one node: the intra-node bus bandwidth (NVLink-class default); several nodes: the
      inter-node one (every ring crosses the nodes' network, which the node's GPUs share).
  step = compute + exposed communication, exposed = max(comm x (1 - overlap), comm - compute):
      DeepSpeed overlaps gathers/reductions with compute (overlap_comm, prefetch); `overlap` is
      an assumed share (COMM_OVERLAP), not a measurement.
  optimizer offload: the CPU Adam step over the node's share of the trainable parameters at
      CPU_ADAM_PARAMS_PER_S_PER_NODE, not overlapped with the GPU work.
  Not modelled: param offload, data loading, evaluation, checkpoint saves, start-up.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

from clustertune.flops import flops_per_token
from clustertune.gpus import lookup_gpu

# Assumed when neither the cluster nor a flag says (printed as assumed by `plan`).
DEFAULT_INTRA_NODE_GBPS = 1600.0  # 200 GB/s NCCL bus bandwidth: an NVLink-class 8-GPU server
DEFAULT_INTER_NODE_GBPS = 100.0  # one 100 Gb/s NIC per node
# Share of the communication hidden behind compute (DeepSpeed overlap_comm / ZeRO-3 prefetch): assumed.
COMM_OVERLAP = 0.5
# MFU without checkpointing over MFU with it, measured on one H100 (shared/gpu/README.md: HF Trainer
# + DeepSpeed ZeRO-2, 23.3% vs 19.9%): applied when the table has no entry with the job's setting.
CHECKPOINTING_SPEEDUP = 1.17
# The GPU whose measurements stand in for a GPU kind that has none.
REFERENCE_GPU = "h100"
BYTES_PER_PARAM_BF16 = 2


class _Shape(Protocol):
    hidden_size: int
    num_hidden_layers: int

    def parameter_count(self) -> int: ...

    def matmul_parameter_count(self) -> int: ...


# ------------------------------------------------------------------------------ the MFU table

@dataclass(frozen=True)
class MfuEntry:
    gpu: str
    hidden: int
    model: str
    zero_stage: int
    gradient_checkpointing: bool
    mfu: float
    tokens_per_s: float
    tokens_per_gpu_step: int
    source: str


@dataclass(frozen=True)
class ChosenMfu:
    mfu: float  # what the estimate uses (the entry's, maybe scaled for checkpointing)
    entry: MfuEntry
    notes: tuple[str, ...]  # how it was chosen: borrowed GPU, other stage, other width, scaling


def load_mfu_table(text: str | None = None) -> list[MfuEntry]:
    """The bundled table (data_tables/achieved_mfu.toml), or `text` in its format."""
    if text is None:
        text = resources.files("clustertune").joinpath("data_tables/achieved_mfu.toml").read_text(encoding="utf-8")
    return [MfuEntry(**row) for row in tomllib.loads(text)["measured"]]


# Tokens per GPU per optimizer step beyond this factor from the measurement's are worth a note.
TOKENS_PER_STEP_NOTE_FACTOR = 2.0


def lookup_achieved_mfu(table: list[MfuEntry], *, gpu: str | None, hidden: int, zero_stage: int,
                        gradient_checkpointing: bool, tokens_per_gpu_step: float | None = None) -> ChosenMfu:
    """The measured MFU that best matches the job (see the table's header for the order)."""
    notes = []
    spec = lookup_gpu(gpu) if gpu else None
    kind = spec.name if spec else None
    rows = [e for e in table if e.gpu == kind]
    if not rows:
        rows = [e for e in table if e.gpu == REFERENCE_GPU]
        notes.append(f"no MFU measured on {kind or 'this GPU'}: borrowed from {REFERENCE_GPU.upper()}")
    stages = {e.zero_stage for e in rows}
    stage = zero_stage if zero_stage in stages else min(stages, key=lambda s: (abs(s - zero_stage), -s))
    if stage != zero_stage:
        notes.append(f"no ZeRO-{zero_stage} measurement: ZeRO-{stage}'s used")
    rows = [e for e in rows if e.zero_stage == stage]
    same_ckpt = [e for e in rows if e.gradient_checkpointing == gradient_checkpointing]
    rows = same_ckpt or rows
    entry = min(rows, key=lambda e: (abs(math.log(e.hidden / hidden)), -e.hidden))
    if abs(math.log(entry.hidden / hidden)) > math.log(1.1):
        notes.append(f"measured at hidden {entry.hidden}, the job's is {hidden}")
    if tokens_per_gpu_step:
        ratio = tokens_per_gpu_step / entry.tokens_per_gpu_step
        if ratio < 1 / TOKENS_PER_STEP_NOTE_FACTOR or ratio > TOKENS_PER_STEP_NOTE_FACTOR:
            direction = "optimistic" if ratio < 1 else "pessimistic"
            notes.append(f"measured at {entry.tokens_per_gpu_step:,} tokens per GPU per step, the job has "
                         f"{tokens_per_gpu_step:,.0f}: fixed per-step costs make this {direction}")
    mfu = entry.mfu
    if entry.gradient_checkpointing != gradient_checkpointing:
        if gradient_checkpointing:
            mfu /= CHECKPOINTING_SPEEDUP
        else:
            mfu *= CHECKPOINTING_SPEEDUP
        notes.append(f"measured with checkpointing {'on' if entry.gradient_checkpointing else 'off'}: "
                     f"scaled by {CHECKPOINTING_SPEEDUP:g} (measured ratio)")
    return ChosenMfu(mfu=mfu, entry=entry, notes=tuple(notes))


# ------------------------------------------------------------------------------ communication

@dataclass(frozen=True)
class Communication:
    bytes_per_step: float  # summed sizes of the collectives' full tensors over all ranks, per step
    formula: str  # e.g. "per micro-batch (4): params all-gathered in forward and backward + ..."
    bytes_within_node_per_step: float = 0.0  # ZeRO++ hierarchical partitioning: gathers inside a node


def communication_per_step(*, zero_stage: int, parameters: int, trainable: int, micro_batches: int,
                           param_bytes: int = BYTES_PER_PARAM_BF16, hpz: bool = False,
                           quantized_weights: bool = False, quantized_gradients: bool = False) -> Communication:
    """Bytes of the ZeRO stage's collectives per optimizer step (see the module docstring)."""
    m = max(1, micro_batches)
    params, grads = parameters * param_bytes, trainable * param_bytes
    if zero_stage == 0:  # DeepSpeed's all-reduce at the step boundary: a reduce-scatter + an all-gather's bytes
        return Communication(2 * grads, "all-reduce of the gradients once per step (ZeRO-0)")
    if zero_stage == 1:
        return Communication(2 * grads, "reduce-scatter + all-gather of the trainable params once per step (ZeRO-1)")
    if zero_stage == 2:
        return Communication((m + 1) * grads, f"gradients reduce-scattered in each of {m} micro-batches + "
                                               "params all-gathered once (ZeRO-2)")
    if zero_stage == 3:
        forward = params * (0.5 if quantized_weights else 1.0)
        backward = 0.0 if hpz else params
        reduce = grads * (0.25 if quantized_gradients else 1.0)
        extras = [name for on, name in ((quantized_weights, "int8 weights"), (hpz, "backward gather inside the node"),
                                        (quantized_gradients, "int4 gradients")) if on]
        return Communication(m * (forward + backward + reduce),
                             f"per micro-batch ({m}): params all-gathered in forward and backward + gradients "
                             "reduce-scattered (ZeRO-3" + (f", ZeRO++: {', '.join(extras)})" if extras else ")"),
                             bytes_within_node_per_step=m * params if hpz else 0.0)
    return Communication(0.0, "no ZeRO collectives")


def bus_bandwidth_gbps(*, nodes: int, intra_node_gbps: float, inter_node_gbps: float) -> float:
    """The bandwidth a ring collective over the whole job runs at: the slowest link it crosses."""
    return min(intra_node_gbps, inter_node_gbps) if nodes > 1 else intra_node_gbps


def collective_seconds(size_bytes: float, *, world_size: int, bus_gbps: float) -> float:
    """Ring all-gather / reduce-scatter of a `size_bytes` tensor: each rank moves (n-1)/n of it."""
    if world_size <= 1 or size_bytes <= 0:
        return 0.0
    return size_bytes * (world_size - 1) / world_size / (bus_gbps * 1e9 / 8)


# ---------------------------------------------------------------------------------- estimate

@dataclass(frozen=True)
class TimeEstimate:
    compute_s: float
    communication_s: float
    exposed_communication_s: float
    step_s: float
    tokens_per_step: float  # the cluster's
    world_size: int
    achieved_mfu: ChosenMfu
    communication: Communication
    bus_gbps: float
    flops_per_token: float
    peak_flops_per_gpu: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_s / self.world_size

    @property
    def mfu(self) -> float:
        """End-to-end MFU per GPU, communication included."""
        return self.tokens_per_s_per_gpu * self.flops_per_token / self.peak_flops_per_gpu

    def wall_seconds(self, steps: int) -> float:
        return steps * self.step_s


# Parameters a node's CPU Adam steps per second with zero.offload_optimizer, gradient and weight
# copies over PCIe included. Measured 2026-11-26 on 4 x H100 (64 cores, one node): 48 layers of
# the 32B width (24.97B params) at 28.2 s per step, of which about 3.9 s GPU work
# (benchmarks/RESULTS.md "The user's model").
CPU_ADAM_PARAMS_PER_S_PER_NODE = 1.03e9


def micro_batches_per_step(*, tokens_per_step: float, world_size: int, tokens_per_micro_batch: int) -> int:
    """Packed rows (or padded micro-batches) each rank runs per optimizer step."""
    return max(1, math.ceil(tokens_per_step / world_size / tokens_per_micro_batch))


def estimate_run_time(shape: _Shape, *, gpu: str, world_size: int, gpus_per_node: int, zero_stage: int,
                      gradient_checkpointing: bool, tokens_per_step: float, t_eff: float,
                      tokens_per_micro_batch: int, trainable: int | None = None,
                      intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS,
                      inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS, overlap: float = COMM_OVERLAP,
                      table: list[MfuEntry] | None = None, achieved_mfu: float | None = None,
                      hpz: bool = False, quantized_weights: bool = False,
                      quantized_gradients: bool = False, offload_optimizer: bool = False) -> TimeEstimate:
    """Step time of a job. `gpu` must be in the catalog (its peak); `trainable` defaults to every
    parameter (full fine-tuning); `achieved_mfu` overrides the table's figure; hpz and the
    quantized flags are the recipe's ZeRO++ keys."""
    spec = lookup_gpu(gpu)
    if spec is None:
        raise ValueError(f"unknown GPU {gpu!r}: its peak FLOP/s is needed for a time estimate")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1) (got {overlap})")
    chosen = lookup_achieved_mfu(table if table is not None else load_mfu_table(), gpu=gpu,
                                 hidden=shape.hidden_size, zero_stage=zero_stage,
                                 gradient_checkpointing=gradient_checkpointing,
                                 tokens_per_gpu_step=tokens_per_step / world_size)
    if achieved_mfu is not None:
        chosen = ChosenMfu(achieved_mfu, chosen.entry, ("given, not from the table",))
    fpt = flops_per_token(matmul_params=shape.matmul_parameter_count(), layers=shape.num_hidden_layers,
                          hidden=shape.hidden_size, t_eff=t_eff)
    compute = tokens_per_step * fpt / (world_size * spec.peak_flops * chosen.mfu)
    parameters = shape.parameter_count()
    nodes_for_cpu = max(1, math.ceil(world_size / gpus_per_node))
    if offload_optimizer:
        compute += (parameters if trainable is None else trainable) / (CPU_ADAM_PARAMS_PER_S_PER_NODE * nodes_for_cpu)
    comm = communication_per_step(
        zero_stage=zero_stage, parameters=parameters, trainable=parameters if trainable is None else trainable,
        micro_batches=micro_batches_per_step(tokens_per_step=tokens_per_step, world_size=world_size,
                                             tokens_per_micro_batch=tokens_per_micro_batch),
        hpz=hpz, quantized_weights=quantized_weights, quantized_gradients=quantized_gradients)
    nodes = max(1, math.ceil(world_size / gpus_per_node))
    bus = bus_bandwidth_gbps(nodes=nodes, intra_node_gbps=intra_node_gbps, inter_node_gbps=inter_node_gbps)
    comm_s = (collective_seconds(comm.bytes_per_step, world_size=world_size, bus_gbps=bus)
              + collective_seconds(comm.bytes_within_node_per_step, world_size=min(world_size, gpus_per_node),
                                   bus_gbps=intra_node_gbps))
    exposed = max(comm_s * (1 - overlap), comm_s - compute)
    return TimeEstimate(compute_s=compute, communication_s=comm_s, exposed_communication_s=exposed,
                        step_s=compute + exposed, tokens_per_step=tokens_per_step, world_size=world_size,
                        achieved_mfu=chosen, communication=comm, bus_gbps=bus, flops_per_token=fpt,
                        peak_flops_per_gpu=spec.peak_flops)


def compare_with_measured(estimate: TimeEstimate, *, measured_step_s: float) -> dict[str, float]:
    """For benchmarks/RESULTS.md's estimate-vs-measured table: error = estimate / measured - 1
    (goal: within +-25%)."""
    return {"estimated_step_s": estimate.step_s, "measured_step_s": measured_step_s,
            "estimated_tokens_per_s": estimate.tokens_per_s,
            "measured_tokens_per_s": estimate.tokens_per_step / measured_step_s,
            "error": estimate.step_s / measured_step_s - 1.0}


def format_duration(seconds: float) -> str:
    """1h23m, 2d04h, 45s: what a user reads at a glance."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = int(round(seconds / 60))
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"
