"""`clustertune plan`: print the memory plan of a recipe on a given cluster, optionally write the
recommended ZeRO settings back into the recipe.

    clustertune plan configs/r1-distill-32b-2x8-h20.toml --nodes 2 --gpus-per-node 8 --gpu h20 --host-mem 1024 \
        --samples 100000 --tokens-per-sample 2000 --inter-node-gbps 200
    clustertune plan RECIPE --cluster cluster.toml --gpu-mem 80 --write

GRPO recipes (train.objective = "grpo") also get the rollout's memory per option (plan_generation.py):
an option is recommended only when its generation phase fits too, and a set-up whose rollout fits
no option is refused (GenerationMemoryError, with the numbers and the fixes); a GRPO LoRA recipe also
gets the table below. `--lora-fit [SHAPE]` prints only that table: whether LoRA (the recipe's lora.r)
with the base whole on every GPU fits on h100/a100/h20/h200, for the recipe's model or a built-in shape:

    clustertune plan configs/r1-distill-32b-grpo-lora.toml --lora-fit deepseek-r1-distill-qwen-32b --gpus-per-node 8

The arithmetic lives in plan.py (memory), plan_generation.py (GRPO's rollout) and timing.py (time); this module resolves the job
(recipe, GPU, topology, host RAM, data size, bandwidth) and renders. Launcher side: never imports
torch.

Host RAM: --host-mem when given; else, only when the plan is for this machine (no --cluster,
--nodes, --gpus-per-node, --gpu or --gpu-mem), this machine's RAM. For other machines it is
unknown (the cluster file has no such key): the host check is skipped and the plan says so,
rather than judging 2 x 8 H20 servers by the laptop that runs `plan`.

--write changes only the ZeRO/checkpointing keys whose value differs, in place (toml_edit.py):
comments and every other line stay as written; the previous file is kept as RECIPE.bak (then
.bak.1, .bak.2, ...: a backup is never overwritten).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from clustertune import contract, plan_generation, timing
from clustertune.batch_math import total_steps
from clustertune.config import Recipe, RecipeError, check_zero_topology, load_recipe, recipe_from_dict
from clustertune.errors import UserError
from clustertune.flops import effective_context
from clustertune.gpus import GPUS, known_gpu_names, local_gpu_count, lookup_gpu
from clustertune.config import AUTO
from clustertune.plan import (DEFAULT_CHECKPOINT_SHARD_GIB, GIB, ROW_TOKENS_FOR_SPEED, Estimate, Option, Plan,
                              PlanInput, SpeedChoice, ZeroBuckets, expandable_segments_on, lean_mlp_applies, plan,
                              speed_choice, trainable_parameters)
from clustertune.shapes import SHAPES, Shape, lookup_shape, shape_from_model_path
from clustertune.toml_edit import set_scalars, toml_literal


@dataclass(frozen=True)
class Job:
    """Where the plan's inputs came from, so the printout can say it."""

    gpu_mem_gib: float
    gpu_source: str
    nodes: int
    gpus_per_node: int
    topology_source: str
    host_mem_gib: float | None  # None: unknown (another machine and no --host-mem): not checked
    host_source: str
    gpu_name: str | None = None  # catalog name (clustertune.gpus): its peak FLOP/s for the time estimate
    # The workers' allocator mode, from the PYTORCH_CUDA_ALLOC_CONF the launch forwards (plan.expandable_segments_on)
    expandable_segments: bool = True

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def cmd_plan(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if getattr(args, "lora_fit", None) is not None:
        print(render_lora_fit_job(recipe, args))
        return 0
    shape, shape_note = resolve_shape(recipe.model.path, recipe.model.num_layers)
    job = resolve_job(args)
    from clustertune.preflight import check_batch_arithmetic
    check_batch_arithmetic(recipe.train, packing=recipe.data.packing, world_size=job.world_size,
                           world_source=job.topology_source)
    # "auto" keys: what `train` / `launch` would resolve them to on this job's GPUs (the same function);
    # the plan below is of those values.
    from clustertune.auto import resolve_auto
    resolved = resolve_auto(recipe, on_gpu=recipe.train.device != "cpu", gpu_mem_gib=job.gpu_mem_gib,
                            gpu_source=job.gpu_source, nodes=job.nodes, gpus_per_node=job.gpus_per_node)
    if resolved.note:
        print(resolved.note + "\n")
    recipe = resolved.recipe
    inp = plan_input(recipe, shape, job, checkpoint_shard_gib=_largest_shard_gib(recipe.model.path))
    result = plan(inp)
    grpo = None
    if recipe.train.objective == "grpo":  # an option fits only when its rollout fits too
        grpo = plan_generation.with_rollout(result, grpo_rollout_spec(recipe))
        result = grpo.plan
    choice = speed_choice(result, shortest_row=shortest_row(recipe), packing=recipe.data.packing)
    print(render(result, recipe, job, shape_note, choice=choice))
    if grpo is not None:
        print()
        print(render_rollout(grpo))
        if recipe.lora.enabled:
            print()
            print(render_lora_fit(inp, grpo.spec, shape_name=recipe.model.path))
        plan_generation.check_rollout_fits(grpo)  # GenerationMemoryError: numbers and fixes
    if result.recommended is None:
        return 1
    best = choice.estimate if choice is not None else result.recommended
    print()
    print(render_time(recipe, shape, job, best.option, data_size(recipe, args), bandwidth(args)))
    row = choice.row_tokens if choice is not None else None
    if row is not None and row != recipe.train.micro_batch_tokens:
        print(f"\npacked rows: {best.option.label} fits {row:,}-token rows; train.micro_batch_tokens = {row:,} "
              f"(now {recipe.train.micro_batch_tokens:,}) runs the step in fewer, larger micro-batches (W1 on an "
              f"H100: one 32k row 35% faster than two 16k rows)" + ("" if args.write else "; --write sets it"))
    every = choice.checkpoint_every_n_layers if choice is not None else 1
    if every > recipe.train.checkpoint_every_n_layers:
        recomputed = -(-shape.num_hidden_layers // every)
        print(f"\nselective checkpointing: train.checkpoint_every_n_layers = {every} fits "
              f"(recomputes {recomputed} of {shape.num_hidden_layers} layers, the fewest that fit; each layer "
              f"not recomputed saves about a third of its forward and backward: W3 on an H100, 1 of 8 layers "
              f"recomputed at ZeRO-0 ran 15% faster than all 8 at ZeRO-1); \"auto\" takes it")
    if args.write:
        # The n written: what "auto" resolves to for the recommended option (1 without checkpointing).
        recompute = every
        changed, backup = write_recommendation(Path(args.recipe), best.option, micro_batch_tokens=row,
                                               checkpoint_every_n_layers=recompute)
        if not changed:
            print(f"\n{args.recipe} already has the recommended settings: not written")
        else:
            note = f" (the --set values {', '.join(args.overrides)} were not written)" if args.overrides else ""
            print(f"\nwrote {', '.join(changed)} into {args.recipe}{note}; previous version in {backup}")
    return 0


# ------------------------------------------------------------------------------ resolving inputs

def resolve_shape(model_path: str, num_layers: int | None = None) -> tuple[Shape, str]:
    """The model's shape; a local path missing on this machine (plan often runs on the launcher)
    falls back to the built-in shape of the same name, e.g. /models/DeepSeek-R1-Distill-Qwen-32B."""
    try:
        return shape_from_model_path(model_path, num_layers), ""
    except RecipeError as err:
        name = Path(model_path).name.lower()
        # An -Instruct model has its base model's shape (same config.json dimensions).
        for candidate in dict.fromkeys((name, name.removesuffix("-instruct"))):
            fallback = lookup_shape(candidate)
            if fallback is not None:
                return fallback, (f"{model_path} is not on this machine: planned with the built-in shape "
                                  f"{candidate} (same config.json values)")
        raise RecipeError(f"{err}; plan it with --set model.path=<built-in shape>") from None
    except (OSError, ValueError, TypeError) as err:
        raise RecipeError(f"model.path {model_path!r}: cannot read its config.json: {err}") from None


class PlanFlagError(UserError):
    """Flags of `clustertune plan` that contradict each other or are out of range."""


def check_conflicting_flags(args: argparse.Namespace) -> None:
    """Two flags that say the same thing differently: an error naming both, never one silently ignored."""
    if args.gpu is not None and args.gpu_mem is not None:
        raise PlanFlagError(f"--gpu {args.gpu} and --gpu-mem {args.gpu_mem:g} both give the GPU's memory: pass one "
                            f"(--gpu NAME for a catalog card, --gpu-mem GiB for anything else)")
    if args.cluster is not None:
        given = [f"{flag} {value}" for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node))
                 if value is not None]
        if given:
            raise PlanFlagError(f"--cluster {args.cluster} and {' and '.join(given)} both give the topology: pass "
                                f"the cluster file, or --nodes/--gpus-per-node without it")


