"""Memory and feasibility arithmetic: which ZeRO stage / offload / gradient-checkpointing option
fits the GPUs and the hosts of a job, and which of those is the fastest.

    from clustertune.plan import PlanInput, plan
    result = plan(PlanInput(shape, tokens_per_micro_batch=4096, seq_len=4096, world_size=16,
                            gpus_per_node=8, gpu_mem_gib=95.6, host_mem_gib=1024))
    result.recommended.option.label   # 'ZeRO-3 + ckpt'

Pure arithmetic (no torch, no I/O); `clustertune plan` (plan_cli.py) feeds it a recipe.
Units: bytes inside, GiB (2**30 bytes) in every result field (`*_gib`) -- the unit of
torch.cuda.max_memory_allocated() / 2**30 and of nvidia-smi's MiB / 1024.

The model of DeepSpeed ZeRO follows deepspeed 0.19 (runtime/zero/stage_1_and_2.py, stage3.py)
and was checked against the peak torch.cuda.max_memory_allocated() of the GPU benchmark's runs
on one H100 (benchmarks/plan_validation.py, benchmarks/RESULTS.md "Planner validation (issue 6)"):
  * bf16 mixed precision keeps bf16 params (2 B/param), bf16 gradients (2 B: DeepSpeed's
    gradient accumulation dtype defaults to the model dtype) and an fp32 master copy plus Adam
    m and v (4+4+4 = 12 B) -- 16 B/param in all; fp32 training 4+4+4+4.
  * stage 1 partitions the optimizer states, stage 2 also the gradients, stage 3 also the params.
  * no fp32 gradient partition is kept between steps: at the optimizer step DeepSpeed flattens
    the bf16 gradient partition into a new buffer and converts that to fp32 (`flatten(...).to(
    fp32)`), so for a moment both copies exist: 2 + 4 = 6 B per element of the partition
    (stage 1/2) or of the largest optimizer sub-group (stage 3, `sub_group_size` elements,
    grown param by param until reached). This step is the peak of the packed clustertune runs
    with rows of up to 16k tokens (22 B/param at ZeRO-2 and 16 B/param + 6 B x 1.0e9 at ZeRO-3
    on one GPU, the same for 8k, 16k and, at ZeRO-2, 32k-token rows).
  * stage 1/2 allocate the gradient partition and the reduce buckets at the first gradient
    hook of a backward pass and drop the buckets at its end; stage 3 holds both from start-up.
  * stage 3 on one rank gathers nothing: a "gathered" parameter is a view of its partition.
    On more ranks, parameters of at most `param_persistence_threshold` elements stay whole on
    every rank besides their partition.
  * three moments compete for the peak, each with what is alive then: the loss (saved
    activations + logits), the backward through the layers (saved activations + one recomputed
    layer with checkpointing + the gradient working set) and the optimizer step.
  * ZeRO-1 in bf16 accumulating gradients in fp32 (zero.grad_accum_dtype, "auto" there) is
    DeepSpeed's BF16_Optimizer: a full-size fp32 gradient buffer on every rank from start-up
    (+4 B/param) besides the bf16 gradients, and no conversion copy at the step.
  * optimizer offload moves master + Adam states + fp32 gradient buffers into pinned host RAM;
    stage 2/3 then keep no gradient partition on the GPU. Param offload (stage 3) moves the bf16
    partition to host RAM too; the GPU only holds the parameters being used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from clustertune.errors import UserError
from clustertune.shapes import LORA_TARGETS, Shape

GIB = 1024**3

# ------------------------------------------------------------------------------------ constants
# Outside torch's allocator but on the card: CUDA context, cuBLAS/cuDNN workspaces (~1 GiB on
# H100-class cards with torch 2.x) and NCCL's per-channel buffers once there are peers.
CUDA_CONTEXT_GIB = 1.0
NCCL_BUFFERS_GIB = 0.5
# The caching allocator's slack: reserved minus allocated on memory that is allocated and freed
# every step (activations, logits, gathered params). Model states are a few large flat buffers
# allocated once, so they get no slack. Measured through `clustertune train` on one H100 (2026-11-27,
# benchmarks/RESULTS.md "Where the card's memory ends"): with expandable segments (the worker's
# default) 0.2-0.5 GiB over 28-48 GiB of activations (< 1.5%); with torch's fixed-size blocks
# 4.7 GiB (W2, 10%) and 9.7 GiB (W3, 34%).
FRAGMENTATION = 0.02
FRAGMENTATION_FIXED_BLOCKS = 0.35
# ZeRO-3 gathering weights across ranks allocates and frees each layer's full weights and gradients,
# layer-sized blocks that the allocator keeps: slack of up to this many layers of bf16 weights on top
# of the above. Measured (2026-11-27, session 8 calls 5-6), with expandable segments: 6.9 layers on
# 2 x H100 at the 7B width (2.96 GiB) and at the 32B width (6.28 GiB), 9.8 on 4 x H100 at the 32B
# width with two rows per step (8.93 GiB); without them 9.8 on 2 x H100 (32B width), scaled alike.
GATHER_SLACK_LAYERS = 10.0
GATHER_SLACK_LAYERS_FIXED_BLOCKS = 14.0
# Host RSS of one worker before any weights: python, torch + CUDA host libraries, DeepSpeed,
# tokenized-data and dataloader workers.
PROCESS_HOST_GIB = 3.0
# Feasibility: keep this share of the GPU (and of host RAM) free for what the model misses
# (NCCL growth, dataloader spikes, shapes never measured). Packed rows never exceed their token
# budget, so the plan's tokens are already the worst case; at the points measured at the edge of an
# 80 GB card (tests/unit/test_plan_lean_measured.py: 19 on one GPU, 4 under ZeRO-3 across ranks) the
# estimate is 0-4% over max_memory_allocated.
DEFAULT_SAFETY_MARGIN = 0.05
# Host RAM: its model matched one measured point (4 x H100, offload, within 1.4%) and dataloader workers
# and page cache vary by machine: the former 10%.
DEFAULT_HOST_SAFETY_MARGIN = 0.10
# Hugging Face shards weights into files of at most ~5 GB; under zero.Init every rank
# materializes one shard at a time, never the whole model.
DEFAULT_CHECKPOINT_SHARD_GIB = 5.0


class PlanError(UserError):
    """Inputs the planner cannot use; the message is meant for the user as-is."""


@dataclass(frozen=True)
class ZeroBuckets:
    """ZeRO buffer sizes in elements. Defaults are DeepSpeed's (runtime/zero/config.py)."""

    reduce_bucket: int = 500_000_000
    allgather_bucket: int = 500_000_000
    prefetch_bucket: int = 50_000_000  # stage3_prefetch_bucket_size
    max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters
    sub_group_size: int = 1_000_000_000  # stage 3: optimizer step granularity
    # stage 3: params of at most this many elements stay whole on every rank (clustertune's
    # engine resolves 10 * hidden unless the recipe sets zero.param_persistence_threshold)
    param_persistence_threshold: int = 100_000


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state."""

    param: int
    grad: int
    optimizer: int  # per trainable param: fp32 master (bf16 only) + Adam m + v
    activation: int


PRECISIONS = {"bf16": Precision(2, 2, 12, 2), "fp32": Precision(4, 4, 8, 4)}


@dataclass(frozen=True)
class PlanInput:
    shape: Shape
    tokens_per_micro_batch: int  # tokens one rank runs through one forward (packed or padded)
    seq_len: int  # longest sample; only eager attention's score matrices depend on it
    world_size: int
    gpus_per_node: int
    gpu_mem_gib: float
    host_mem_gib: float | None  # per node; None: unknown, the host check is skipped (and said)
    precision: Literal["bf16", "fp32"] = "bf16"
    liger: bool = True  # fused RMSNorm/SwiGLU/RoPE and fused linear cross-entropy
    # sdpa/flash/flex: no seq^2 memory; varlen: flash varlen of packed rows on a GPU (model.attn_implementation
    # "auto"), which keeps k/v at their GQA width and whose output is o_proj's saved input
    attention: Literal["sdpa", "eager", "varlen"] = "sdpa"
    lora_rank: int | None = None  # None: full fine-tuning
    lora_targets: tuple[str, ...] = LORA_TARGETS
    buckets: ZeroBuckets = field(default_factory=ZeroBuckets)
    overlap_comm: bool = True
    # ZeRO++ zero.hpz_partition_size (stage 3): a second copy of the weights partitioned over
    # this many ranks (the GPUs of a node), param bytes x total / hpz per rank.
    hpz_partition_size: int = 1
    # train.checkpoint_every_n_layers: with checkpointing on, only layers 0, n, 2n, ... recompute;
    # the others keep everything they save (selective checkpointing).
    checkpoint_every_n_layers: int = 1
    # More than one micro-batch per optimizer step on a rank. Stage 0-2 gradients then exist during
    # the forward and loss of every micro-batch after the first; without accumulation they appear in
    # backward as the activations go. step_tokens, when known, decides it per micro-batch size:
    # the most tokens one optimizer step can give a rank (packed: samples per step x the longest
    # sample); None: grad_accumulation says (packing with unknown lengths: assume several).
    grad_accumulation: bool = True
    step_tokens: int | None = None
    grad_accum_dtype: Literal["auto", "bf16", "fp32"] = "auto"  # zero.grad_accum_dtype
    immediate_grad_update: bool = True  # zero.immediate_grad_update (fp32 accumulation only)
    # The worker's allocator grows segments (PYTORCH_CUDA_ALLOC_CONF expandable_segments:True, its
    # default): little slack. False: torch's fixed-size blocks (FRAGMENTATION_FIXED_BLOCKS).
    expandable_segments: bool = True
    # The MLP keeps gate and up for backward, not silu(gate) * up (lean_mlp_applies)
    lean_mlp: bool = False
    safety_margin: float = DEFAULT_SAFETY_MARGIN  # of the GPU's memory
    host_safety_margin: float = DEFAULT_HOST_SAFETY_MARGIN
    checkpoint_shard_gib: float = DEFAULT_CHECKPOINT_SHARD_GIB

    def __post_init__(self) -> None:
        for name in ("tokens_per_micro_batch", "seq_len", "world_size", "gpus_per_node", "checkpoint_every_n_layers"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not self.gpu_mem_gib > 0:
            raise PlanError(f"gpu_mem_gib must be > 0 (got {self.gpu_mem_gib})")
        if self.host_mem_gib is not None and not self.host_mem_gib > 0:
            raise PlanError(f"host_mem_gib must be > 0 (got {self.host_mem_gib})")
        for name in ("safety_margin", "host_safety_margin"):
            if not 0 <= getattr(self, name) < 1:
                raise PlanError(f"{name} must be in [0, 1) (got {getattr(self, name)})")
        if self.precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {sorted(PRECISIONS)} (got {self.precision!r})")
        if self.lora_rank is not None:
            if self.lora_rank < 1:
                raise PlanError(f"lora_rank must be >= 1 (got {self.lora_rank})")
            unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS) - {"all-linear"})
            if unknown:
                raise PlanError(f"unknown LoRA target modules {unknown}; the planner knows {list(LORA_TARGETS)}")

    @property
    def ranks_per_node(self) -> int:
        return min(self.gpus_per_node, self.world_size)

    @property
    def bytes(self) -> Precision:
        return PRECISIONS[self.precision]

    @property
    def allocator_slack(self) -> float:
        """Reserved over allocated, as a share of what is allocated and freed every step."""
        return FRAGMENTATION if self.expandable_segments else FRAGMENTATION_FIXED_BLOCKS

    @property
    def gather_slack_layers(self) -> float:
        """ZeRO-3 gathering across ranks: allocator slack in layers' worth of weights."""
        return GATHER_SLACK_LAYERS if self.expandable_segments else GATHER_SLACK_LAYERS_FIXED_BLOCKS

    def accumulates(self, tokens: int) -> bool:
        """Whether a step has several micro-batches of `tokens` on a rank."""
        return self.grad_accumulation if self.step_tokens is None else self.step_tokens > tokens


