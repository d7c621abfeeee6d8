"""What "auto" in train.micro_batch_tokens and train.gradient_checkpointing (their defaults) becomes:
decided once, on the launcher side, before any rank starts; the ranks get the concrete values in
RUN/launch/recipe.toml (a worker refuses "auto") and every later --resume of the run reuses them.

    clustertune train RECIPE      # prints e.g. "auto: train.micro_batch_tokens = 32,768,
                                  #   train.gradient_checkpointing = true (planner: ZeRO-2 + ckpt ...)"
    clustertune plan RECIPE --gpu-mem 80   # the same line for a GPU of 80 GiB, then the plan

The rule, from benchmarks/RESULTS.md (W1, Qwen2.5-1.5B shape, one H100): packed rows as large as
the GPU allows up to 32k tokens (one 32k row ran 35% faster than two 16k rows), with checkpointing
when the rows need it (32k rows with checkpointing: 32,597 tokens/s; without it only 16k rows fit:
27,878). So the planner (plan.speed_choice, the choice `clustertune plan` recommends) takes the
recipe's own ZeRO stage and offload (zero.* is never changed here), plans 32k-token rows, picks the
fastest of checkpointing off/on that fits them and the largest row that option fits.

Where the planner cannot run:
  * CPU (train.device = "cpu", no GPU, a cpu cluster): the former defaults, 8192 tokens and no
    checkpointing (speed on the CPU is not what these keys are for).
  * GPU memory unknown (a cluster launched with --skip-doctor or through slurm, an unknown card) or
    a model whose size is unknown here: 8192 tokens with checkpointing, the least memory of the
    former defaults, and a note saying how to get the planner's values.
A resumed run takes the values its first launch wrote into RUN/launch/recipe.toml. Explicit values
in a recipe are never changed.

Launcher side: never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clustertune.config import AUTO, Recipe, RecipeError, TrainSection, load_recipe, recipe_from_dict

# CPU: the values these keys had before "auto" (speed on the CPU is not what they are for).
CPU_MICRO_BATCH_TOKENS = 8192
CPU_GRADIENT_CHECKPOINTING = False
# GPU memory unknown: the same row, with checkpointing (the least activation memory).
UNKNOWN_GPU_MICRO_BATCH_TOKENS = 8192
UNKNOWN_GPU_GRADIENT_CHECKPOINTING = True
AUTO_KEYS = ("micro_batch_tokens", "gradient_checkpointing")  # of [train]


def auto_keys(train: TrainSection) -> list[str]:
    """The [train] keys still "auto", as `train.key` names."""
    return [f"train.{key}" for key in AUTO_KEYS if getattr(train, key) == AUTO]


@dataclass(frozen=True)
class AutoResolution:
    recipe: Recipe  # with every "auto" key replaced by a value
    note: str | None  # the one line that says what "auto" became and why; None: nothing was "auto"


def _with_values(recipe: Recipe, tokens: int | None, checkpointing: bool | None, why: str) -> AutoResolution:
    """The recipe with the "auto" keys set (a key given explicitly keeps its value) and the line."""
    train = recipe.train
    updates: dict[str, object] = {}
    if train.micro_batch_tokens == AUTO:
        updates["micro_batch_tokens"] = tokens
    if train.gradient_checkpointing == AUTO:
        # checkpoint_every_n_layers > 1 says which layers to recompute: checkpointing is wanted
        updates["gradient_checkpointing"] = checkpointing or train.checkpoint_every_n_layers > 1
    said = ", ".join(f"train.{key} = {_literal(value)}" for key, value in updates.items())
    copied = recipe.model_copy(update={"train": train.model_copy(update=updates)})
    # Validated again as a whole: the combination checks (rows >= the shortest row) hold for the values.
    resolved = recipe_from_dict(copied.to_toml_dict(), "the recipe with \"auto\" resolved")
    return AutoResolution(resolved, f"auto: {said} ({why})")


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:,}" if isinstance(value, int) else str(value)


def resolve_auto(recipe: Recipe, *, on_gpu: bool, gpu_mem_gib: float | None, gpu_source: str, nodes: int,
                 gpus_per_node: int, started_with: TrainSection | None = None) -> AutoResolution:
    """The recipe with train.micro_batch_tokens and train.gradient_checkpointing "auto" resolved for
    this launch: `nodes` x `gpus_per_node` ranks on GPUs of `gpu_mem_gib` GiB (None: unknown;
    `gpu_source` says where the figure came from), or the CPU (`on_gpu` False). `started_with`: the
    [train] section the run was first launched with (--resume): its values are taken as they are.
    Pure but for reading model.path's config.json (a local model directory)."""
    if not auto_keys(recipe.train):
        return AutoResolution(recipe, None)
    shortest = recipe.shortest_packed_row()[0]
    fallback_tokens = max(UNKNOWN_GPU_MICRO_BATCH_TOKENS, shortest)
    if started_with is not None and not auto_keys(started_with):
        return _with_values(recipe, started_with.micro_batch_tokens, started_with.gradient_checkpointing,
                            "--resume: as the run's previous launch resolved them, RUN/launch/recipe.toml")
    if not on_gpu:
        return _with_values(recipe, max(CPU_MICRO_BATCH_TOKENS, shortest), CPU_GRADIENT_CHECKPOINTING,
                            "CPU: the former defaults; the planner is for GPUs")
    if gpu_mem_gib is None:
        return _with_values(recipe, fallback_tokens, UNKNOWN_GPU_GRADIENT_CHECKPOINTING,
                            f"GPU memory unknown ({gpu_source}): the conservative values; for the planner's, "
                            f"run `clustertune plan RECIPE --gpu-mem GiB --write` or launch with the doctor")
    return _planned(recipe, gpu_mem_gib=gpu_mem_gib, gpu_source=gpu_source, nodes=nodes,
                    gpus_per_node=gpus_per_node, fallback_tokens=fallback_tokens)


