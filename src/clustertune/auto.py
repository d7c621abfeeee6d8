"""What "auto" in zero.stage, train.micro_batch_tokens, train.gradient_checkpointing and
train.checkpoint_every_n_layers (their defaults) becomes: decided once, on the launcher side, before
any rank starts; the ranks get the concrete values in RUN/launch/recipe.toml (a worker refuses
"auto") and every later --resume of the run reuses them.

    clustertune train RECIPE      # prints e.g. "auto: zero.stage = 1, train.micro_batch_tokens = 32,768,
                                  #   train.gradient_checkpointing = true, train.checkpoint_every_n_layers = 2
                                  #   (planner: ZeRO-1 + ckpt ...)"
    clustertune plan RECIPE --gpu-mem 80   # the same line for a GPU of 80 GiB, then the plan

The rule, from benchmarks/RESULTS.md (W1, Qwen2.5-1.5B shape, one H100): packed rows as large as
the GPU allows up to 32k tokens (one 32k row ran 35% faster than two 16k rows), with checkpointing
when the rows need it (32k rows with checkpointing: 32,597 tokens/s; without it only 16k rows fit:
27,878). So the planner (plan.speed_choice, the choice `clustertune plan` recommends) plans 32k-token
rows and takes the fastest option that fits them among those the recipe leaves open (its explicit
keys are never changed; zero.offload_* are never turned on here), and the largest row that option
fits:
  * zero.stage "auto": the planner's fastest fitting stage: ZeRO-1 (in bf16 with fp32 gradient
    accumulation, zero.grad_accum_dtype "auto": DeepSpeed's BF16_Optimizer, +4.2% over ZeRO-0 on W1),
    then ZeRO-0 (offered on one rank only), ZeRO-2, ZeRO-3 (plan.Option.speed_key). zero.grad_accum_dtype
    = "fp32" keeps it at 1. A ZeRO-3-only key in the
    recipe (zero.offload_params, param_persistence_threshold, hpz_partition_size, quantized_* ...)
    makes it 3; zero.offload_optimizer leaves stages 1 to 3 open.
  * train.checkpoint_every_n_layers "auto": with checkpointing on, the largest n that still fits the
    rows (the fewest layers recomputed), else 1. Stage and n are chosen together (plan.speed_choice,
    plan.step_cost_share): on one H100, W3 (8 layers of 7B width) resolves to ZeRO-0 without recompute,
    35.6k tokens/s (54.6% MFU) through `clustertune train` (session 8), where ZeRO-1's larger states
    need half the layers recomputed (32.1k).

Where the planner cannot run:
  * CPU (train.device = "cpu", no GPU, a cpu cluster): the former defaults, ZeRO-2, 8192 tokens and
    no checkpointing (speed on the CPU is not what these keys are for).
  * GPU memory unknown (a cluster launched with --skip-doctor or through slurm, an unknown card) or
    a model whose size is unknown here: ZeRO-2 (3 with a ZeRO-3-only key), 8192 tokens with
    checkpointing of every layer, the least memory of the former defaults, and a note saying how to
    get the planner's values.
A resumed run takes the values its first launch wrote into RUN/launch/recipe.toml. Explicit values
in a recipe are never changed.

Launcher side: never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clustertune.config import AUTO, Recipe, RecipeError, load_recipe, recipe_from_dict

# CPU: the values these keys had before "auto" (speed on the CPU is not what they are for).
CPU_ZERO_STAGE = 2
CPU_MICRO_BATCH_TOKENS = 8192
CPU_GRADIENT_CHECKPOINTING = False
# GPU memory unknown: the former default stage and row, with checkpointing (the least activation memory).
UNKNOWN_GPU_ZERO_STAGE = 2
UNKNOWN_GPU_MICRO_BATCH_TOKENS = 8192
UNKNOWN_GPU_GRADIENT_CHECKPOINTING = True
# Every layer recomputed: the least memory, and all a recipe gets where nothing is planned.
UNPLANNED_CHECKPOINT_EVERY_N_LAYERS = 1
# The "auto" keys, as (section, key), in the order the line names them.
AUTO_KEYS = (("zero", "stage"), ("train", "micro_batch_tokens"), ("train", "gradient_checkpointing"),
             ("train", "checkpoint_every_n_layers"))


def auto_keys(recipe: Recipe) -> list[str]:
    """The keys still "auto", as `section.key` names."""
    return [f"{section}.{key}" for section, key in AUTO_KEYS if getattr(getattr(recipe, section), key) == AUTO]


@dataclass(frozen=True)
class AutoResolution:
    recipe: Recipe  # with every "auto" key replaced by a value
    note: str | None  # the one line that says what "auto" became and why; None: nothing was "auto"


def _with_values(recipe: Recipe, values: dict[str, object], why: str) -> AutoResolution:
    """The recipe with its "auto" keys set from `values` ("section.key" -> value; a key given
    explicitly keeps its value) and the line naming each one set."""
    train, values = recipe.train, dict(values)
    if train.gradient_checkpointing == AUTO and train.checkpoint_every_n_layers not in (AUTO, 1):
        values["train.gradient_checkpointing"] = True  # n > 1 says which layers to recompute
    checkpointing = (values["train.gradient_checkpointing"] if train.gradient_checkpointing == AUTO
                     else train.gradient_checkpointing)
    if not checkpointing:
        values["train.checkpoint_every_n_layers"] = 1  # nothing is recomputed: every layer keeps its activations
    updates: dict[str, dict[str, object]] = {"zero": {}, "train": {}}
    for name in auto_keys(recipe):
        section, key = name.split(".")
        updates[section][key] = values[name]
    said = ", ".join(f"{section}.{key} = {_literal(value)}" for section, changed in updates.items()
                     for key, value in changed.items())
    copied = recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=changed)
                                       for section, changed in updates.items()})
    # Validated again as a whole: the combination checks (rows >= the shortest row, ZeRO-3-only keys) hold.
    resolved = recipe_from_dict(copied.to_toml_dict(), "the recipe with \"auto\" resolved")
    return AutoResolution(resolved, f"auto: {said} ({why})")


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _unplanned_stage(recipe: Recipe, default: int) -> int:
    """zero.stage "auto" where nothing is planned: `default`, or 3 when a ZeRO-3-only key is set,
    1 with zero.grad_accum_dtype = "fp32" (ZeRO-1's only)."""
    if recipe.zero.grad_accum_dtype == "fp32":
        return 1
    return 3 if recipe.zero.stage3_keys_set() else default


def resolve_auto(recipe: Recipe, *, on_gpu: bool, gpu_mem_gib: float | None, gpu_source: str, nodes: int,
                 gpus_per_node: int, started_with: Recipe | None = None) -> AutoResolution:
    """The recipe with its "auto" keys (AUTO_KEYS) resolved for this launch: `nodes` x `gpus_per_node`
    ranks on GPUs of `gpu_mem_gib` GiB (None: unknown; `gpu_source` says where the figure came from),
    or the CPU (`on_gpu` False). `started_with`: the recipe the run was first launched with
    (--resume, RUN/launch/recipe.toml): its values are taken as they are.
    Pure but for reading model.path's config.json (a local model directory)."""
    if not auto_keys(recipe):
        return AutoResolution(recipe, None)
    shortest = recipe.shortest_packed_row()[0]
    if started_with is not None and not auto_keys(started_with):
        previous = {f"{section}.{key}": getattr(getattr(started_with, section), key) for section, key in AUTO_KEYS}
        return _with_values(recipe, previous,
                            "--resume: as the run's previous launch resolved them, RUN/launch/recipe.toml")
    unplanned = {"zero.stage": _unplanned_stage(recipe, UNKNOWN_GPU_ZERO_STAGE),
                 "train.micro_batch_tokens": max(UNKNOWN_GPU_MICRO_BATCH_TOKENS, shortest),
                 "train.gradient_checkpointing": UNKNOWN_GPU_GRADIENT_CHECKPOINTING,
                 "train.checkpoint_every_n_layers": UNPLANNED_CHECKPOINT_EVERY_N_LAYERS}
    if not on_gpu:
        cpu = {"zero.stage": _unplanned_stage(recipe, CPU_ZERO_STAGE),
               "train.micro_batch_tokens": max(CPU_MICRO_BATCH_TOKENS, shortest),
               "train.gradient_checkpointing": CPU_GRADIENT_CHECKPOINTING}
        return _with_values(recipe, {**unplanned, **cpu},
                            "CPU: the former defaults; the planner is for GPUs")
    if gpu_mem_gib is None:
        return _with_values(recipe, unplanned,
                            f"GPU memory unknown ({gpu_source}): the conservative values; for the planner's, "
                            f"run `clustertune plan RECIPE --gpu-mem GiB --write` or launch with the doctor")
    return _planned(recipe, gpu_mem_gib=gpu_mem_gib, gpu_source=gpu_source, nodes=nodes,
                    gpus_per_node=gpus_per_node, unplanned=unplanned)


def _planned(recipe: Recipe, *, gpu_mem_gib: float, gpu_source: str, nodes: int, gpus_per_node: int,
             unplanned: dict[str, object]) -> AutoResolution:
    """The planner's choice among the options the recipe leaves open (the stages and checkpointing
    that are "auto", the recipe's own offload)."""
    from clustertune import plan_generation
    from clustertune.plan import plan, speed_choice
    from clustertune.plan_cli import Job, grpo_rollout_spec, launch_expandable_segments, plan_input, resolve_shape
    try:
        shape, _ = resolve_shape(recipe.model.path, recipe.model.num_layers)
    except RecipeError as err:  # a model only on the nodes, under a name that is no built-in shape
        return _with_values(recipe, unplanned,
                            f"model size unknown here ({str(err).splitlines()[0]}): the conservative values; "
                            "run `clustertune plan` with model.path set to a built-in shape for the planner's")
    train, zero = recipe.train, recipe.zero
    if zero.stage != AUTO:
        stages = {zero.stage}
    elif zero.stage3_keys_set():
        stages = {3}
    elif zero.grad_accum_dtype == "fp32":  # only ZeRO-1 accumulates in fp32 (config validation)
        stages = {1}
    else:  # ZeRO-0 is among the planner's options on one rank only (plan.all_options)
        stages = {0, 1, 2, 3}
    if zero.stage == 0:  # ZeRO-0 keeps every state whole on each rank: one rank's memory, planned as such
        nodes, gpus_per_node = 1, 1
    job = Job(gpu_mem_gib, gpu_source, nodes, gpus_per_node, "this launch", None, "not checked",
              expandable_segments=launch_expandable_segments())
    every = train.checkpoint_every_n_layers
    if train.gradient_checkpointing != AUTO:
        checkpointing = {train.gradient_checkpointing}
    else:
        checkpointing = {True} if every not in (AUTO, 1) else {True, False}

    def allowed(option) -> bool:
        return (option.stage in stages and option.offload_optimizer == zero.offload_optimizer
                and option.offload_params == zero.offload_params and option.gradient_checkpointing in checkpointing)

    inp = plan_input(recipe, shape, job)  # rows of plan_cli.tokens_per_micro_batch: 32k for "auto"
    result = plan(inp)
    if train.objective == "grpo":  # an option fits only when its rollout fits too
        result = plan_generation.with_rollout(result, grpo_rollout_spec(recipe)).plan
    explicit_row = train.micro_batch_tokens if recipe.data.packing and train.micro_batch_tokens != AUTO else None
    choice = speed_choice(result, shortest_row=recipe.shortest_packed_row()[0], packing=recipe.data.packing,
                          allowed=allowed, choose_every_n=every == AUTO, fixed_row=explicit_row)
    where = f"{gpu_mem_gib:.1f} GiB GPUs [{gpu_source}], {job.world_size} rank(s)"
    if choice is None:
        least = _unplanned_stage(recipe, 3)
        stage = f"ZeRO-{least} (the least memory)" if zero.stage == AUTO else f"ZeRO-{zero.stage}"
        return _with_values(recipe, {**unplanned, "zero.stage": least},
                            f"planner: no option of this recipe fits {where}: {stage} and the least-memory values; "
                            "`clustertune plan RECIPE` shows what would fit")
    option, fitting = choice.estimate.option, choice.estimate.max_tokens
    if recipe.data.packing and train.micro_batch_tokens == AUTO:
        tokens = choice.row_tokens
        rows = f"rows of up to {fitting:,} tokens fit, {tokens:,} used (32k at most: measured)"
    elif recipe.data.packing:
        tokens = train.micro_batch_tokens
        rows = (f"rows of train.micro_batch_tokens = {tokens:,}" if fitting >= tokens else
                f"train.micro_batch_tokens = {tokens:,} does NOT fit (at most {fitting:,}): expect running out of "
                "GPU memory; `clustertune plan RECIPE` says more")
    else:
        tokens = CPU_MICRO_BATCH_TOKENS
        rows = "padded micro-batches of train.micro_batch_size fit (data.packing = false: micro_batch_tokens unused)"
    recompute = choice.checkpoint_every_n_layers if every == AUTO else every
    if every == AUTO and recompute > 1:
        recomputed = -(-shape.num_hidden_layers // recompute)
        rows += (f"; checkpoint_every_n_layers = {recompute}: {recomputed} of {shape.num_hidden_layers} layers "
                 "recomputed, the fewest that fit")
    values = {"zero.stage": option.stage, "train.micro_batch_tokens": tokens,
              "train.gradient_checkpointing": option.gradient_checkpointing,
              "train.checkpoint_every_n_layers": recompute}
    return _with_values(recipe, values, f"planner: {option.label} on {where}; {rows}")


def launched_recipe(run_dir: Path) -> Recipe | None:
    """The recipe the run in `run_dir` was last launched with (RUN/launch/recipe.toml, the resolved
    recipe its ranks read), or None when there is none to read."""
    path = Path(run_dir) / "launch" / "recipe.toml"
    if not path.is_file():
        return None
    try:
        return load_recipe(path)
    except RecipeError:
        return None


def require_resolved(recipe: Recipe) -> None:
    """A worker's guard: "auto" is the launcher's to resolve (clustertune train / launch)."""
    left = auto_keys(recipe)
    if left:
        raise RecipeError(f"{', '.join(left)} = \"auto\" reached a worker: the launcher resolves it before ranks start; "
                          "start runs with `clustertune train` or `clustertune launch`, or give the values")