def expandable_segments_on(alloc_conf: str | None) -> bool:
    """PYTORCH_CUDA_ALLOC_CONF as the launch forwards it to the workers: unset means the worker's
    default (contract.WORKER_DEFAULT_ALLOC_CONF: on)."""
    if alloc_conf is None:
        return True
    settings = dict(item.split(":", 1) for item in alloc_conf.replace(" ", "").split(",") if ":" in item)
    return settings.get("expandable_segments", "").lower() == "true"


@dataclass(frozen=True)
class Option:
    # 0: DeepSpeed without ZeRO partitioning (bf16: its DDP-like path, every state whole on each
    # rank); offered on one rank only (all_options), where it holds what ZeRO-1 holds.
    stage: Literal[0, 1, 2, 3]
    offload_optimizer: bool
    offload_params: bool
    gradient_checkpointing: bool

    def speed_key(self) -> tuple[bool, bool, bool, bool, int]:
        """Sort key, fastest first. The order and why:
        1. param offload is slowest: every forward and backward streams the weights over PCIe
           (~25 GB/s per GPU vs 3+ TB/s HBM), per micro-batch, so nothing amortizes it.
        2. optimizer offload next: per optimizer step the gradients cross PCIe, the Adam step
           runs on host cores whose memory bandwidth all ranks of a node share, and the new
           weights cross back (DeepSpeed also accumulates gradients on the host per micro-step).
           Unlike HF's docs (which put "ZeRO-2 + offload" before ZeRO-3) we rank it after
           ZeRO-3 without offload: at 8 GPUs per node the host is the shared bottleneck, while
           ZeRO-3's gathers run on NVLink/IB and overlap with compute through prefetch.
        3. ZeRO-3: params are all-gathered in forward and again in backward, per micro-batch
           (1.5x ZeRO-2's traffic) plus per-module hooks; measured 1.86x slower than ZeRO-2 on
           one H100 (gpu/README.md: 10.7% vs 19.9% MFU, both with checkpointing).
        4. gradient checkpointing: one extra forward, <= +33% FLOPs; measured 1.17x
           (19.9% vs 23.3% MFU) -- cheaper than ZeRO-3, hence ranked after it.
        5. ZeRO-1 before ZeRO-2: with gradient accumulation stage 1 reduces gradients once per
           optimizer step, stage 2 reduce-scatters them every micro-batch. ZeRO-1 before ZeRO-0
           (one rank only) with zero.grad_accum_dtype "auto" (fp32 at ZeRO-1: DeepSpeed's
           BF16_Optimizer): one H100, W1, 32k rows, every 2nd layer recomputed, harness, ABAB in one
           call: 37,747 / 38,072 vs ZeRO-0's 36,543 / 36,239 tokens/s (+4.2%) for +5.8 GiB; W2 +4.4%;
           W3 (7B width) -0.5%. ZeRO-0 in turn beat ZeRO-1 with bf16 accumulation by 2-3%.
        """
        return (self.offload_params, self.offload_optimizer, self.stage == 3,
                self.gradient_checkpointing, STAGE_SPEED_RANK[self.stage])

    @property
    def offload_label(self) -> str:
        parts = [name for on, name in ((self.offload_optimizer, "opt"), (self.offload_params, "param")) if on]
        return "+".join(parts) if parts else "-"

    @property
    def label(self) -> str:
        text = f"ZeRO-{self.stage}"
        if self.offload_optimizer or self.offload_params:
            text += f" + {self.offload_label} offload"
        if self.gradient_checkpointing:
            text += " + ckpt"
        return text


