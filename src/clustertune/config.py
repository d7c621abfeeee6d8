"""Typed, validated recipe: TOML in, frozen pydantic models out.

Unknown keys, wrong types and impossible combinations fail at load time with one error that
names the file, the key path and the reason, before any process or GPU is touched.

    clustertune validate configs/qwen2.5-1.5b-sft-1gpu.toml --set train.lr=1e-3

This module is imported by the launcher side too, so it must never import torch.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PlainValidator, Tag, ValidationError,
                      model_validator)

from clustertune.errors import UserError
from clustertune.shapes import LORA_TARGETS


class RecipeError(UserError):
    """A recipe (or override) that cannot be used; the message is meant for the user as-is."""


class _Section(BaseModel):
    # extra="forbid": a typo is an error, never a silently ignored key.
    # strict on ints/bools so "2" or 1.5 are not coerced into a stage number.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


class ModelSection(_Section):
    """`path`: a local Hugging Face model directory, or a built-in shape name (see shapes.py)."""

    path: str = "tiny"
    # Tokenizer directory; default: the model directory, or the bundled demo tokenizer for
    # built-in shapes (random-init shapes are for throughput and tests, not real text).
    tokenizer: str | None = None
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = "auto"
    # Liger fused kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU): "auto" = on GPU only.
    liger: Literal["auto", "on", "off"] = "auto"
    trust_remote_code: bool = False
    # Built-in shapes only: keep the first N decoder layers (a real width with fewer layers, random
    # init), to try memory and speed of a big model's width on a smaller machine.
    num_layers: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _num_layers_only_for_shapes(self) -> "ModelSection":
        from clustertune.shapes import lookup_shape
        if self.num_layers is not None:
            shape = lookup_shape(self.path)
            if shape is None:
                raise ValueError(f"model.num_layers needs a built-in shape for model.path (got {self.path!r}): "
                                 "dropping layers of a pretrained model would discard its weights")
            if self.num_layers > shape.num_hidden_layers:
                raise ValueError(f"model.num_layers = {self.num_layers}: {self.path} has only "
                                 f"{shape.num_hidden_layers} layers")
        return self


class TrainFile(_Section):
    """The table form of a data.train_files entry: `{path = "extra.jsonl", weight = 2.0}`.

    The weight scales how many of the file's samples go into the train set: floor(weight)
    copies of each, plus round(frac(weight) * n) distinct samples picked with train.seed
    (clustertune.data.prepare.apply_weights says exactly how). A plain string has weight 1."""

    path: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)


# A data.train_files entry: a path, or a {path, weight} table. Dispatching on the input's type
# gives one error for a bad entry instead of one per union member.
TrainFileEntry = Annotated[
    Annotated[str, Tag("str")] | Annotated[TrainFile, Tag("table")],
    Discriminator(lambda v: "table" if isinstance(v, (dict, TrainFile)) else "str"),
]


AUTO = "auto"


def _whole_number_or_auto(minimum: int) -> PlainValidator:
    """A key that takes a whole number >= `minimum` or "auto": one error naming both forms (a plain
    union would give one line per member)."""
    def check(value: Any) -> int | str:
        if value == AUTO:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'expected a whole number >= {minimum} or "auto"')
        if value < minimum:
            raise ValueError(f'must be >= {minimum} (or "auto")')
        return value
    return PlainValidator(check)


def _bool_or_auto(value: Any) -> bool | str:
    if value == AUTO or isinstance(value, bool):
        return value
    raise ValueError('expected true, false or "auto"')


ZERO_STAGES = (0, 1, 2, 3)


def _stage_or_auto(value: Any) -> int | str:
    if value == AUTO or (not isinstance(value, bool) and isinstance(value, int) and value in ZERO_STAGES):
        return value
    raise ValueError('expected 0, 1, 2, 3 or "auto"')


# "auto" keys (zero.stage and three of [train]): resolved once by the launcher (clustertune.auto)
# before any rank starts; a worker only ever sees the concrete value.
TokensOrAuto = Annotated[int | Literal["auto"], _whole_number_or_auto(8)]
LayersOrAuto = Annotated[int | Literal["auto"], _whole_number_or_auto(1)]
BoolOrAuto = Annotated[bool | Literal["auto"], PlainValidator(_bool_or_auto)]
StageOrAuto = Annotated[int | Literal["auto"], PlainValidator(_stage_or_auto)]


class DataSection(_Section):
    # Required. Files (JSONL, a JSON array, Parquet, Arrow, any of them .gz/.zst) or a directory
    # written by `datasets.save_to_disk`; a plain path or {path, weight}. A relative path is
    # resolved against the current directory (where clustertune is started).
    train_files: list[TrainFileEntry] = Field(min_length=1)
    format: Literal["auto", "messages", "alpaca", "sharegpt"] = "auto"
    max_length: int = Field(default=2048, ge=8)
    overlength: Literal["truncate", "drop"] = "truncate"
    skip_invalid: bool = False
    # Padding-free packing (the default: the measured fast path): samples are concatenated into
    # micro-batches of at most train.micro_batch_tokens tokens, attention does not cross sample
    # boundaries. false: padded micro-batches of train.micro_batch_size samples.
    packing: bool = True
    cache_dir: str | None = None  # default: <output_dir>/../.cache/tokenized
    eval_files: list[str] = Field(default_factory=list)
    eval_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)

    @property
    def train_paths(self) -> list[str]:
        return [f if isinstance(f, str) else f.path for f in self.train_files]

    @property
    def train_weights(self) -> list[float]:
        return [1.0 if isinstance(f, str) else f.weight for f in self.train_files]

    def with_paths(self, resolve: Callable[[str], str]) -> "DataSection":
        """A copy with every train and eval path passed through `resolve`; weights are kept."""
        train = [resolve(f) if isinstance(f, str) else f.model_copy(update={"path": resolve(f.path)})
                 for f in self.train_files]
        return self.model_copy(update={"train_files": train, "eval_files": [resolve(f) for f in self.eval_files]})


class TrainSection(_Section):
    # What the loss is (worker/objectives): "sft" supervised fine-tuning on assistant tokens;
    # "dpo" direct preference optimization on chosen/rejected pairs ([dpo] section); "grpo" group
    # relative policy optimization with verifiable rewards on prompts with answers ([grpo] section).
    objective: Literal["sft", "dpo", "grpo"] = "sft"
    max_steps: int | None = Field(default=None, ge=1)
    epochs: float | None = Field(default=None, gt=0)
    global_batch_size: int = Field(default=16, ge=1)  # samples per optimizer step (unpacked)
    micro_batch_size: int = Field(default=4, ge=1)  # samples per rank per forward (unpacked)
    # Token budget per forward (packed rows). "auto": the launcher asks the planner for the largest
    # row that fits the GPU, up to 32k tokens (plan.ROW_TOKENS_FOR_SPEED); 8192 on the CPU.
    micro_batch_tokens: TokensOrAuto = AUTO
    lr: float = Field(default=2e-5, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_beta1: float = Field(default=0.9, gt=0, lt=1)
    adam_beta2: float = Field(default=0.95, gt=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0)  # 0 disables clipping
    seed: int = 42
    # Recompute activations in backward. "auto": on when the planner says the rows need it on this
    # GPU (without it W1 on an H100 fits only half the row: 14% slower); off on the CPU.
    gradient_checkpointing: BoolOrAuto = AUTO
    # Selective checkpointing: with gradient_checkpointing on, recompute only every N-th decoder
    # layer (1 = all); the others keep their activations. Less recompute for more memory;
    # `clustertune plan` counts both. "auto": with checkpointing on, the largest n the planner fits
    # (the fewest layers recomputed; chosen together with zero.stage: plan.speed_choice); else 1.
    checkpoint_every_n_layers: LayersOrAuto = AUTO
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cuda", "cpu"] = "auto"
    log_every: int = Field(default=1, ge=1)
    deterministic: bool = False
    # torch.compile each decoder layer (regional: one compiled graph reused by every layer; the
    # fused loss head stays outside). Off until it measures faster (benchmarks/RESULTS.md).
    compile: bool = False
    # Profile this (1-based) optimizer step with torch.profiler: RUN_DIR/profile/step_N.txt + trace.
    profile_step: int | None = Field(default=None, ge=1)
    # Record GPU kernels only in that profile (no CPU ops): the host is barely slowed, so the GPU busy
    # share in step_N.txt stays close to the unprofiled step's where recording every CPU op would hold
    # a host-bound step back (benchmarks/RESULTS.md, seventh session: both 90-92% on W1's final step).
    profile_kernels_only: bool = False
    # A step with a non-finite loss or gradient norm changes no weight and is logged; this many in a
    # row stop the run (exit 4), its last complete checkpoint intact (worker/nonfinite.py).
    max_nonfinite_steps: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _length(self) -> "TrainSection":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps and train.epochs")
        # With gradient_checkpointing "auto", n > 1 makes the launcher resolve it to true.
        every = self.checkpoint_every_n_layers
        if every != AUTO and every > 1 and self.gradient_checkpointing is False:
            raise ValueError(f"train.checkpoint_every_n_layers = {self.checkpoint_every_n_layers} needs "
                             "train.gradient_checkpointing = true or \"auto\" (it says which layers to recompute)")
        if self.profile_kernels_only and self.profile_step is None:
            raise ValueError("train.profile_kernels_only = true needs train.profile_step (the step to profile)")
        return self


class ZeroSection(_Section):
    # "auto": the launcher picks it for the GPUs it finds (clustertune.auto): the planner's fastest stage
    # that fits, 1 (with fp32 accumulation, below) before 0 (one GPU only) before 2 and 3; 3 when a
    # ZeRO-3-only key below is set; 2 on the CPU or when the GPU memory is unknown.
    stage: StageOrAuto = AUTO
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket_size: int | None = Field(default=None, ge=1)
    allgather_bucket_size: int | None = Field(default=None, ge=1)
    prefetch_bucket_size: int | None = Field(default=None, ge=1)
    # ZeRO-3: parameters smaller than this stay whole on every rank (no gather per use).
    param_persistence_threshold: int | None = Field(default=None, ge=0)
    # ZeRO-3: the optimizer steps its partition in sub-groups of this many elements; the step
    # holds one sub-group's flattened gradients (bf16 + fp32), so smaller lowers the peak
    # (`clustertune plan` shows it). Default: DeepSpeed's 1e9.
    sub_group_size: int | None = Field(default=None, ge=1)
    overlap_comm: bool = True
    # ZeRO++ (ZeRO-3 only), for slow links between nodes. hpz_partition_size = GPUs per node: each
    # node keeps a second copy of the bf16 weights partitioned over its own GPUs, so the per-layer
    # all-gathers of forward and backward stay inside the node (DeepSpeed zero_hpz_partition_size;
    # costs params * 2 / gpus_per_node bytes per GPU, counted by `clustertune plan`).
    hpz_partition_size: int | None = Field(default=None, ge=1)
    # Weights all-gathered in int8 and gradients reduce-scattered in int4/int8 blocks (CUDA only).
    quantized_weights: bool = False
    quantized_gradients: bool = False
    # The dtype bf16 gradients accumulate in across micro-batches (DeepSpeed data_types.grad_accum_dtype).
    # fp32 is ZeRO-1's: DeepSpeed then runs its BF16_Optimizer (flat fp32 gradient and master buffers,
    # one norm and one fused AdamW instead of per-parameter copies and overflow checks; 4% faster than
    # ZeRO-0 and 5% than ZeRO-1 in bf16 on one H100, +4 B/param of GPU memory). "auto": fp32 with
    # ZeRO-1 without optimizer offload, else bf16 (plan.fp32_grad_accumulation).
    grad_accum_dtype: Literal["auto", "bf16", "fp32"] = AUTO
    # With fp32 accumulation (above): each parameter's bf16 gradient is added into the fp32 buffer as
    # soon as backward produces it and then freed (DeepSpeed bf16.immediate_grad_update), instead of
    # every bf16 gradient living until the end of the step: 2 B/param less GPU memory whenever a step
    # has several micro-batches. False: DeepSpeed's default (copy all of them after each backward).
    immediate_grad_update: bool = True

    # Keys that only ZeRO-3 reads: with stage "auto", setting one makes it 3.
    STAGE3_KEYS: ClassVar[tuple[str, ...]] = (
        "offload_params", "prefetch_bucket_size", "param_persistence_threshold", "sub_group_size", "hpz_partition_size",
        "quantized_weights", "quantized_gradients")

    def stage3_keys_set(self) -> list[str]:
        """The ZeRO-3-only keys this section sets (as `zero.key` names)."""
        # not truthiness: param_persistence_threshold = 0 (persist nothing) is a setting too
        return [f"zero.{key}" for key in self.STAGE3_KEYS if getattr(self, key) is not None
                and getattr(self, key) is not False]

    @model_validator(mode="after")
    def _offload(self) -> "ZeroSection":
        if self.stage not in (3, AUTO):
            for key in self.stage3_keys_set():
                raise ValueError(f"{key} needs zero.stage = 3 or \"auto\" (got stage {self.stage}): it is a "
                                 "ZeRO-3 setting")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("zero.offload_optimizer needs zero.stage >= 1 (got stage 0)")
        if self.grad_accum_dtype == "fp32" and (self.stage not in (1, AUTO) or self.offload_optimizer):
            raise ValueError(f"zero.grad_accum_dtype = \"fp32\" needs zero.stage = 1 without offload_optimizer "
                             f"(got stage {self.stage}{', offload_optimizer' if self.offload_optimizer else ''}): "
                             "only there does DeepSpeed run its fp32-accumulating BF16_Optimizer; leave it \"auto\"")
        return self


def check_zero_topology(zero: ZeroSection, *, world_size: int, gpus_per_node: int) -> None:
    """ZeRO++'s hierarchical partition spans exactly one node: zero.hpz_partition_size must equal
    the GPUs per node (ranks of a node are consecutive) and divide the world size."""
    hpz = zero.hpz_partition_size
    if hpz is None or hpz == 1:
        return
    if hpz != gpus_per_node or world_size % hpz:
        raise RecipeError(f"zero.hpz_partition_size = {hpz}: it must equal the GPUs per node ({gpus_per_node}) "
                          f"and divide the world size ({world_size}), so that each secondary partition is one "
                          f"node's GPUs; set zero.hpz_partition_size = {gpus_per_node}")


class LoraSection(_Section):
    enabled: bool = False
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    merge_on_export: bool = True

    @property
    def wrapped_modules(self) -> tuple[str, ...] | None:
        """The modules LoRA wraps; None without LoRA."""
        return tuple(self.target_modules) if self.enabled else None


class DpoSection(_Section):
    """Direct preference optimization (train.objective = "dpo"): sigmoid loss on
    beta * ((policy - reference) log-prob of chosen - the same of rejected)."""

    beta: float = Field(default=0.1, gt=0)
    # Conservative DPO: the preference label is taken as wrong with this probability.
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)


class GrpoSection(_Section):
    """GRPO (train.objective = "grpo"): group_size completions per prompt (train.global_batch_size
    counts completions: prompts per step = global_batch_size / group_size), rewarded by the sum
    of `rewards` (built-ins exact_match, number_after_marker, format, or "module:function"),
    group-normalized advantages, token-level loss, one update per generation."""

    group_size: int = Field(default=8, ge=2)
    max_new_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    rewards: list[str] = Field(default_factory=lambda: ["exact_match"], min_length=1)
    scale_rewards: bool = True  # divide by the group's reward std (false: only subtract the mean)
    # k3 estimate of KL(policy || reference) per completion token, times this, added to the loss. The
    # reference is the base model under the LoRA adapter (adapter off), so it needs lora.enabled.
    kl_beta: float = Field(default=0.0, ge=0)
    # The rollout's KV cache: "static" allocates it whole once per rollout (what `clustertune plan`
    # counts), "dynamic" grows it token by token (worker/generation.py).
    kv_cache: Literal["static", "dynamic"] = "static"


class CheckpointSection(_Section):
    every_steps: int = Field(default=0, ge=0)  # 0: only the final export
    keep_last: int = Field(default=2, ge=1)
    keep_best: bool = False


class EvalSection(_Section):
    every_steps: int = Field(default=0, ge=0)  # 0: only at the end (if an eval set exists)
    generate_samples: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=64, ge=1)


class RunSection(_Section):
    name: str = "run"
    output_dir: str = "runs/run"
    # Variables (names only) forwarded to every worker besides the built-in allow-list.
    env_passthrough: list[str] = Field(default_factory=list)
    # Fault handling. A collective (all-reduce, barrier) that waits longer than this fails the rank
    # (torch.distributed timeout), so a dead peer never blocks the others forever.
    collective_timeout_s: int = Field(default=600, ge=5)
    # Hang detection (clustertune.watchdog): every rank reports a heartbeat with its step to the
    # launcher; a rank silent, or no step progress, for this long stops the whole run. 0: off.
    stall_timeout_s: int = Field(default=900, ge=0)

    @model_validator(mode="after")
    def _stall(self) -> "RunSection":
        if 0 < self.stall_timeout_s < 5:
            raise ValueError(f"run.stall_timeout_s must be 0 (off) or >= 5 seconds (got {self.stall_timeout_s})")
        return self


class Recipe(_Section):
    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    train: TrainSection = Field(default_factory=lambda: TrainSection(max_steps=100))
    zero: ZeroSection = Field(default_factory=ZeroSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    dpo: DpoSection = Field(default_factory=DpoSection)
    grpo: GrpoSection = Field(default_factory=GrpoSection)

    @model_validator(mode="after")
    def _combinations(self) -> "Recipe":
        if self.lora.enabled and self.zero.offload_params:
            raise ValueError("lora.enabled with zero.offload_params is not supported: LoRA trains few "
                             "parameters, use zero.stage = 2 or 3 without parameter offload")
        tokens = self.train.micro_batch_tokens
        if self.data.packing and tokens != AUTO:  # "auto" resolves to at least the shortest row
            shortest, why = self.shortest_packed_row()
            if tokens < shortest:
                raise ValueError(f"train.micro_batch_tokens ({tokens}) must be >= {why} when data.packing is on; "
                                 f"raise it, set it to \"auto\", or set data.packing = false")
        if self.train.objective == "grpo":
            self._check_grpo()
        if self.data.eval_files and self.data.eval_fraction:
            raise ValueError("set data.eval_files or data.eval_fraction, not both")
        if self.checkpoint.keep_best:
            self._check_keep_best()
        return self

    def _check_grpo(self) -> None:
        group, batch = self.grpo.group_size, self.train.global_batch_size
        if batch % group:
            raise ValueError(f"train.global_batch_size ({batch}) must be a multiple of grpo.group_size ({group}): "
                             "it counts completions, group_size of them per prompt")
        if self.checkpoint.keep_best:
            raise ValueError("checkpoint.keep_best ranks checkpoints by eval loss, which train.objective = \"grpo\" "
                             "has not (its eval is the reward of greedy completions); set checkpoint.keep_best = false")
        if self.grpo.kl_beta > 0 and not self.lora.enabled:
            raise ValueError("grpo.kl_beta > 0 needs lora.enabled: the reference is the model with the adapter "
                             "switched off (no second model is loaded); set lora.enabled = true or grpo.kl_beta = 0")

    def shortest_packed_row(self) -> tuple[int, str]:
        """The fewest tokens one packed row must hold, and the reason as a message fragment: the
        longest sample; for DPO a pair (chosen and rejected share a row); for GRPO a prompt and its
        completion."""
        length = self.data.max_length
        if self.train.objective == "dpo":
            return 2 * length, (f"2 x data.max_length ({2 * length}) for train.objective = \"dpo\": a pair's chosen "
                                "and rejected sequences are packed into the same row")
        if self.train.objective == "grpo":
            longest = length + self.grpo.max_new_tokens
            return longest, (f"data.max_length + grpo.max_new_tokens ({longest}) for train.objective = \"grpo\": a "
                             "prompt and its completion share one row")
        return length, f"data.max_length ({length}), or the longest sample cannot fit"

    def _check_keep_best(self) -> None:
        every_ckpt, every_eval = self.checkpoint.every_steps, self.eval.every_steps
        if not (self.data.eval_files or self.data.eval_fraction):
            raise ValueError("checkpoint.keep_best needs an eval set: set data.eval_files or data.eval_fraction")
        if not every_ckpt:
            raise ValueError("checkpoint.keep_best needs checkpoints: set checkpoint.every_steps (got 0)")
        if every_eval % every_ckpt:
            # The best checkpoint is the one saved at the best eval step, so each eval step must save one.
            raise ValueError(f"checkpoint.keep_best needs a checkpoint at every eval step: eval.every_steps "
                             f"({every_eval}) must be a multiple of checkpoint.every_steps ({every_ckpt})")

    def to_toml_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json(exclude_none=True))


# --------------------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value); the value is read as a TOML literal
    (numbers, booleans, arrays, quoted strings), anything else is taken as a bare string."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise RecipeError(f"--set {text!r}: empty key component")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def format_validation_error(err: ValidationError, source: str, what: str = "recipe",
                            overrides: list[str] | tuple[str, ...] = ()) -> str:
    """One user-facing message for all of a pydantic error's items: `file: invalid what` and a
    line per key path (`nodes[1].slots: ...`), with the offending value where it helps.

    A key set by a `--set` override is blamed on the override, not on the file: its line says
    `(from --set train.lr=abc)`, and when every problem comes from overrides the first line
    names them instead of the file."""
    set_paths = [(tuple(parse_override(text)[0]), text) for text in overrides]
    lines: list[str] = []
    all_from_overrides = True
    for item in err.errors():
        path = tuple(str(p) for p in item["loc"])
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key (typo?)"
        got = item.get("input")
        show = item["type"] not in ("extra_forbidden", "missing") and not isinstance(got, (dict, list))
        suffix = f" (got {got!r})" if show and repr(got) not in msg else ""
        setting = next((text for p, text in set_paths if path[:len(p)] == p
                        # an unknown section named by --set: the override created it
                        or (item["type"] == "extra_forbidden" and p[:len(path)] == path)), None)
        if setting is not None:
            suffix += f" (from --set {setting})"
        else:
            all_from_overrides = False
            # A section-level check (e.g. train.max_steps vs train.epochs) an override took part in.
            involved = [text for p, text in set_paths if path and p[:len(path)] == path]
            suffix += "".join(f" (with --set {text})" for text in involved)
        lines.append(f"  {loc}: {msg}{suffix}" if loc else f"  {msg}{suffix}")
    if set_paths and all_from_overrides:
        head = f"invalid --set value{'s' if len(lines) > 1 else ''} for {source}"
    else:
        head = f"{source}: invalid {what}"
    return "\n".join([head, *lines])


def recipe_from_dict(tree: dict[str, Any], source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """Validate a recipe tree; `overrides` (the `--set` texts already applied to it) are named in
    the error for the keys they set."""
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, source, overrides=overrides or ())) from None


def read_toml_file(path: Path, error: type[UserError], missing: str) -> dict[str, Any]:
    """A TOML file as a dict, or `error` with a message naming the file (missing, not UTF-8,
    not TOML) instead of a traceback. Shared by recipes and cluster files."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory; give the TOML file itself") from None
    except PermissionError:
        raise error(f"{path}: permission denied (cannot read the file)") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})") from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load a TOML recipe (None: the built-in demo recipe) and apply `--set` overrides."""
    if path is None:
        from clustertune.demo import demo_recipe_dict
        tree, source = demo_recipe_dict(), "<demo recipe>"
    else:
        source = str(path)
        tree = read_toml_file(Path(path), RecipeError, "recipe file not found")
    tree = apply_overrides(tree, overrides or [])
    return recipe_from_dict(tree, source, overrides)