def resolve_job(args: argparse.Namespace) -> Job:
    check_conflicting_flags(args)
    gpu_mem, gpu_source, gpu_name = _resolve_gpu(args.gpu, args.gpu_mem)
    nodes, per_node, topo_source = _resolve_topology(args.cluster, args.nodes, args.gpus_per_node)
    this_machine = all(value is None for value in (args.cluster, args.nodes, args.gpus_per_node, args.gpu,
                                                   args.gpu_mem))
    host, host_source = _resolve_host(args.host_mem, this_machine=this_machine)
    return Job(gpu_mem, gpu_source, nodes, per_node, topo_source, host, host_source, gpu_name,
               expandable_segments=launch_expandable_segments())


def launch_expandable_segments() -> bool:
    """The workers' allocator mode for a launch from this environment (its PYTORCH_CUDA_ALLOC_CONF is
    forwarded to every rank)."""
    return expandable_segments_on(os.environ.get(contract.ALLOC_CONF_ENV))


def _resolve_gpu(name: str | None, mem: float | None) -> tuple[float, str, str | None]:
    """(memory GiB, where it came from, catalog name or None)."""
    # --gpu-mem is read as GiB: an "80 GB" HBM card is 80 GiB of which the driver shows ~79.6.
    if mem is not None:
        if mem <= 0:
            raise RecipeError(f"--gpu-mem must be > 0 (got {mem})")
        return mem, f"--gpu-mem {mem:g} (GiB)", None
    if name is not None:
        spec = lookup_gpu(name)
        if spec is None:
            raise RecipeError(f"--gpu {name!r}: unknown GPU (known: {known_gpu_names()}); pass --gpu-mem GiB instead")
        return spec.mem_gib, spec.description, spec.name
    local = local_gpu_memory()
    if local is None:
        raise RecipeError("no GPU on this machine to measure: pass --gpu NAME or --gpu-mem GiB")
    return local