def all_options(lora: bool = False, single_rank: bool = False) -> list[Option]:
    """Every option, fastest first. LoRA with param offload is not supported by the recipe.
    ZeRO-0 only for `single_rank` full fine-tuning without offload: on several ranks it keeps every
    state whole on each (ZeRO-1's memory at world 1) and was not measured faster there; with LoRA the
    optimizer states it would not partition are small, and that path was not run on a GPU here."""
    options = [Option(0, False, False, ckpt) for ckpt in (False, True)] if single_rank and not lora else []
    for stage in (1, 2, 3):
        for offload_optimizer in (False, True):
            for offload_params in ((False, True) if stage == 3 else (False,)):
                if offload_params and lora:
                    continue
                for ckpt in (False, True):
                    options.append(Option(stage, offload_optimizer, offload_params, ckpt))
    return sorted(options, key=Option.speed_key)


# Among the stages without offload on one rank, fastest first (Option.speed_key, point 5).
STAGE_SPEED_RANK = {1: 0, 0: 1, 2: 2, 3: 3}


def fp32_grad_accumulation(grad_accum_dtype: str, *, stage: int, precision: str, offload_optimizer: bool) -> bool:
    """Whether gradients accumulate in fp32 (DeepSpeed's BF16_Optimizer): zero.grad_accum_dtype "fp32",
    or "auto" at ZeRO-1 in bf16 without optimizer offload, the one place DeepSpeed runs that optimizer.
    Measured there on one H100 (W1, 32k rows): +4.2% over ZeRO-0 and +5.2% over ZeRO-1 with bf16
    accumulation, GPU busy 95% of the step instead of 84% (ZeRO-0's per-parameter overflow checks)."""
    if precision != "bf16" or stage != 1 or offload_optimizer:
        return False
    return grad_accum_dtype in ("auto", "fp32")


# --------------------------------------------------------------------------------- parameters

def _kv_dim(shape: Shape) -> int:
    return shape.num_key_value_heads * shape.head_dim