DEFAULT_MAX_STEPS = 100  # a recipe-less run's length unless --set gives train.max_steps or train.epochs


def default_recipe(overrides: list[str] | None = None) -> Recipe:
    """The defaults of the sections above plus `--set` overrides: what `clustertune train` runs
    without a recipe file. train.device "auto" uses the GPUs when present, train.max_steps is
    DEFAULT_MAX_STEPS unless train.max_steps or train.epochs is set; data.train_files has no
    default and must be set."""
    tree = apply_overrides({}, overrides or [])
    train = tree.setdefault("train", {})
    if isinstance(train, dict) and "max_steps" not in train and "epochs" not in train:
        train["max_steps"] = DEFAULT_MAX_STEPS
    return recipe_from_dict(tree, "the recipe defaults", overrides)


def tokenized_cache_dir(data: DataSection, *, run_dir: Path) -> Path:
    """Where tokenized data is cached: data.cache_dir, else <run.output_dir>/../.cache/tokenized
    (shared by the runs beside it). The workers and `validate` use the same cache."""
    if data.cache_dir:
        return Path(data.cache_dir)
    return Path(run_dir).parent / ".cache" / "tokenized"


def recipe_to_toml(recipe: Recipe) -> str:
    """Render the resolved recipe as TOML (flat tables; values are scalars or flat lists)."""
    out: list[str] = []
    for section, values in recipe.to_toml_dict().items():
        out.append(f"[{section}]")
        for key, value in values.items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. a weighted data.train_files entry
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot render {value!r} as TOML")