def local_gpu_memory() -> tuple[float, str, str | None] | None:
    """First local GPU's memory via nvidia-smi (no torch on the launcher side)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines:
        return None
    name, mib = (part.strip() for part in lines[0].rsplit(",", 1))
    spec = lookup_gpu(name)
    return (float(mib) / 1024, f"{name}, {float(mib) / 1024:.1f} GiB (this machine, nvidia-smi)",
            spec.name if spec else None)


def _resolve_topology(cluster: str | None, nodes: int | None, per_node: int | None) -> tuple[int, int, str]:
    if cluster is not None:
        return _topology_from_cluster(cluster)
    if (nodes is not None and nodes < 1) or (per_node is not None and per_node < 1):
        raise RecipeError(f"--nodes and --gpus-per-node must be >= 1 (got {nodes}, {per_node})")
    source = "--nodes/--gpus-per-node"
    if per_node is None:
        per_node = local_gpu_count() or None
        source = "GPUs of this machine" if per_node else "default: 1 GPU (pass --gpus-per-node)"
        per_node = per_node or 1
    return nodes or 1, per_node, source


def _topology_from_cluster(path: str) -> tuple[int, int, str]:
    try:
        from clustertune.cluster.inventory import load_cluster
    except ImportError:
        raise RecipeError("--cluster needs clustertune.cluster.inventory, which this installation lacks; "
                          "pass --nodes N --gpus-per-node G instead") from None
    try:
        inventory = load_cluster(path)  # a ClusterError names the file and the key already
    except OSError as err:
        raise RecipeError(f"{path}: {err}") from None
    slots = [int(node.slots) for node in inventory.nodes]
    if not slots or min(slots) < 1:
        raise RecipeError(f"{path}: need at least one node with slots >= 1 (got slots {slots})")
    if len(set(slots)) > 1:
        # The planner assumes one rank count per node; plan for the fullest node (host RAM) and
        # the smallest (total ranks would be wrong otherwise): refuse instead of guessing.
        raise RecipeError(f"{path}: nodes have different slot counts {slots}; plan with --nodes/--gpus-per-node")
    return len(slots), slots[0], path


def _resolve_host(mem: float | None, *, this_machine: bool) -> tuple[float | None, str]:
    if mem is not None:
        if mem <= 0:
            raise RecipeError(f"--host-mem must be > 0 (got {mem})")
        return mem, f"--host-mem {mem:g} (GiB)"
    if not this_machine:
        return None, "unknown: the plan is for other machines; pass --host-mem GiB (per node) to check it"
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise RecipeError("cannot read this machine's RAM: pass --host-mem GiB") from None
    return pages * size / GIB, "this machine's RAM"


def _largest_shard_gib(model_path: str) -> float:
    """Largest weight file of a local checkpoint: what one rank holds at a time under zero.Init."""
    files = list(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    return max((f.stat().st_size / GIB for f in files), default=DEFAULT_CHECKPOINT_SHARD_GIB)


def sample_length(recipe: Recipe) -> int:
    """The longest training sample: data.max_length, and for GRPO a prompt of it plus its completion."""
    return recipe.data.max_length + (recipe.grpo.max_new_tokens if recipe.train.objective == "grpo" else 0)


def shortest_row(recipe: Recipe) -> int:
    """The fewest tokens a packed row of this recipe must hold (Recipe.shortest_packed_row)."""
    return recipe.shortest_packed_row()[0]


def tokens_per_micro_batch(recipe: Recipe) -> int:
    """Packed: the token budget ("auto": the row the launcher aims for, ROW_TOKENS_FOR_SPEED, or one
    whole shortest row when that is longer); padded: every sample padded to the longest (the worst case)."""
    if recipe.data.packing:
        tokens = recipe.train.micro_batch_tokens
        return max(ROW_TOKENS_FOR_SPEED, shortest_row(recipe)) if tokens == AUTO else tokens
    return recipe.train.micro_batch_size * sample_length(recipe)


def packed_step_tokens(recipe: Recipe) -> int | None:
    """The most tokens one optimizer step holds, all ranks together, when packed SFT or DPO samples
    decide it (global_batch_size x the longest sample or pair); None otherwise (GRPO's completions
    per prompt, padded micro-batches). A rank gets at most this, so a row this long means no
    accumulation."""
    if not recipe.data.packing or recipe.train.objective not in ("sft", "dpo"):
        return None
    return recipe.train.global_batch_size * shortest_row(recipe)


def attention_kind(recipe: Recipe) -> str:
    """The planner's attention memory kind: packed rows with "auto" run flash varlen on a GPU
    (worker/model.attention_implementation); plans are for GPUs."""
    attn = recipe.model.attn_implementation
    if attn == "auto" and recipe.data.packing:
        return "varlen"
    return "eager" if attn == "eager" else "sdpa"


def plan_input(recipe: Recipe, shape: Shape, job: Job,
               checkpoint_shard_gib: float = DEFAULT_CHECKPOINT_SHARD_GIB) -> PlanInput:
    zero, h2 = recipe.zero, shape.hidden_size * shape.hidden_size
    # The defaults engine.build_deepspeed_config resolves (DeepSpeed's HF-integration heuristics,
    # hidden^2 based), mirrored here because the launcher side must not import the engine.
    buckets = ZeroBuckets(
        reduce_bucket=zero.reduce_bucket_size or h2,
        allgather_bucket=zero.allgather_bucket_size or max(500_000_000, h2),
        prefetch_bucket=zero.prefetch_bucket_size or int(0.9 * h2),
        param_persistence_threshold=(10 * shape.hidden_size if zero.param_persistence_threshold is None
                                     else zero.param_persistence_threshold),
        **({"sub_group_size": zero.sub_group_size} if zero.sub_group_size else {}))
    check_zero_topology(zero, world_size=job.world_size, gpus_per_node=job.gpus_per_node)
    # Packed: several rows per step unless all of a step's samples fit one row (step_tokens); padded:
    # global / (micro x world).
    accumulation = recipe.data.packing or (
        recipe.train.global_batch_size > recipe.train.micro_batch_size * job.world_size)
    return PlanInput(
        shape=shape, tokens_per_micro_batch=tokens_per_micro_batch(recipe), seq_len=sample_length(recipe),
        world_size=job.world_size, gpus_per_node=job.gpus_per_node, gpu_mem_gib=job.gpu_mem_gib,
        host_mem_gib=job.host_mem_gib,
        precision="fp32" if recipe.train.precision == "fp32" else "bf16",  # plans are for GPUs: auto = bf16
        liger=recipe.model.liger != "off",  # auto = on with a GPU
        attention=attention_kind(recipe),
        lora_rank=recipe.lora.r if recipe.lora.enabled else None, lora_targets=tuple(recipe.lora.target_modules),
        lean_mlp=lean_mlp_applies(recipe.train.compile, recipe.lora.wrapped_modules),
        buckets=buckets, overlap_comm=zero.overlap_comm, grad_accumulation=accumulation,
        step_tokens=packed_step_tokens(recipe), immediate_grad_update=zero.immediate_grad_update,
        expandable_segments=job.expandable_segments,
        hpz_partition_size=zero.hpz_partition_size or 1, grad_accum_dtype=zero.grad_accum_dtype,
        # "auto" (resolved by clustertune.auto from this plan): every layer recomputed, the baseline
        checkpoint_every_n_layers=1 if recipe.train.checkpoint_every_n_layers == AUTO
        else recipe.train.checkpoint_every_n_layers,
        checkpoint_shard_gib=checkpoint_shard_gib)


# ------------------------------------------------------------------------------------- output

def recipe_option(recipe: Recipe) -> Option | None:
    if AUTO in (recipe.zero.stage, recipe.train.gradient_checkpointing):
        return None
    return Option(recipe.zero.stage, recipe.zero.offload_optimizer, recipe.zero.offload_params,
                  recipe.train.gradient_checkpointing)


def _fit_text(e: Estimate) -> str:
    if e.fits:
        return "yes"
    return "no: " + "+".join(name for ok, name in ((e.fits_gpu, "GPU"), (e.fits_host, "host")) if not ok)


def render_table(result: Plan, current: Option | None, best: Estimate | None) -> str:
    head = (f"{'#':>2}  {'stage':>5} {'offload':>9} {'ckpt':>4} | {'params':>6} {'grads':>6} {'optim':>6} "
            f"{'activ':>6} {'logits':>6} {'step':>5} {'buffers':>7} | {'GPU':>6} {'peak at':<8} | "
            f"{'host load':>9} {'train':>6} | {'fits':<11} {'max tok':>7}")
    lines = [head, "-" * len(head)]
    for rank, e in enumerate(result.estimates, 1):
        o, g = e.option, e.gpu
        mark = "  <- recommended" if e is best else ""
        mark += "  (recipe now)" if o == current else ""
        lines.append(
            f"{rank:>2}  {o.stage:>5} {o.offload_label:>9} {'on' if o.gradient_checkpointing else 'off':>4} | "
            f"{g.params:6.1f} {g.grads:6.1f} {g.optimizer:6.1f} {g.activations:6.1f} {g.logits:6.1f} "
            f"{g.step_transient:5.1f} {g.buffers:7.1f} | {g.total:6.1f} {g.peak_phase:<8} | "
            f"{e.host.load:9.0f} {e.host.train:6.0f} | "
            f"{_fit_text(e):<11} {e.max_tokens or '-':>7}{mark}")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _host_line(result: Plan, job: Job) -> str:
    if job.host_mem_gib is None or result.host_budget_gib is None:
        return f"host RAM: NOT CHECKED [{job.host_source}]"
    return (f"host: {job.host_mem_gib:.0f} GiB/node [{job.host_source}], "
            f"budget {result.host_budget_gib:.0f} GiB after the {result.input.host_safety_margin:.0%} margin")


def render(result: Plan, recipe: Recipe, job: Job, shape_note: str = "", choice: SpeedChoice | None = None) -> str:
    """The plan as `clustertune plan` prints it. `choice` (plan.speed_choice) is what it recommends
    and what "auto" and --write take; without one, the table's first option that fits."""
    inp = result.input
    best = result.recommended if choice is None or result.recommended is None else choice.estimate
    tuning = "LoRA r=%d (%s)" % (inp.lora_rank, ",".join(inp.lora_targets)) if inp.lora_rank else "full fine-tuning"
    out = [
        f"model: {recipe.model.path}: {result.parameters / 1e9:.2f}B params, {_count(result.trainable)} trainable "
        f"({tuning}), {inp.precision}, liger {'on' if inp.liger else 'off'}",
    ]
    if shape_note:
        out.append(f"note: {shape_note}")
    out += [
        f"job: {job.nodes} node(s) x {job.gpus_per_node} GPU = {inp.world_size} ranks [{job.topology_source}]; "
        f"{inp.tokens_per_micro_batch} tokens per micro-batch (max_length {inp.seq_len})",
        f"GPU: {job.gpu_mem_gib:.1f} GiB [{job.gpu_source}], budget {result.gpu_budget_gib:.1f} GiB "
        f"after the {inp.safety_margin:.0%} margin; " + _host_line(result, job),
        "",
        "GiB per GPU (rank) and per node (host), fastest option first. GPU = params + grads + optim + the",
        "worst moment (peak at): the loss (saved activations + logits), the backward (activ) or the optimizer",
        "step (step: gradient copies being stepped) -- plus buffers = ZeRO buckets + gathered params + CUDA/NCCL",
        "runtime + allocator slack. max tok = largest micro-batch (tokens) that fits the GPU.",
        render_table(result, recipe_option(recipe), best),
        "",
    ]
    ckpt = result.checkpoint
    keep = recipe.checkpoint.keep_last
    out.append(f"checkpoint on disk (DeepSpeed, per save): {ckpt.deepspeed:.0f} GiB = weights {ckpt.weights:.0f} "
               f"+ optimizer states {ckpt.optimizer:.0f}; keep_last={keep} -> up to {keep * ckpt.deepspeed:.0f} GiB")
    if ckpt.adapter is not None and not recipe.lora.merge_on_export:
        out.append(f"final export (LoRA adapter, {inp.precision}): {ckpt.adapter:.2f} GiB")
    else:
        out.append(f"final export (HF safetensors, {inp.precision}): {ckpt.export:.0f} GiB")
    out.append("")
    if best is None:
        out.append(f"recommendation: none -- {result.why()}")
    else:
        o = best.option
        settings = (f"zero.stage={o.stage} zero.offload_optimizer={str(o.offload_optimizer).lower()} "
                    f"zero.offload_params={str(o.offload_params).lower()} "
                    f"train.gradient_checkpointing={str(o.gradient_checkpointing).lower()}")
        if choice is not None and o.gradient_checkpointing:
            settings += f" train.checkpoint_every_n_layers={choice.checkpoint_every_n_layers}"
        out.append(f"recommended: {o.label}: {settings}")
        why = result.why()
        if best is not result.recommended:
            why = (f"full-size packed rows first, then the fewest recomputed layers and the stage's optimizer cost "
                   f"(plan.speed_choice), ahead of {result.recommended.option.label}, the table's first that fits")
        out.append(f"why: {why}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ GRPO

def grpo_rollout_spec(recipe: Recipe) -> plan_generation.RolloutSpec:
    return plan_generation.rollout_spec(global_batch_size=recipe.train.global_batch_size,
                                        group_size=recipe.grpo.group_size, max_length=recipe.data.max_length,
                                        max_new_tokens=recipe.grpo.max_new_tokens)


def render_rollout(grpo: plan_generation.GrpoPlan) -> str:
    """The rollout phase of each option, in the training table's order."""
    inp, spec = grpo.plan.input, grpo.spec
    head = (f"{'#':>2}  {'option':<34} | {'states':>6} {'gather':>6} {'KV':>6} {'prefill':>7} {'logits':>6} "
            f"{'buffers':>7} | {'GPU':>6} | {'rollout fits':<12}")
    lines = [
        f"GRPO rollout (between optimizer steps, GiB per GPU): {spec.prompts_per_step} prompts x grpo.group_size "
        f"{spec.group_size} per step, {spec.prompts_per_rank(inp.world_size)} prompts = "
        f"{spec.sequences_per_rank(inp.world_size)} completions on each of {inp.world_size} GPUs; static KV cache of "
        f"{spec.prompt_tokens} prompt (data.max_length) + {spec.max_new_tokens} new tokens (grpo.max_new_tokens).",
        "states = what the engine keeps between steps; gather = the whole model gathered once per rollout (ZeRO-3);",
        "KV = the KV cache; prefill / logits = the prompt pass's layer temporaries / one decoding step's logits "
        "(not at once); buffers = CUDA/NCCL runtime + allocator slack.",
        head, "-" * len(head)]
    best = grpo.plan.recommended
    for rank, e in enumerate(grpo.training.estimates, 1):
        m = grpo.rollouts[e.option]
        fit = "yes" if plan_generation.fits(inp, m) else "no"
        mark = "  <- recommended" if best is not None and e.option == best.option else ""
        lines.append(f"{rank:>2}  {e.option.label:<34} | {m.engine_states:6.1f} {m.gathered_weights:6.1f} "
                     f"{m.kv_cache:6.1f} {m.prefill:7.1f} {m.logits:6.1f} {m.runtime + m.fragmentation:7.1f} | "
                     f"{m.total:6.1f} | {fit:<12}{mark}")
    if best is not None:
        most = plan_generation.max_prompts_per_rank(inp, best.option, spec)
        longest = plan_generation.max_new_tokens(inp, best.option, spec)
        lines.append(f"with {best.option.label}: up to {most} prompts ({most * spec.group_size} completions) per GPU "
                     f"fit at these lengths, or grpo.max_new_tokens up to {longest} at this batch")
    return "\n".join(lines)


def render_lora_fit(inp: PlanInput, spec: plan_generation.RolloutSpec | None, *, shape_name: str,
                    gpus: tuple[str, ...] = plan_generation.LORA_FIT_GPUS) -> str:
    """Whether the LoRA set-up of `inp` fits with its base whole on each GPU (no ZeRO-3 gather)."""
    rows = plan_generation.lora_fit_table(inp, spec, {name: GPUS[name].mem_gib for name in gpus})
    option = plan_generation.WHOLE_BASE_OPTION
    rollout_head = f" {'rollout':>7} {'prompts/GPU':>11}" if spec is not None else ""
    head = f"{'GPU':<10} {'GiB':>6} | {'base':>6} {'LoRA':>6} {'train':>6}{rollout_head} | {'fits':<4}"
    lines = [
        f"LoRA r={inp.lora_rank} ({','.join(inp.lora_targets)}) on {shape_name} with its {inp.precision} base whole on "
        f"every GPU ({option.label}: no gather for generation), {inp.world_size} GPU(s), "
        f"{inp.tokens_per_micro_batch} tokens per micro-batch; GiB per GPU:",
        "base = the frozen weights; LoRA = adapters + their gradients + optimizer states; train = the training "
        "step's peak" + ("; rollout = the generation phase's peak (KV cache for the recipe's rollout); "
                         "prompts/GPU = the most prompts (grpo.group_size completions each) that fit" if spec else ""),
        head, "-" * len(head)]
    for r in rows:
        rollout = (f" {r.rollout.total:7.1f} {r.max_prompts:>11}" if r.rollout is not None else "")
        lines.append(f"{r.gpu:<10} {r.gpu_mem_gib:6.1f} | {r.base:6.1f} {r.adapter_states:6.1f} {r.training_peak:6.1f}"
                     f"{rollout} | {'yes' if r.fits(plan_generation.rollout_margin(inp)) else 'no':<4}")
    return "\n".join(lines)


def render_lora_fit_job(recipe: Recipe, args: argparse.Namespace) -> str:
    """`plan RECIPE --lora-fit [SHAPE]`: the table for the recipe's model (or the built-in SHAPE) with
    the recipe's lora.r and targets (LoRA on or not in the recipe), on the --nodes/--gpus-per-node job;
    no GPU flag needed (the table's rows are the GPUs)."""
    check_conflicting_flags(args)
    if args.lora_fit:
        shape, name = lookup_shape(args.lora_fit), args.lora_fit
        if shape is None:
            raise PlanFlagError(f"--lora-fit {args.lora_fit!r}: not a built-in shape ({', '.join(sorted(SHAPES))})")
    else:
        (shape, _), name = resolve_shape(recipe.model.path, recipe.model.num_layers), recipe.model.path
    nodes, per_node, source = _resolve_topology(args.cluster, args.nodes, args.gpus_per_node)
    job = Job(1.0, "--lora-fit: each GPU of the table", nodes, per_node, source, None, "not checked")
    inp = plan_input(recipe, shape, job)
    targets = tuple(recipe.lora.target_modules)
    inp = dataclasses.replace(inp, lora_rank=recipe.lora.r, lora_targets=targets,
                              lean_mlp=lean_mlp_applies(recipe.train.compile, targets))
    spec = grpo_rollout_spec(recipe) if recipe.train.objective == "grpo" else None
    return render_lora_fit(inp, spec, shape_name=name)


# ------------------------------------------------------------------------------------ time

@dataclass(frozen=True)
class DataSize:
    """How many training samples and how long they are, and where each figure came from."""

    samples: int | None
    samples_source: str
    tokens_per_sample: float | None
    t_eff: float | None  # sum(l^2) / sum(l) over the samples (the attention term of FLOPs/token)
    tokens_source: str


@dataclass(frozen=True)
class Bandwidth:
    intra_node_gbps: float
    intra_source: str
    inter_node_gbps: float
    inter_source: str


# Records tokenized to measure the average length (spread over the files), and the chat
# template's tokens around each message (Qwen's "<|im_start|>role\n ... <|im_end|>\n").
TOKENIZED_RECORDS = 2000
TEMPLATE_TOKENS_PER_MESSAGE = 5


def bandwidth(args: argparse.Namespace) -> Bandwidth:
    values = []
    for flag, attr, default, what in (
            ("--intra-node-gbps", "intra_node_gbps", timing.DEFAULT_INTRA_NODE_GBPS, "NVLink-class server"),
            ("--inter-node-gbps", "inter_node_gbps", timing.DEFAULT_INTER_NODE_GBPS, "one 100 Gb/s NIC per node")):
        given = getattr(args, attr, None)
        if given is not None and not given > 0:
            raise PlanFlagError(f"{flag} must be > 0 (got {given})")
        values += [given, flag] if given is not None else [default, f"ASSUMED ({what}): pass {flag}"]
    return Bandwidth(*values)


def data_size(recipe: Recipe, args: argparse.Namespace) -> DataSize:
    """Samples: --samples, else counted in the data files (the launcher's record check); tokens per
    sample: --tokens-per-sample, else measured with the model's tokenizer.json on a spread of records."""
    samples, tokens = getattr(args, "samples", None), getattr(args, "tokens_per_sample", None)
    if samples is not None and samples < 1:
        raise PlanFlagError(f"--samples must be >= 1 (got {samples})")
    if tokens is not None and not tokens > 0:
        raise PlanFlagError(f"--tokens-per-sample must be > 0 (got {tokens})")
    if samples is not None:
        samples_source = "--samples"
    else:
        samples, samples_source = _count_train_samples(recipe)
    if tokens is not None:
        return DataSize(samples, samples_source, float(tokens), float(tokens),
                        "--tokens-per-sample (every sample taken as that long)")
    tokens, t_eff, tokens_source = _measure_tokens(recipe)
    return DataSize(samples, samples_source, tokens, t_eff, tokens_source)


def _train_files(recipe: Recipe) -> list[tuple[str, float]]:
    """(path, weight) of each data.train_files entry: a path, or a {path, weight} table."""
    return [(entry, 1.0) if isinstance(entry, str) else (entry.path, entry.weight) for entry in recipe.data.train_files]


def _count_train_samples(recipe: Recipe) -> tuple[int | None, str]:
    from clustertune.data import check_records
    data = recipe.data
    total = 0.0
    try:
        for path, weight in _train_files(recipe):
            one = data.model_copy(update={"train_files": [path], "eval_files": []})
            total += weight * check_records(one, recipe.train.objective).valid
    except UserError as err:
        first = str(err).splitlines()[0]
        return None, f"unknown ({first}); pass --samples N"
    held_out = round(total * data.eval_fraction) if data.eval_fraction and not data.eval_files else 0
    note = f", less {held_out} for eval (data.eval_fraction)" if held_out else ""
    return int(total) - held_out, f"counted in data.train_files{note}"


def _measure_tokens(recipe: Recipe) -> tuple[float | None, float | None, str]:
    tokenizer_file = Path(recipe.model.path) / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None, None, (f"unknown: no {tokenizer_file} on this machine to measure the data with; "
                            f"pass --tokens-per-sample N")
    from clustertune.data.records import load_file
    try:
        conversations = [r.messages for path, _ in _train_files(recipe)
                         for r in load_file(Path(path), recipe.data.format)[0]]
    except (UserError, OSError, ValueError) as err:
        return None, None, f"unknown (the data could not be read here: {err}); pass --tokens-per-sample N"
    if not conversations:
        return None, None, "unknown (no records read); pass --tokens-per-sample N"
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    stride = max(1, len(conversations) // TOKENIZED_RECORDS)
    chosen = conversations[::stride][:TOKENIZED_RECORDS]
    lengths = []
    for messages in chosen:
        texts = [str(m.get("content", "")) for m in messages]
        ids = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
        lengths.append(min(recipe.data.max_length, ids + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)))
    return (sum(lengths) / len(lengths), effective_context(lengths),
            f"{len(lengths)} records tokenized with {tokenizer_file}, +{TEMPLATE_TOKENS_PER_MESSAGE} template "
            f"tokens per message, capped at data.max_length (approximate)")


def render_time(recipe: Recipe, shape: Shape, job: Job, option: Option, data: DataSize, bw: Bandwidth) -> str:
    """The time estimate of the recommended option, with every assumption it rests on."""
    head = f"time estimate ({option.label}, {job.world_size} x {job.gpu_name or 'GPU'}):"
    if job.gpu_name is None:
        return f"{head} not made: the GPU's peak FLOP/s is unknown ({job.gpu_source}); pass --gpu NAME"
    if data.tokens_per_sample is None or data.t_eff is None:
        return f"{head} not made: tokens per sample {data.tokens_source}"
    train = recipe.train
    tokens_per_step = train.global_batch_size * data.tokens_per_sample
    zero = recipe.zero
    est = timing.estimate_run_time(
        shape, gpu=job.gpu_name, world_size=job.world_size, gpus_per_node=job.gpus_per_node,
        zero_stage=option.stage, gradient_checkpointing=option.gradient_checkpointing,
        tokens_per_step=tokens_per_step, t_eff=data.t_eff, tokens_per_micro_batch=tokens_per_micro_batch(recipe),
        trainable=trainable_parameters(shape, recipe.lora.r if recipe.lora.enabled else None,
                                       tuple(recipe.lora.target_modules)),
        intra_node_gbps=bw.intra_node_gbps, inter_node_gbps=bw.inter_node_gbps,
        hpz=bool(getattr(zero, "hpz_partition_size", None) and zero.hpz_partition_size > 1),
        quantized_weights=bool(getattr(zero, "quantized_weights", False)),
        quantized_gradients=bool(getattr(zero, "quantized_gradients", False)),
        offload_optimizer=option.offload_optimizer)
    chosen = est.achieved_mfu
    if train.max_steps is not None:
        steps, steps_text = train.max_steps, "train.max_steps"
    elif data.samples is None:
        steps, steps_text = None, f"the number of samples is {data.samples_source}"
    else:
        try:
            steps = total_steps(num_samples=data.samples, global_batch_size=train.global_batch_size,
                                max_steps=None, epochs=train.epochs)
            steps_text = f"{train.epochs:g} epochs x {data.samples:,} samples / {train.global_batch_size} per step"
        except RecipeError as err:  # fewer samples than one global batch: said, the plan stands
            steps, steps_text = None, str(err)
    comm = est.communication
    link = "between nodes" if job.nodes > 1 else "inside the node"
    link_source = bw.inter_source if job.nodes > 1 else bw.intra_source
    lines = [
        head,
        f"  data: {'unknown' if data.samples is None else f'{data.samples:,}'} train samples [{data.samples_source}]; "
        f"{data.tokens_per_sample:,.0f} tokens per sample [{data.tokens_source}]",
        f"  per step: {tokens_per_step:,.0f} tokens ({train.global_batch_size} samples), "
        f"{est.flops_per_token / 1e9:.0f} GFLOP per token (clustertune.flops)",
        f"  compute: {est.compute_s:.2f} s at {chosen.mfu:.1%} MFU per GPU"
        + (f" [{'; '.join(chosen.notes)}]" if chosen.notes else ""),
        f"    the MFU measured: {chosen.entry.model}; {chosen.entry.source}",
        f"  communication: {comm.bytes_per_step / 1e9:,.0f} GB per step ({comm.formula}) at "
        f"{est.bus_gbps:g} Gb/s {link} [{link_source}]: {est.communication_s:.2f} s, "
        f"{est.exposed_communication_s:.2f} s of it not hidden ({timing.COMM_OVERLAP:.0%} overlap ASSUMED)",
        f"  step: {est.step_s:.2f} s = compute + exposed communication; {est.tokens_per_s:,.0f} tokens/s, "
        f"{est.tokens_per_s_per_gpu:,.0f} per GPU, {est.mfu:.1%} MFU end to end",
    ]
    if steps is None:
        lines.append(f"  wall time: unknown: {steps_text}")
    else:
        lines.append(f"  wall time: {timing.format_duration(est.wall_seconds(steps))} for {steps:,} steps "
                     f"({steps_text}); training steps only: evaluation, checkpoint saves and start-up not included")
    caveats = []
    if option.offload_optimizer or option.offload_params:
        caveats.append("offload is not modelled (PCIe traffic and the CPU optimizer step): a lower bound")
    if not recipe.data.packing:
        caveats.append("padded batches: the padding's compute is not counted: optimistic")
    if recipe.train.objective == "grpo":
        caveats.append("GRPO: the rollout's generation time between steps is not modelled: a lower bound")
    if recipe.lora.enabled:
        caveats.append("LoRA: the measured MFU is full fine-tuning's, and LoRA skips the frozen weights' "
                       "gradients: pessimistic")
    if caveats:
        lines.append("  caveats: " + "; ".join(caveats))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- --write

# The keys `plan --write` sets: (section, key) -> the option's attribute.
WRITTEN_KEYS = {("zero", "stage"): "stage", ("zero", "offload_optimizer"): "offload_optimizer",
                ("zero", "offload_params"): "offload_params",
                ("train", "gradient_checkpointing"): "gradient_checkpointing"}


def next_backup(path: Path) -> Path:
    """RECIPE.bak, or the first free RECIPE.bak.N: an earlier backup is never overwritten."""
    candidate = path.with_name(path.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak.{n}")
        n += 1
    return candidate


def write_recommendation(path: Path, option: Option, micro_batch_tokens: int | None = None,
                         checkpoint_every_n_layers: int | None = None) -> tuple[list[str], Path | None]:
    """Set the option's keys (and the packed-row size, when given) that differ from the file's own
    values (not the --set overrides) in place; returns the keys written and the backup of the
    previous file (None: nothing to write). train.checkpoint_every_n_layers: written where the file
    says "auto" (explicit values stay), and set to 1 where the option does not checkpoint."""
    text = path.read_text(encoding="utf-8")
    current = load_recipe(path)  # the file alone: what it says, defaults filled in
    sections = {"zero": current.zero, "train": current.train}
    changes = {(section, key): getattr(option, attr) for (section, key), attr in WRITTEN_KEYS.items()
               if getattr(sections[section], key) != getattr(option, attr)}
    if micro_batch_tokens is not None and current.train.micro_batch_tokens != micro_batch_tokens:
        changes[("train", "micro_batch_tokens")] = micro_batch_tokens
    every = current.train.checkpoint_every_n_layers
    if not option.gradient_checkpointing and every != 1:  # n > 1 without checkpointing is refused
        changes[("train", "checkpoint_every_n_layers")] = 1
    elif checkpoint_every_n_layers is not None and every == AUTO:
        changes[("train", "checkpoint_every_n_layers")] = checkpoint_every_n_layers
    if not changes:
        return [], None
    edited = set_scalars(text, changes, where=str(path))
    written = recipe_from_dict(tomllib.loads(edited), str(path))
    if any(getattr({"zero": written.zero, "train": written.train}[section], key) != value
           for (section, key), value in changes.items()):
        raise RecipeError(f"{path}: the edited recipe would not read back with the recommended values; not written")
    backup = next_backup(path)
    shutil.copy2(path, backup)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(edited, encoding="utf-8")
    tmp.replace(path)  # atomic: a crash leaves the old file or the new one, never half of one
    return [f"{section}.{key} = {toml_literal(value)}" for (section, key), value in changes.items()], backup