def _module_dims(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of a Qwen2 decoder block."""
    h, i, kv = shape.hidden_size, shape.intermediate_size, _kv_dim(shape)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# The worker's MLP (worker/kernels.py install_lean_mlp) recomputes silu(gate) * up in backward instead
# of keeping it as down_proj's saved input: one elementwise kernel per layer buys a*i bytes per token
# per layer (a quarter of a non-recomputed Qwen2.5-1.5B layer), which lets fewer layers recompute.
LEAN_MLP = True


def lean_mlp_applies(compiled: bool, lora_targets: tuple[str, ...] | None) -> bool:
    """Whether the worker installs the lean MLP: not under train.compile (dynamo and its autograd
    function are untested together) and not when LoRA wraps down_proj (it must see the product)."""
    if not LEAN_MLP or compiled:
        return False
    return lora_targets is None or "down_proj" not in _lora_targets(lora_targets)


def _lora_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    return LORA_TARGETS if "all-linear" in targets else tuple(dict.fromkeys(targets))


def trainable_parameters(shape: Shape, lora_rank: int | None, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """All parameters for full fine-tuning; for LoRA r * (in + out) per target module per layer."""
    if lora_rank is None:
        return shape.parameter_count()
    dims = _module_dims(shape)
    per_layer = sum(lora_rank * sum(dims[name]) for name in _lora_targets(targets))
    return per_layer * shape.num_hidden_layers


def _largest_layer_module(shape: Shape) -> int:
    return max(a * b for a, b in _module_dims(shape).values())


def _layer_parameters(shape: Shape) -> int:
    """Parameters of one decoder layer."""
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    return (shape.parameter_count() - embeddings - shape.hidden_size) // shape.num_hidden_layers


def _largest_module(shape: Shape) -> int:
    """Largest single module ZeRO-3 must gather whole: embedding/lm_head or an MLP projection."""
    return max(shape.vocab_size * shape.hidden_size, _largest_layer_module(shape))


@dataclass(frozen=True)
class Param:
    numel: int
    matrix: bool  # ndim >= 2: the weight-decay group (engine.initialize and HF Trainer alike)
    trainable: bool


def parameter_list(shape: Shape, lora_rank: int | None = None,
                   targets: tuple[str, ...] = LORA_TARGETS) -> list[Param]:
    """Every parameter of Qwen2ForCausalLM (+ LoRA adapters) in module order -- the order in
    which DeepSpeed fills its flat buffers and cuts optimizer sub-groups."""
    h, kv = shape.hidden_size, _kv_dim(shape)
    dims = _module_dims(shape)
    lora = set(_lora_targets(targets)) if lora_rank is not None else set()
    full = lora_rank is None
    biases = {"q_proj": h, "k_proj": kv, "v_proj": kv}
    params = [Param(shape.vocab_size * h, True, full)]
    for _ in range(shape.num_hidden_layers):
        for name in LORA_TARGETS:  # q, k, v, o, gate, up, down: module order
            fan_in, fan_out = dims[name]
            params.append(Param(fan_in * fan_out, True, full))
            if name in biases:
                params.append(Param(biases[name], False, full))
            if name in lora:  # PEFT: lora_A (r x in), then lora_B (out x r)
                params += [Param(lora_rank * fan_in, True, True), Param(fan_out * lora_rank, True, True)]
        params += [Param(h, False, full), Param(h, False, full)]  # input / post-attention norms
    params.append(Param(h, False, full))  # final norm
    if not shape.tie_word_embeddings:
        params.append(Param(shape.vocab_size * h, True, full))
    return params


def largest_sub_group(inp: PlanInput) -> int:
    """Elements of the largest ZeRO-3 optimizer sub-group on one rank.

    stage3.py `_create_fp16_sub_groups`: per param group (decay / no decay), parameters' partitions
    (numel / world) are appended in order until the sub-group reaches sub_group_size, so a
    sub-group overshoots by up to one parameter: for qwen2.5-1.5b on one GPU 1.001e9 elements
    (embedding + 16 layers + a gate_proj)."""
    n, limit = inp.world_size, inp.buckets.sub_group_size
    largest = 0
    for matrix in (True, False):
        size = 0
        group = [p for p in parameter_list(inp.shape, inp.lora_rank, inp.lora_targets)
                 if p.trainable and p.matrix == matrix]
        for index, param in enumerate(group):
            size += -(-param.numel // n)
            if size >= limit or index == len(group) - 1:
                largest, size = max(largest, size), 0
    return largest


def persistent_parameters(inp: PlanInput) -> int:
    """Elements of the ZeRO-3 params that stay whole on every rank (numel <= the threshold)."""
    threshold = inp.buckets.param_persistence_threshold
    return sum(p.numel for p in parameter_list(inp.shape, inp.lora_rank, inp.lora_targets) if p.numel <= threshold)


# -------------------------------------------------------------------------------- activations

def layer_activation_bytes_per_token(inp: PlanInput) -> float:
    """Bytes one Qwen2 decoder layer keeps for backward, per token, without checkpointing.

    a = activation element size (2 for bf16), h = hidden, i = intermediate, kvr = width of k and
    v as attention sees them (h: HF's sdpa path repeats k/v to all heads whenever it passes a
    mask -- conservative; native GQA would be num_kv_heads*head_dim).
    HF modules (liger off):
      2 RMSNorms: each saves its fp32 upcast input (4h) and the bf16 normalized output (a*h)
      attention:  q/k/v input a*h, q after RoPE a*h, k and v 2*a*kvr, sdpa output a*h,
                  o_proj's contiguous input a*h, logsumexp 4*heads (fp32)
      MLP:        input a*h; gate out, silu(gate), up out, silu*up: 4*a*i
      bf16 total: 26h + 8i (+4*heads)
    Liger (RMSNorm saves only its bf16 input and an fp32 rstd per row; SwiGLU saves gate and up
    and recomputes silu): norms 2*(a*h + 4), MLP a*h + 3*a*i; bf16 total 18h + 6i (+...).
    Calibrated on gpu/README.md (H100, qwen2.5-1.5b, 8192 tokens): checkpointing off minus on
    measured 21.4 GiB (HF) and 16.6 GiB (Liger); this model predicts 22.3 and 16.2 GiB.
    Flash varlen (packed rows on a GPU) saves q/k/v's input, q, k and v at their own widths (GQA:
    kv = num_kv_heads*head_dim) and its output, which o_proj saves as its input: a*(3h + 2kv). On
    W2 (one 32k-token row, every 2nd layer recomputed, ZeRO-1, 1 x H100) ZeRO-1 measured 59.7 GiB
    peak where the sdpa count above plans 75.7 GiB and this one 69.5 (both with the margins below).
    Eager attention adds its saved fp32 softmax and bf16 probabilities: (4 + a) * heads * seq.
    LoRA adds each target's rank-r intermediate (a*r) and ignores that frozen base layers need
    not save their inputs (an upper bound).
    The lean MLP (lean_mlp_applies) keeps a*(h + 2i): its input, gate and up.
    """
    s, a = inp.shape, inp.bytes.activation
    h, i, heads = s.hidden_size, s.intermediate_size, s.num_attention_heads
    kvr = h
    attention = a * (h + h + 2 * kvr + h + h) + 4 * heads
    if inp.attention == "varlen":  # q/k/v input, q and k after RoPE at GQA width, v, output = o_proj input
        attention = a * (h + h + 2 * _kv_dim(s) + h) + 4 * heads
    if inp.liger:
        norms = 2 * (a * h + 4)
        mlp = a * (h + 3 * i)
    else:
        norms = 2 * (4 * h + a * h)
        mlp = a * (h + 4 * i)
    if inp.lean_mlp:  # input, gate and up: silu(gate) * up is recomputed in backward
        mlp = a * (h + 2 * i)
    total = float(norms + attention + mlp)
    if inp.attention == "eager":
        total += (4 + a) * heads * inp.seq_len
    if inp.lora_rank is not None:
        total += a * inp.lora_rank * len(_lora_targets(inp.lora_targets))
    return total


def checkpointed_layer_count(inp: PlanInput) -> int:
    """Decoder layers that recompute in backward when checkpointing is on: 0, n, 2n, ..."""
    return -(-inp.shape.num_hidden_layers // inp.checkpoint_every_n_layers)


def saved_activation_bytes(inp: PlanInput, gradient_checkpointing: bool, tokens: int) -> float:
    """What the forward leaves for the backward, per rank: alive at the loss and, shrinking layer
    by layer, through the backward.

    With checkpointing (HF, non-reentrant, per decoder layer) each recomputed layer keeps only its
    input (a*h per token); every other layer everything `layer_activation_bytes_per_token` counts. The head adds
    the final norm (and, without Liger's fused loss, lm_head's saved input a*h).
    """
    s, a = inp.shape, inp.bytes.activation
    h = s.hidden_size
    recomputed = checkpointed_layer_count(inp) if gradient_checkpointing else 0
    body = recomputed * a * h + (s.num_hidden_layers - recomputed) * layer_activation_bytes_per_token(inp)
    head = a * h + 4 if inp.liger else (4 * h + a * h) + a * h
    return tokens * (body + head)


def backward_extra_bytes(inp: PlanInput, gradient_checkpointing: bool, tokens: int) -> float:
    """What the backward through the layers adds on top of the saved activations, per rank: a
    working set of gradients -- incoming and outgoing hidden grads and the two MLP branch grads,
    a*(2h + 2i) per token -- and, with checkpointing, a recomputed layer in full, but only when the
    last layer is one of the recomputed (0, n, 2n, ...): the backward runs from the last layer down,
    so a recomputed layer below it starts after the layers above it freed at least as much.
    Measured (1 x H100, W2 at 32k rows, lean MLP): 7 or 14 of the 28 layers kept, 63.2 / 71.7 GiB."""
    s, a = inp.shape, inp.bytes.activation
    working = a * (2 * s.hidden_size + 2 * s.intermediate_size)
    last_recomputed = (s.num_hidden_layers - 1) % inp.checkpoint_every_n_layers == 0
    recompute = layer_activation_bytes_per_token(inp) if gradient_checkpointing and last_recomputed else 0.0
    return tokens * (recompute + working)


def activation_bytes(inp: PlanInput, gradient_checkpointing: bool, tokens: int) -> float:
    """Activation memory at the backward peak, per rank: saved + recomputed layer + working set."""
    return (saved_activation_bytes(inp, gradient_checkpointing, tokens)
            + backward_extra_bytes(inp, gradient_checkpointing, tokens))


# Liger's fused loss runs its rows through the vocabulary in chunks sized so that a chunk's logits
# take C times the hidden states' memory (its chunk_mem_const). With C = 1 a 24k-token row of
# Qwen2.5-1.5B (V/h = 99) is ~94 chunks of 256 tokens, so fewer, larger chunks looked like a lever
# for the host-bound step; measured on W1 (1 x H100, 2026-11-26, benchmarks/gpu1_chunks.sh): C = 16
# ran 34,007 tokens/s against 33,806 for C = 1 in the same call (+0.6%, noise) for up to 3 GB
# more, so Liger's default stays. The worker (worker/kernels.py) passes this; the planner counts it.
LIGER_CHUNK_MEM_CONST = 1


def logits_bytes(inp: PlanInput, tokens: int) -> float:
    """Memory of the logits and the loss at their peak, per rank.

    Liger's fused linear cross-entropy (liger_kernel/ops/fused_linear_cross_entropy.py) never
    materializes all logits: chunks of next_pow2(ceil(T / ceil(V / (C h)))) tokens x V with
    C = LIGER_CHUNK_MEM_CONST, plus the lm_head weight gradient (V x h, weight dtype) and the input
    gradient (T x h) that it computes in the forward. gpu/README.md measured 0.53 GB at
    8192 x 151936 x 1536 with C = 1; this gives 0.49 GiB.
    Plain loss (HF's ForCausalLMLoss and TokenLossModel alike: logits.float(), cross_entropy):
    the peak is in the backward of log_softmax, which holds its saved fp32 output, the fp32
    gradient from nll_loss and the fp32 gradient it returns -- 4+4+4 = 12 B per token per vocab
    entry (the forward's bf16 logits + fp32 upcast + log-softmax, 2+4+4, are fewer). Measured:
    the HF Trainer baselines at 8192 and 16384 tokens are within 0.3% with 12 B, 5-9% under
    with 10 B (benchmarks/plan_validation.py).
    """
    s, a = inp.shape, inp.bytes.activation
    v, h = s.vocab_size, s.hidden_size
    if inp.liger:
        inc = math.ceil(v / (LIGER_CHUNK_MEM_CONST * h))
        chunk = min(tokens, 1 << max(0, math.ceil(math.log2(math.ceil(tokens / inc)))))
        return a * (chunk * v + v * h + tokens * h)
    return tokens * v * 12


# ------------------------------------------------------------------------------------ results

@dataclass(frozen=True)
class GpuMemory:
    """Per-rank GPU memory in GiB: the components, and the peaks of the three moments that
    compete (the loss, the backward through the layers, the optimizer step)."""

    params: float
    grads: float
    optimizer: float
    activations: float  # at the backward peak: saved + recomputed layer + gradient working set
    logits: float  # the loss at its peak
    comm_buckets: float  # ZeRO reduce buckets
    live_params: float  # ZeRO-3 on >1 rank: gathered params + the gathered module's gradient
    step_transient: float  # flattened bf16 + fp32 copies of the gradients being stepped
    runtime: float  # CUDA context + NCCL: outside torch's allocator
    fragmentation: float
    saved_activations: float = 0.0  # the part of `activations` alive at the loss
    buckets_in_backward_only: bool = False  # stage 1/2: reduce buckets exist during backward only
    grads_in_backward_only: bool = False  # stage 1/2 without accumulation: none between steps
    grads_with_activations: float | None = None  # the part of `grads` alive with every activation (None: all)

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def buffers(self) -> float:
        """Everything besides model states, activations and logits, as the table shows it."""
        return self.comm_buckets + self.live_params + self.runtime + self.fragmentation

    @property
    def _persistent_buckets(self) -> float:
        return 0.0 if self.buckets_in_backward_only else self.comm_buckets

    @property
    def loss_peak(self) -> float:
        """End of the forward / backward of the loss: saved activations + logits. Stage 1/2
        gradients count unless there is one micro-batch per step (they are allocated at the
        first gradient hook, after the loss)."""
        grads = 0.0 if self.grads_in_backward_only else self._grads_with_activations
        return (self.params + self.optimizer + grads + self._persistent_buckets + self.saved_activations
                + self.logits + self.live_params)

    @property
    def _grads_with_activations(self) -> float:
        return self.grads if self.grads_with_activations is None else self.grads_with_activations

    @property
    def backward_peak(self) -> float:
        """The larger of backward's start (every activation, the gradients already there) and its end
        (every gradient, only the first layer's recompute and transients left)."""
        start = self.params + self.optimizer + self._grads_with_activations + self.activations
        end = self.model_states + self.activations - self.saved_activations
        return max(start, end) + self.comm_buckets + self.live_params

    @property
    def step_peak(self) -> float:
        return self.model_states + self._persistent_buckets + self.step_transient

    @property
    def peak_phase(self) -> str:
        """Which moment the peak is at: "loss", "backward" or "step"."""
        phases = {"loss": self.loss_peak, "backward": self.backward_peak, "step": self.step_peak}
        return max(phases, key=phases.__getitem__)

    @property
    def allocated_peak(self) -> float:
        """Comparable to torch.cuda.max_memory_allocated() / 2**30."""
        return max(self.loss_peak, self.backward_peak, self.step_peak)

    @property
    def total(self) -> float:
        """What the card must hold (nvidia-smi's view): allocated + runtime + allocator slack."""
        return self.allocated_peak + self.runtime + self.fragmentation


@dataclass(frozen=True)
class HostMemory:
    """Host RAM per node in GiB."""

    load: float  # while the model is loaded
    train: float  # steady state: per-process overhead + offloaded states

    @property
    def peak(self) -> float:
        return max(self.load, self.train)


@dataclass(frozen=True)
class Estimate:
    option: Option
    gpu: GpuMemory
    host: HostMemory
    fits_gpu: bool
    fits_host: bool
    max_tokens: int  # largest tokens per micro-batch that still fits the GPU (0: none)

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host


@dataclass(frozen=True)
class CheckpointSize:
    """Disk, GiB. DeepSpeed checkpoint: weights + optimizer states summed over all ranks."""

    weights: float
    optimizer: float
    export: float  # final Hugging Face safetensors (merged LoRA: the full model)
    adapter: float | None  # LoRA only: the adapter alone, when it is not merged on export

    @property
    def deepspeed(self) -> float:
        return self.weights + self.optimizer


@dataclass(frozen=True)
class Plan:
    input: PlanInput
    parameters: int
    trainable: int
    estimates: list[Estimate]  # fastest first
    checkpoint: CheckpointSize
    gpu_budget_gib: float
    host_budget_gib: float | None  # None: host RAM unknown, not checked
    # Nothing fits: the smallest world size (same GPUs, same ranks per node) at which an option
    # would, None when none up to MAX_WORLD_SEARCHED does (or something fits already).
    smallest_fitting_world: int | None = None

    @property
    def recommended(self) -> Estimate | None:
        return next((e for e in self.estimates if e.fits), None)

    def _host_text(self) -> str:
        return "host RAM not checked" if self.host_budget_gib is None else f"{self.host_budget_gib:.0f} GiB host/node"

    def why(self) -> str:
        """One line: why the recommendation (or why nothing fits, and what would)."""
        best = self.recommended
        if best is None:
            least = min(self.estimates, key=lambda e: e.gpu.total)
            host = "" if self.host_budget_gib is None else (
                f" and {least.host.peak:.0f} GiB host/node (budget {self.host_budget_gib:.0f})")
            return (f"nothing fits: the leanest option, {least.option.label}, needs {least.gpu.total:.1f} GiB/GPU "
                    f"(budget {self.gpu_budget_gib:.1f}){host}; {self.advice()}")
        faster = self.estimates[: self.estimates.index(best)]
        text = f"fastest option that fits {self.gpu_budget_gib:.1f} GiB/GPU and {self._host_text()}"
        if not faster:
            return text
        # Name the faster option that misses by the least, and what it misses.
        closest = min(faster, key=self._overshoot)
        host_share = 0.0 if self.host_budget_gib is None else closest.host.peak / self.host_budget_gib
        if closest.gpu.total / self.gpu_budget_gib >= host_share:
            need = f"{closest.gpu.total:.1f} GiB/GPU"
        else:
            need = f"{closest.host.peak:.0f} GiB host/node"
        return f"{text}; every faster option is over budget, the closest being {closest.option.label} at {need}"

    def advice(self) -> str:
        """What would make something fit, from what the options miss. LoRA is suggested only
        when it is off; with LoRA on, the frozen base weights are what must shrink per GPU."""
        inp = self.input
        tips = []
        if self.smallest_fitting_world is not None:
            world, per_node = self.smallest_fitting_world, inp.gpus_per_node
            nodes = f" = {world // per_node} nodes x {per_node}" if world > per_node else ""
            tips.append(f"{world} GPUs{nodes} of this size would fit (now {inp.world_size})")
        else:
            tips.append(f"more GPUs of this size do not fit it either (up to {MAX_WORLD_SEARCHED} searched)")
        if inp.lora_rank is None:
            tips.append("use LoRA (lora.enabled = true)")
        elif not any(e.fits_gpu for e in self.estimates):
            base = inp.bytes.param * inp.shape.parameter_count() / GIB
            tips.append(f"LoRA is already on: its frozen {inp.precision} base weights alone are {base:.0f} GiB, "
                        f"which ZeRO-3 splits over the GPUs, so more GPUs (or GPUs with more memory) are "
                        f"what helps; a smaller lora.r does not")
        host_ok = [e for e in self.estimates if e.fits_host]
        largest = max((e.max_tokens for e in host_ok), default=0)
        if 0 < largest < inp.tokens_per_micro_batch:
            tips.append(f"or at most {largest} tokens per micro-batch (now {inp.tokens_per_micro_batch})")
        gpu_ok = [e for e in self.estimates if e.fits_gpu]
        if gpu_ok and self.host_budget_gib is not None:
            least = min(gpu_ok, key=lambda e: e.host.peak)
            need = least.host.peak / (1 - inp.host_safety_margin)
            tips.append(f"or {need:.0f} GiB of host RAM per node for {least.option.label} "
                        f"(now {inp.host_mem_gib:.0f}; offloaded states are per rank)")
        return "; ".join(tips)

    def _overshoot(self, e: Estimate) -> float:
        host_share = 0.0 if self.host_budget_gib is None else e.host.peak / self.host_budget_gib
        return max(e.gpu.total / self.gpu_budget_gib, host_share)


# ------------------------------------------------------------------------------------ estimate

def gpu_memory(inp: PlanInput, option: Option, tokens: int | None = None) -> GpuMemory:
    tokens = inp.tokens_per_micro_batch if tokens is None else tokens
    b, n, buckets = inp.bytes, inp.world_size, inp.buckets
    total = inp.shape.parameter_count()
    trainable = trainable_parameters(inp.shape, inp.lora_rank, inp.lora_targets)
    stage3 = option.stage == 3
    # ZeRO-0 partitions nothing: every rank holds what ZeRO-1 holds on one rank (measured on one
    # H100: less, 28.8 vs 31.7 GiB for W1, so this errs on the safe side).
    states_over = 1 if option.stage == 0 else n
    fp32_accumulation = fp32_grad_accumulation(inp.grad_accum_dtype, stage=option.stage, precision=inp.precision,
                                               offload_optimizer=option.offload_optimizer)

    # Model states. Frozen params (LoRA base) are in no optimizer group: stage 1/2 keep them
    # whole on every rank, stage 3 (zero.Init) partitions them like the rest. Stage 3 on more
    # than one rank also keeps the persistent (small) params whole next to their partitions;
    # their partitions stay on the GPU even with param offload.
    if stage3:
        persistent = b.param * persistent_parameters(inp)
        if option.offload_params:
            params = persistent
        else:
            params = b.param * total / n + (persistent if n > 1 else 0.0)
            if inp.hpz_partition_size > 1:  # ZeRO++ secondary partition, inside the node
                params += b.param * total / inp.hpz_partition_size
    else:
        params = b.param * total
    # The step converts the gradients it updates: a flattened copy in the gradient dtype, then
    # its fp32 conversion (none when the gradients are fp32 already); both exist for a moment.
    step_bytes = b.grad + (4 if b.grad != 4 else 0)
    accumulation = inp.accumulates(tokens)
    # Without accumulation, gradients that the step frees (ZeRO-0's, the BF16_Optimizer's bf16 ones)
    # appear in backward as the activations go: next to (nearly) all activations only the first ones
    # backward makes, the lm_head's and the last layer's (measured, W3 on one H100: ZeRO-0 holds
    # 14 B/param between steps). ZeRO-1/2's own gradient partitions stay allocated: counted whole.
    first_grads = b.grad * min(trainable, _largest_module(inp.shape) + _layer_parameters(inp.shape))
    if option.offload_optimizer:
        # Stage 1 does not partition gradients, so the full gradients stay on the GPU; stage 2/3
        # send each reduced bucket to the host's fp32 buffers.
        grads = b.grad * trainable if option.stage == 1 else 0.0
        optimizer = 0.0
        step_transient = 0.0
        grads_with_acts = grads
    else:
        grads = b.grad * trainable / (1 if option.stage <= 1 else n)
        optimizer = b.optimizer * trainable / states_over
        stepped = largest_sub_group(inp) if stage3 else trainable / states_over
        step_transient = step_bytes * stepped
        grads_with_acts = grads if accumulation or option.stage != 0 else min(grads, first_grads)
        if fp32_accumulation:  # the fp32 buffer is the step's gradient: no conversion copy
            step_transient = 0.0
            # the bf16 gradients are freed at every step (zero_grad sets them to None); with
            # immediate_grad_update each one as soon as it is added: one at a time, the largest
            if inp.immediate_grad_update:
                grads, grads_with_acts = 0.0, b.grad * _largest_module(inp.shape)
            else:
                grads_with_acts = grads if accumulation else min(grads, first_grads)
            grads += 4 * trainable
            grads_with_acts += 4 * trainable

    # Communication buffers. Stage 1/2 double-buffer the reduce bucket when overlap_comm is on;
    # stage 3 has one bucket per dtype, and gathers params module by module: the module in use
    # (the embedding/lm_head is the largest) plus the prefetch, capped by max_live_parameters,
    # and the module's full gradient before it is reduce-scattered into the partition. On one
    # rank without param offload a gathered param is a view of its partition: no memory.
    if stage3:
        comm = b.grad * buckets.reduce_bucket
        largest = _largest_module(inp.shape)
        gathered = min(largest + buckets.prefetch_bucket, max(buckets.max_live_parameters, largest))
        if n == 1 and not option.offload_params:
            gathered = 0
        gathered_grad = _largest_layer_module(inp.shape) if inp.lora_rank is None else 0
        live = b.param * gathered + b.grad * gathered_grad
    else:
        comm = b.grad * buckets.reduce_bucket * (2 if inp.overlap_comm else 1)
        live = 0.0

    saved = saved_activation_bytes(inp, option.gradient_checkpointing, tokens)
    acts = saved + backward_extra_bytes(inp, option.gradient_checkpointing, tokens)
    logits = logits_bytes(inp, tokens)
    runtime = CUDA_CONTEXT_GIB + (NCCL_BUFFERS_GIB if n > 1 else 0.0)
    frag = inp.allocator_slack * (acts + logits + live)
    if live:  # weights gathered per layer (ZeRO-3 on several ranks, or from the host)
        frag += inp.gather_slack_layers * b.param * _layer_parameters(inp.shape)
    return GpuMemory(params=params / GIB, grads=grads / GIB, optimizer=optimizer / GIB,
                     activations=acts / GIB, logits=logits / GIB, comm_buckets=comm / GIB,
                     live_params=live / GIB, step_transient=step_transient / GIB,
                     runtime=runtime, fragmentation=frag / GIB, saved_activations=saved / GIB,
                     buckets_in_backward_only=not stage3, grads_with_activations=grads_with_acts / GIB,
                     grads_in_backward_only=not stage3 and not accumulation and not fp32_accumulation)


def host_memory(inp: PlanInput, option: Option) -> HostMemory:
    """Host RAM per node.

    Load: with ZeRO-3 the model is built under deepspeed.zero.Init, so no rank ever holds the
    whole model -- each reads one checkpoint shard at a time. Stages 1/2 have every process of
    the node materialize the full model in host RAM (bf16: 2 B/param) before moving it to its GPU.
    Offload, per rank then x ranks per node:
      stage 1/2 (stage_1_and_2.py, cpu_offload): fp32 master + Adam m, v (12), the fp32
        gradient partition (4), the fp32 accumulation buffer used with gradient accumulation (4)
        and a bf16 staging copy of the params (2) = 22 B per trainable param of the partition.
      stage 3 (stage3.py): master + m + v (12), the pinned fp32 gradient of every sub-group, kept
        as the master partition's .grad (4), and the pinned gradient-accumulation partition
        (grad_partitions_flat_buffer, fp32: 4) = 20 B per trainable param of the partition.
        Measured on 4 x H100 (2026-11-26, benchmarks/RESULTS.md): 48 layers of the 32B shape,
        470.6 GiB host per node against 477 planned here; the former 14 B/param model planned
        352 GiB and passed a 63-layer run that the host could not hold.
      param offload: the bf16 param partition (2 B/param / world).
    """
    b, n, r = inp.bytes, inp.world_size, inp.ranks_per_node
    total = inp.shape.parameter_count()
    trainable = trainable_parameters(inp.shape, inp.lora_rank, inp.lora_targets)
    if option.stage == 3:
        load_per_rank = PROCESS_HOST_GIB * GIB + inp.checkpoint_shard_gib * GIB
    else:
        load_per_rank = PROCESS_HOST_GIB * GIB + b.param * total
    offload = 0.0  # (none at ZeRO-0: the recipe refuses offload there)
    partition = trainable / n
    if option.offload_optimizer:
        if option.stage == 3:
            offload += (b.optimizer + 4 + 4) * partition
        else:
            offload += (b.optimizer + 4 + 4 + b.param) * partition
    if option.offload_params:
        offload += b.param * total / n
    train_per_rank = PROCESS_HOST_GIB * GIB + offload
    return HostMemory(load=r * load_per_rank / GIB, train=r * train_per_rank / GIB)


def checkpoint_size(inp: PlanInput) -> CheckpointSize:
    """DeepSpeed checkpoint: module weights (all params, param dtype) + the optimizer states of
    the trainable params (fp32 master + m + v); the HF export is the weights in the param dtype
    (LoRA merged, so the full model)."""
    b = inp.bytes
    total = inp.shape.parameter_count()
    trainable = trainable_parameters(inp.shape, inp.lora_rank, inp.lora_targets)
    adapter = b.param * trainable / GIB if inp.lora_rank is not None else None
    return CheckpointSize(weights=b.param * total / GIB, optimizer=b.optimizer * trainable / GIB,
                          export=b.param * total / GIB, adapter=adapter)


def _fits_gpu(inp: PlanInput, mem: GpuMemory) -> bool:
    return mem.total <= inp.gpu_mem_gib * (1 - inp.safety_margin)


# Packed rows as large as memory allows, up to this size: at the same samples per optimizer step,
# one 32k-token row ran W1 35% faster than two 16k rows at the same peak memory (1 x H100,
# 2026-11-26, benchmarks/RESULTS.md "Levers"); larger rows are not measured, so not proposed.
ROW_TOKENS_FOR_SPEED = 32768


def speed_row_tokens(fitting_tokens: int, *, max_length: int, cap: int = ROW_TOKENS_FOR_SPEED) -> int | None:
    """The packed-row size (`train.micro_batch_tokens`) `plan --write` proposes: the largest that
    fits (`fitting_tokens`, the option's max_tokens) up to `cap`, a multiple of 1024, never below
    one whole sample (`max_length`). None when not even one sample fits."""
    if fitting_tokens < max_length:
        return None
    return max(max_length, min(cap, fitting_tokens) // 1024 * 1024)


@dataclass(frozen=True)
class SpeedChoice:
    """The option to run, the packed-row size to run it with (None: padded batches) and, with
    checkpointing, the train.checkpoint_every_n_layers that fits (1 without it)."""

    estimate: Estimate
    row_tokens: int | None
    checkpoint_every_n_layers: int = 1


# How speed_choice ranks the options of one kind (the same offload, ZeRO-3 or not): an estimated step-time
# share over ZeRO-1 with fp32 accumulation and no recompute. A recomputed layer runs its forward again,
# about a third of its forward and backward. Measured on one H100 (benchmarks/RESULTS.md, session 7,
# lean MLP, 32k rows, harness): W3 (8 layers of 7B width) ZeRO-0 with 1 layer recomputed 33.8-34.6k
# tokens/s, ZeRO-1 with all 8 (it fits no fewer) 28.2-28.5k; W2 with 2 / 4 / 7 / 14 of 28 layers
# recomputed 43.8k / 42.9k / 41.9k / 39.7k (calls 1-2).
RECOMPUTE_SHARE_OF_LAYER = 1 / 3
# The optimizer and its gradient handling, per stage, against ZeRO-1 with fp32 accumulation (one H100,
# W1, sessions 5-6): ZeRO-0 (FP16_UnfusedOptimizer) 4.2% slower, ZeRO-1 with bf16 accumulation 5.2%,
# ZeRO-2 7% (2.8% below ZeRO-0). ZeRO-3 is a kind of its own (speed_key), ranked only against itself.
STAGE_STEP_PENALTY = {0: 0.042, 1: 0.052, 2: 0.07, 3: 0.0}


def step_cost_share(inp: PlanInput, option: Option, every_n: int) -> float:
    """speed_choice's ranking within a kind: recompute plus the stage's optimizer penalty."""
    fp32 = fp32_grad_accumulation(inp.grad_accum_dtype, stage=option.stage, precision=inp.precision,
                                  offload_optimizer=option.offload_optimizer)
    penalty = 0.0 if fp32 else STAGE_STEP_PENALTY[option.stage]
    if not option.gradient_checkpointing:
        return penalty
    layers = inp.shape.num_hidden_layers
    return penalty + RECOMPUTE_SHARE_OF_LAYER * -(-layers // every_n) / layers


def speed_choice(result: Plan, *, shortest_row: int, packing: bool,
                 allowed: Callable[[Option], bool] = lambda option: True,
                 choose_every_n: bool = True, fixed_row: int | None = None) -> SpeedChoice | None:
    """The fastest `allowed` option that fits the job's micro-batch (result.input.tokens_per_micro_batch)
    and, packed, the row `speed_row_tokens` proposes for it (the largest that fits, up to
    ROW_TOKENS_FOR_SPEED, at least `shortest_row`), among the options of the fastest kind (offload,
    ZeRO-3) that runs at all. Within that kind the lowest step_cost_share: with checkpointing at the
    largest checkpoint_every_n_layers that fits (`choose_every_n`: "auto"), else at the input's; on
    rows of `fixed_row` tokens when the recipe sets them (train.micro_batch_tokens). When
    no allowed option of that kind fits that micro-batch, packed: the one that fits the largest rows
    of at least `shortest_row`. None when nothing allowed fits. What `plan` recommends (all options)
    and what the launcher resolves the "auto" keys to (the recipe's ZeRO options only) are both this
    choice."""
    inp = result.input
    # Only the fastest kind of option (no offload before offload, ZeRO-0/1/2 before ZeRO-3: the start
    # of speed_key) that runs at all: never ZeRO-3 or offload just for larger rows (ZeRO-3 measured
    # 1.86x slower than ZeRO-2 on one H100; 32k rows 1.35x faster than 16k).
    runs = [e for e in result.estimates if allowed(e.option) and e.fits_host
            and (e.fits_gpu or (packing and e.max_tokens >= shortest_row))]
    if not runs:
        return None
    kind = min(_option_kind(e.option) for e in runs)
    of_kind = [e for e in runs if _option_kind(e.option) == kind]
    fitting = [e for e in of_kind if e.fits_gpu]
    if not fitting:  # packed: the largest rows (ties: the fastest)
        best = max(of_kind, key=lambda e: e.max_tokens)
        row = speed_row_tokens(best.max_tokens, max_length=shortest_row)
        return SpeedChoice(best, row, _every_n(inp, best.option, fixed_row or row or shortest_row, choose_every_n))
    # Rows of the full speed size first: W1 (1 x H100, session 6) ran one 32k row with every 2nd layer
    # recomputed 10% faster than 16k rows with none (a step then often takes a second, part-empty row).
    full_row = speed_row_tokens(1 << 40, max_length=shortest_row)
    ranked = []
    for e in fitting:
        fits = e.max_tokens
        if choose_every_n and e.option.gradient_checkpointing:  # its rows with every layer recomputed
            fits = max_tokens(dataclasses.replace(inp, checkpoint_every_n_layers=1), e.option)
        row = speed_row_tokens(fits, max_length=shortest_row) if packing else None
        every = _every_n(inp, e.option, fixed_row or row or inp.tokens_per_micro_batch, choose_every_n)
        short_rows = fixed_row is None and row is not None and row < full_row
        ranked.append((short_rows, step_cost_share(inp, e.option, every), e.option.speed_key(),
                       SpeedChoice(e, row, every)))
    return min(ranked, key=lambda item: item[:3])[3]


def _every_n(inp: PlanInput, option: Option, tokens: int, choose: bool) -> int:
    if not option.gradient_checkpointing:
        return 1
    if not choose:
        return inp.checkpoint_every_n_layers
    return fewest_recomputed_layers(inp, option, tokens) or 1


def _option_kind(option: Option) -> tuple[bool, ...]:
    return option.speed_key()[:3]  # (param offload, optimizer offload, ZeRO-3)


def fewest_recomputed_layers(inp: PlanInput, option: Option, tokens: int) -> int | None:
    """The largest train.checkpoint_every_n_layers (> 1: the fewest layers recomputed in backward)
    at which `option`, with checkpointing, still fits rows of `tokens`; None when only full
    checkpointing fits or the option does not checkpoint. Memory grows with n, so a scan from the
    top stops at the first fit. Since the GPU is 95-97% busy (session 6) each layer not recomputed
    pays: see RECOMPUTE_SHARE_OF_LAYER."""
    if not option.gradient_checkpointing:
        return None
    for every in range(inp.shape.num_hidden_layers, 1, -1):
        candidate = dataclasses.replace(inp, checkpoint_every_n_layers=every)
        if _fits_gpu(candidate, gpu_memory(candidate, option, tokens)):
            return every
    return None


def max_tokens(inp: PlanInput, option: Option, step: int = 128, limit: int = 1 << 20) -> int:
    """Largest multiple of `step` tokens per micro-batch that fits the GPU (0 if none does).
    Memory only grows with tokens, so bisection is exact."""
    if not _fits_gpu(inp, gpu_memory(inp, option, step)):
        return 0
    lo, hi = 1, limit // step  # lo fits; find the last k such that k*step fits
    if _fits_gpu(inp, gpu_memory(inp, option, hi * step)):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits_gpu(inp, gpu_memory(inp, option, mid * step)):
            lo = mid
        else:
            hi = mid
    return lo * step


def estimate(inp: PlanInput, option: Option) -> Estimate:
    gpu = gpu_memory(inp, option)
    host = host_memory(inp, option)
    return Estimate(option=option, gpu=gpu, host=host, fits_gpu=_fits_gpu(inp, gpu),
                    fits_host=_fits_host(inp, host), max_tokens=max_tokens(inp, option))


def _fits_host(inp: PlanInput, host: HostMemory) -> bool:
    """Unknown host RAM (None) is not checked: the plan says so instead of guessing."""
    return inp.host_mem_gib is None or host.peak <= inp.host_mem_gib * (1 - inp.host_safety_margin)


# Nothing fits: how far to look for a world size that would (128 nodes of 8 GPUs).
MAX_WORLD_SEARCHED = 1024


def smallest_fitting_world(inp: PlanInput) -> int | None:
    """The smallest world size above the job's, with the same GPUs and ranks per node, at which
    some option fits the GPU and host budgets: a partial node filled first, then whole nodes."""
    per_node = inp.gpus_per_node
    within_node = [w for w in (1, 2, 4, per_node) if w <= per_node]
    candidates = sorted({w for w in within_node + [per_node * k for k in range(2, MAX_WORLD_SEARCHED // per_node + 1)]
                         if inp.world_size < w <= MAX_WORLD_SEARCHED})
    options = all_options(lora=inp.lora_rank is not None)
    for world in candidates:
        bigger = dataclasses.replace(inp, world_size=world)
        if any(_fits_gpu(bigger, gpu_memory(bigger, o)) and _fits_host(bigger, host_memory(bigger, o))
               for o in options):
            return world
    return None


def plan(inp: PlanInput) -> Plan:
    """Every option (fastest first) with its memory, and the job's checkpoint sizes."""
    estimates = [estimate(inp, option)
                 for option in all_options(lora=inp.lora_rank is not None, single_rank=inp.world_size == 1)]
    nothing_fits = not any(e.fits for e in estimates)
    return Plan(input=inp, parameters=inp.shape.parameter_count(),
                trainable=trainable_parameters(inp.shape, inp.lora_rank, inp.lora_targets),
                estimates=estimates, checkpoint=checkpoint_size(inp),
                gpu_budget_gib=inp.gpu_mem_gib * (1 - inp.safety_margin),
                host_budget_gib=None if inp.host_mem_gib is None else inp.host_mem_gib * (1 - inp.host_safety_margin),
                smallest_fitting_world=smallest_fitting_world(inp) if nothing_fits else None)