def _planned(recipe: Recipe, *, gpu_mem_gib: float, gpu_source: str, nodes: int, gpus_per_node: int,
             fallback_tokens: int) -> AutoResolution:
    """The planner's choice among the recipe's own ZeRO options (checkpointing off/on when "auto")."""
    from clustertune.plan import plan, speed_choice
    from clustertune.plan_cli import Job, plan_input, resolve_shape
    try:
        shape, _ = resolve_shape(recipe.model.path, recipe.model.num_layers)
    except RecipeError as err:  # a model only on the nodes, under a name that is no built-in shape
        return _with_values(recipe, fallback_tokens, UNKNOWN_GPU_GRADIENT_CHECKPOINTING,
                            f"model size unknown here ({str(err).splitlines()[0]}): the conservative values; "
                            "run `clustertune plan` with model.path set to a built-in shape for the planner's")
    train, zero = recipe.train, recipe.zero
    # ZeRO-0 keeps every state whole on each rank: what ZeRO-1 holds on one GPU (nothing partitioned).
    stage = zero.stage or 1
    if zero.stage == 0:
        nodes, gpus_per_node = 1, 1
    job = Job(gpu_mem_gib, gpu_source, nodes, gpus_per_node, "this launch", None, "not checked")
    checkpointing = ({True, False} if train.checkpoint_every_n_layers == 1 else {True}) \
        if train.gradient_checkpointing == AUTO else {train.gradient_checkpointing}

    def allowed(option) -> bool:
        return (option.stage == stage and option.offload_optimizer == zero.offload_optimizer
                and option.offload_params == zero.offload_params and option.gradient_checkpointing in checkpointing)

    result = plan(plan_input(recipe, shape, job))  # rows of plan_cli.tokens_per_micro_batch: 32k for "auto"
    choice = speed_choice(result, shortest_row=recipe.shortest_packed_row()[0], packing=recipe.data.packing,
                          allowed=allowed)
    where = f"{gpu_mem_gib:.1f} GiB GPUs [{gpu_source}], {job.world_size} rank(s)"
    if choice is None:
        return _with_values(recipe, fallback_tokens, UNKNOWN_GPU_GRADIENT_CHECKPOINTING,
                            f"planner: no ZeRO-{zero.stage} option of this recipe fits {where}: the least-memory "
                            "values; `clustertune plan RECIPE` shows what would fit")
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
    label = option.label if zero.stage else option.label.replace("ZeRO-1", "ZeRO-0")
    return _with_values(recipe, tokens, option.gradient_checkpointing, f"planner: {label} on {where}; {rows}")


def launched_train_section(run_dir: Path) -> TrainSection | None:
    """The [train] section the run in `run_dir` was last launched with (RUN/launch/recipe.toml, the
    resolved recipe its ranks read), or None when there is none to read."""
    path = Path(run_dir) / "launch" / "recipe.toml"
    if not path.is_file():
        return None
    try:
        return load_recipe(path).train
    except RecipeError:
        return None


def require_resolved(train: TrainSection) -> None:
    """A worker's guard: "auto" is the launcher's to resolve (clustertune train / launch)."""
    left = auto_keys(train)
    if left:
        raise RecipeError(f"{', '.join(left)} = \"auto\" reached a worker: the launcher resolves it before ranks start; "
                          "start runs with `clustertune train` or `clustertune launch`, or give the values")
