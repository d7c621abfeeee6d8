"""Memory of GRPO's rollout phase (train.objective = "grpo"): does generation fit beside the
training engine, and, with LoRA, on which GPUs a base model fits whole.

    clustertune plan configs/r1-distill-32b-grpo-lora.toml --gpu h100 --nodes 1 --gpus-per-node 8   # rollout section + check
    clustertune plan configs/r1-distill-32b-grpo-lora.toml --lora-fit deepseek-r1-distill-qwen-32b --gpus-per-node 8

    from clustertune.plan_generation import RolloutSpec, rollout_memory
    spec = RolloutSpec(prompts_per_step=8, group_size=8, prompt_tokens=512, max_new_tokens=1024)
    rollout_memory(plan_input, Option(3, False, False, True), spec).total   # GiB per GPU

Pure arithmetic on top of plan.py (no torch, no I/O); plan_cli.py renders it. Units as plan.py:
bytes inside, GiB in every result.

During a rollout (worker/generation.py) each GPU holds:
  * what the engine keeps between steps anyway: its params (ZeRO-3: the partition), optimizer
    states, gradient partition (stage 1/2: unless it lives in backward only) and stage 3's
    buckets -- plan.gpu_memory's model states, the same figures as the training table;
  * the whole model's weights, gathered once per rollout under ZeRO-3 (DeepSpeed's
    unwrap_model_for_generation: new full tensors beside the partitions) -- none at stage 1/2,
    whose weights are whole on every GPU anyway (so with LoRA at stage 1/2: no gather), and none
    for ZeRO-3 on one GPU without param offload (a gathered param is a view of its partition);
  * the KV cache, allocated whole up front (static cache, `grpo.kv_cache = "static"`): sequences
    x (prompt + max_new_tokens) x layers x 2 (k, v) x num_key_value_heads x head_dim x element
    bytes; the batch is left-padded to its longest prompt, planned as data.max_length;
  * the prefill's working set: one decoder layer's temporaries over every prompt token of the
    batch (no grad, so a layer's are freed before the next): hidden in and out (2h) and the MLP's
    gate, up and their product (3i), in the activation dtype;
  * one decoding step's logits: generate keeps only the last position's (logits_to_keep=1), as
    bf16 logits (2 B) and their fp32 copy, processed scores and softmax probabilities (4 + 4 + 4),
    rounded up to 16 B per sequence per vocabulary entry for top-p's sort;
  * the CUDA context / NCCL buffers, and the allocator's slack (ROLLOUT_SLACK) on the KV
    cache and the prefill/decoding temporaries.
Training activations are not alive during the rollout (it runs between optimizer steps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clustertune.errors import UserError
from clustertune.plan import (CUDA_CONTEXT_GIB, GIB, MAX_WORLD_SEARCHED, NCCL_BUFFERS_GIB,
                              Option, Plan, PlanInput, all_options, gpu_memory, plan, trainable_parameters)
from clustertune.shapes import Shape

# The rollout's memory (gathered weights, KV cache, prefill) has not been measured at the edge of a card,
# unlike the training step's (plan.DEFAULT_SAFETY_MARGIN): it keeps the planner's former margins, 10% of
# the card and 10% slack on what it allocates per rollout.
ROLLOUT_SAFETY_MARGIN = 0.10
ROLLOUT_SLACK = 0.10

# Per sequence per vocabulary entry, one decoding step: bf16 logits + fp32 copy + scores + probs, and top-p's sort.
DECODE_BYTES_PER_LOGIT = 16


class GenerationMemoryError(UserError):
    """A GRPO set-up whose rollout cannot fit the GPUs; the message has the numbers and the fixes."""


@dataclass(frozen=True)
class RolloutSpec:
    """One rollout of a step: prompts_per_step prompts (global_batch_size / group_size), spread
    over the ranks, group_size completions each."""

    prompts_per_step: int
    group_size: int
    prompt_tokens: int  # the longest prompt (data.max_length): the batch is left-padded to it
    max_new_tokens: int

    @property
    def cache_tokens(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    def prompts_per_rank(self, world_size: int) -> int:
        # GroupRelativePolicyOptimization.rollout: prompt_indices[rank::world_size]
        return -(-self.prompts_per_step // world_size)

    def sequences_per_rank(self, world_size: int) -> int:
        return self.prompts_per_rank(world_size) * self.group_size


def rollout_spec(*, global_batch_size: int, group_size: int, max_length: int, max_new_tokens: int) -> RolloutSpec:
    """From the recipe: train.global_batch_size, grpo.group_size, data.max_length, grpo.max_new_tokens."""
    return RolloutSpec(global_batch_size // group_size, group_size, max_length, max_new_tokens)


def kv_cache_bytes(shape: Shape, *, sequences: int, cache_tokens: int, element_bytes: int) -> int:
    return sequences * cache_tokens * shape.num_hidden_layers * 2 * shape.num_key_value_heads * shape.head_dim \
        * element_bytes


def prefill_bytes(shape: Shape, *, sequences: int, prompt_tokens: int, element_bytes: int) -> int:
    return sequences * prompt_tokens * element_bytes * (2 * shape.hidden_size + 3 * shape.intermediate_size)


def decode_logits_bytes(shape: Shape, *, sequences: int) -> int:
    return sequences * shape.vocab_size * DECODE_BYTES_PER_LOGIT


def gathers_whole_model(inp: PlanInput, option: Option) -> bool:
    """ZeRO-3 materializes every full parameter for the rollout, except on one GPU with the
    partition on it (then the gathered param is a view of it)."""
    return option.stage == 3 and (inp.world_size > 1 or option.offload_params)


@dataclass(frozen=True)
class RolloutMemory:
    """GiB per GPU during the rollout."""

    engine_states: float  # what the engine keeps between steps (params/partition, optimizer, grads, buckets)
    gathered_weights: float  # the whole model, gathered once per rollout (ZeRO-3)
    kv_cache: float
    prefill: float
    logits: float
    runtime: float
    fragmentation: float
    sequences: int  # completions generated at once on this GPU

    @property
    def generation(self) -> float:
        """What generating adds to the engine's states (before runtime and slack)."""
        return self.gathered_weights + self.kv_cache + max(self.prefill, self.logits)

    @property
    def total(self) -> float:
        # The prefill's temporaries are gone before the first decoding step's logits exist.
        return self.engine_states + self.generation + self.runtime + self.fragmentation


def rollout_memory(inp: PlanInput, option: Option, spec: RolloutSpec) -> RolloutMemory:
    train = gpu_memory(inp, option)
    grads = 0.0 if train.grads_in_backward_only else train.grads
    buckets = 0.0 if train.buckets_in_backward_only else train.comm_buckets
    engine_states = train.params + train.optimizer + grads + buckets  # GiB already
    b = inp.bytes
    sequences = spec.sequences_per_rank(inp.world_size)
    gathered = b.param * inp.shape.parameter_count() if gathers_whole_model(inp, option) else 0
    kv = kv_cache_bytes(inp.shape, sequences=sequences, cache_tokens=spec.cache_tokens, element_bytes=b.activation)
    prefill = prefill_bytes(inp.shape, sequences=sequences, prompt_tokens=spec.prompt_tokens,
                            element_bytes=b.activation)
    logits = decode_logits_bytes(inp.shape, sequences=sequences)
    runtime = CUDA_CONTEXT_GIB + (NCCL_BUFFERS_GIB if inp.world_size > 1 else 0.0)
    # Slack on what a rollout allocates and frees; the gathered weights, like the model states,
    # are large tensors allocated once per rollout, so none on them (plan.py's rule).
    frag = max(inp.allocator_slack, ROLLOUT_SLACK) * (kv + max(prefill, logits))
    return RolloutMemory(engine_states=engine_states, gathered_weights=gathered / GIB, kv_cache=kv / GIB,
                         prefill=prefill / GIB, logits=logits / GIB, runtime=runtime, fragmentation=frag / GIB,
                         sequences=sequences)


def rollout_margin(inp: PlanInput) -> float:
    return max(inp.safety_margin, ROLLOUT_SAFETY_MARGIN)


def gpu_budget(inp: PlanInput) -> float:
    return inp.gpu_mem_gib * (1 - rollout_margin(inp))


def fits(inp: PlanInput, mem: RolloutMemory) -> bool:
    return mem.total <= gpu_budget(inp)


def _largest(fits_at, upper: int) -> int:
    """Largest n in [0, upper] with fits_at(n) (monotone: true up to some n); 0 when none."""
    if not fits_at(1):
        return 0
    lo, hi = 1, upper
    if fits_at(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid)
    return lo


def max_prompts_per_rank(inp: PlanInput, option: Option, spec: RolloutSpec, limit: int = 1 << 16) -> int:
    """Most prompts (of group_size completions each) one GPU can generate for at once."""
    def fits_at(prompts: int) -> bool:
        one_rank = dataclasses.replace(spec, prompts_per_step=prompts * inp.world_size)
        return fits(inp, rollout_memory(inp, option, one_rank))
    return _largest(fits_at, limit)


def max_new_tokens(inp: PlanInput, option: Option, spec: RolloutSpec, limit: int = 1 << 20) -> int:
    """Largest grpo.max_new_tokens whose rollout fits, the rest of the set-up unchanged."""
    return _largest(lambda n: fits(inp, rollout_memory(inp, option, dataclasses.replace(spec, max_new_tokens=n))),
                    limit)


# ---------------------------------------------------------------------------- the GRPO plan

@dataclass(frozen=True)
class GrpoPlan:
    """plan.Plan with each option's rollout; `plan` counts an option as fitting the GPU only when
    both its training step and its rollout do (so its recommendation, table and --write hold)."""

    plan: Plan
    training: Plan  # the training step alone, as plan.plan() made it
    spec: RolloutSpec
    rollouts: dict[Option, RolloutMemory]

    @property
    def recommended_rollout(self) -> RolloutMemory | None:
        best = self.plan.recommended
        return None if best is None else self.rollouts[best.option]


def with_rollout(training: Plan, spec: RolloutSpec) -> GrpoPlan:
    inp = training.input
    rollouts = {e.option: rollout_memory(inp, e.option, spec) for e in training.estimates}
    estimates = [dataclasses.replace(e, fits_gpu=e.fits_gpu and fits(inp, rollouts[e.option]))
                 for e in training.estimates]
    return GrpoPlan(plan=dataclasses.replace(training, estimates=estimates), training=training, spec=spec,
                    rollouts=rollouts)


def smallest_rollout_world(inp: PlanInput, spec: RolloutSpec) -> int | None:
    """The smallest world size above the job's (same GPUs per node) at which some option fits
    both its training step and its rollout; None up to MAX_WORLD_SEARCHED."""
    per_node = inp.gpus_per_node
    candidates = sorted({w for w in [1, 2, 4, per_node] + [per_node * k for k in range(2, MAX_WORLD_SEARCHED // per_node + 1)]
                         if inp.world_size < w <= MAX_WORLD_SEARCHED and (w <= per_node or w % per_node == 0)})
    for world in candidates:
        bigger = dataclasses.replace(inp, world_size=world)
        for option in all_options(lora=inp.lora_rank is not None):
            if gpu_memory(bigger, option).total <= gpu_budget(bigger) and fits(bigger, rollout_memory(bigger, option, spec)):
                return world
    return None


def check_rollout_fits(grpo: GrpoPlan) -> None:
    """GenerationMemoryError when some option fits the training step but none of those fits its
    rollout: the leanest rollout's numbers and what would make it fit. (When no option fits the
    training step either, the plan's own 'nothing fits' answer stands.)"""
    if grpo.plan.recommended is not None:
        return
    trainable = [e for e in grpo.training.estimates if e.fits]
    if not trainable:
        return
    inp, spec = grpo.plan.input, grpo.spec
    leanest = min(trainable, key=lambda e: grpo.rollouts[e.option].total)
    option, mem = leanest.option, grpo.rollouts[leanest.option]
    raise GenerationMemoryError(rollout_failure_message(inp, option, mem, spec))


def rollout_failure_message(inp: PlanInput, option: Option, mem: RolloutMemory, spec: RolloutSpec) -> str:
    s, b = inp.shape, inp.bytes
    world, budget = inp.world_size, gpu_budget(inp)
    prompts = spec.prompts_per_rank(world)
    head = (f"the GRPO rollout does not fit: during generation each GPU holds {mem.total:.1f} GiB with "
            f"{option.label} (the leanest rollout of the options whose training step fits), over the "
            f"{budget:.1f} GiB budget ({inp.gpu_mem_gib:.1f} GiB less the {rollout_margin(inp):.0%} margin) = "
            f"engine states {mem.engine_states:.1f} + gathered {inp.precision} weights {mem.gathered_weights:.1f} + "
            f"KV cache {mem.kv_cache:.1f} ({mem.sequences} completions x ({spec.prompt_tokens} prompt + "
            f"{spec.max_new_tokens} new tokens) x {s.num_hidden_layers} layers x 2 x {s.num_key_value_heads} KV heads "
            f"x {s.head_dim} x {b.activation} B) + prefill/logits {max(mem.prefill, mem.logits):.1f} + CUDA runtime "
            f"and allocator slack {mem.runtime + mem.fragmentation:.1f}")
    fixes = []
    most = max_prompts_per_rank(inp, option, spec)
    if most:
        fixes.append(f"fewer completions per GPU: at most {most} prompts x grpo.group_size {spec.group_size} = "
                     f"{most * spec.group_size} fit (now {prompts} x {spec.group_size} = {mem.sequences}: "
                     f"train.global_batch_size = {most * spec.group_size * world} on {world} GPUs, or more GPUs)")
    else:
        fixes.append(f"fewer completions per GPU will not do alone: even one prompt's {spec.group_size} completions "
                     f"do not fit at these lengths")
    longest = max_new_tokens(inp, option, spec)
    if longest:
        fixes.append(f"a shorter grpo.max_new_tokens: at most {longest} fits (now {spec.max_new_tokens})")
    else:
        fixes.append(f"a shorter grpo.max_new_tokens will not do alone: the {mem.sequences} prompts of "
                     f"{spec.prompt_tokens} tokens (data.max_length) do not fit with even one new token")
    if inp.lora_rank is None:
        lora = with_rollout(plan(dataclasses.replace(inp, lora_rank=16)), spec)
        best = lora.plan.recommended
        if best is not None:
            fixes.append(f"LoRA (lora.enabled = true, r=16): {best.option.label} fits, {best.gpu.total:.1f} GiB per GPU "
                         f"training and {lora.rollouts[best.option].total:.1f} GiB in the rollout")
        else:
            fixes.append("LoRA (lora.enabled = true) would not fit this rollout either")
    world_fit = smallest_rollout_world(inp, spec)
    if world_fit is not None:
        fixes.append(f"more GPUs: {world_fit} GPUs of this size would fit both the training step and the rollout "
                     f"(now {world}; fewer completions per GPU and smaller ZeRO partitions)")
    elif mem.gathered_weights:
        fixes.append(f"more GPUs do not help here: the gathered weights alone ({mem.gathered_weights:.1f} GiB) are "
                     "on every GPU whatever their number; GPUs with more memory do")
    else:
        fixes.append(f"more GPUs do not help here (none up to {MAX_WORLD_SEARCHED} fits); GPUs with more memory do")
    return head + ". Fix it with " + "; or ".join(fixes) + "."


# ---------------------------------------------------------------------------- LoRA: base whole on each GPU

# The cards the --lora-fit table shows (clustertune.gpus names): the common training GPUs.
LORA_FIT_GPUS = ("h100", "a100", "h20", "h200")
# The leanest set-up that keeps the frozen base whole on every GPU: ZeRO-2 (LoRA's few trainable
# parameters partitioned), gradient checkpointing on.
WHOLE_BASE_OPTION = Option(2, False, False, True)


@dataclass(frozen=True)
class LoraFit:
    gpu: str
    gpu_mem_gib: float
    base: float  # GiB: the frozen base weights, whole
    adapter_states: float  # GiB: LoRA adapters + their gradients + optimizer states
    training_peak: float  # GiB: the training step's total (plan.gpu_memory)
    rollout: RolloutMemory | None  # None: not a GRPO recipe
    max_prompts: int | None  # GRPO: most prompts per GPU (group_size completions each) that fit

    @property
    def peak(self) -> float:
        return max(self.training_peak, self.rollout.total if self.rollout else 0.0)

    def fits(self, safety_margin: float) -> bool:
        return self.peak <= self.gpu_mem_gib * (1 - safety_margin)


def lora_fit_table(inp: PlanInput, spec: RolloutSpec | None, gpus: dict[str, float]) -> list[LoraFit]:
    """For each GPU (name -> GiB): does the LoRA set-up of `inp` (lora_rank set) fit with its base
    whole on the GPU (WHOLE_BASE_OPTION), for the training step and, with `spec`, the rollout."""
    if inp.lora_rank is None:
        raise ValueError("lora_fit_table needs inp.lora_rank")
    adapter = inp.bytes.param * trainable_parameters(inp.shape, inp.lora_rank, inp.lora_targets) / GIB
    rows = []
    for name, mem_gib in gpus.items():
        on_gpu = dataclasses.replace(inp, gpu_mem_gib=mem_gib)
        train = gpu_memory(on_gpu, WHOLE_BASE_OPTION)
        rollout = rollout_memory(on_gpu, WHOLE_BASE_OPTION, spec) if spec is not None else None
        most = max_prompts_per_rank(on_gpu, WHOLE_BASE_OPTION, spec) if spec is not None else None
        rows.append(LoraFit(gpu=name, gpu_mem_gib=mem_gib, base=train.params,
                            adapter_states=adapter + train.grads + train.optimizer,
                            training_peak=train.total, rollout=rollout, max_prompts=most))
    return rows
