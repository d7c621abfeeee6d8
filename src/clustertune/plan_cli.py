"""`clustertune plan`: print the memory plan of a recipe on a given cluster, optionally write the
recommended ZeRO settings back into the recipe.

    clustertune plan configs/r1-distill-32b-2x8-h20.toml --nodes 2 --gpus-per-node 8 --gpu h20 --host-mem 1024
    clustertune plan RECIPE --cluster cluster.toml --gpu-mem 80 --write

The arithmetic lives in plan.py; this module resolves the job (recipe, GPU, topology, host RAM)
and renders. Launcher side: never imports torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from clustertune.config import Recipe, RecipeError, check_zero_topology, load_recipe, recipe_from_dict, recipe_to_toml
from clustertune.gpus import known_gpu_names, local_gpu_count, lookup_gpu
from clustertune.plan import (DEFAULT_CHECKPOINT_SHARD_GIB, GIB, Estimate, Option, Plan, PlanInput,
                              ZeroBuckets, plan)
from clustertune.shapes import Shape, lookup_shape, shape_from_model_path


@dataclass(frozen=True)
class Job:
    """Where the plan's inputs came from, so the printout can say it."""

    gpu_mem_gib: float
    gpu_source: str
    nodes: int
    gpus_per_node: int
    topology_source: str
    host_mem_gib: float
    host_source: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def cmd_plan(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    shape, shape_note = resolve_shape(recipe.model.path)
    job = resolve_job(args)
    inp = plan_input(recipe, shape, job, checkpoint_shard_gib=_largest_shard_gib(recipe.model.path))
    result = plan(inp)
    print(render(result, recipe, job, shape_note))
    best = result.recommended
    if best is None:
        return 1
    if args.write:
        target = write_recommendation(Path(args.recipe), recipe, best.option)
        note = f" (with --set {', '.join(args.overrides)})" if args.overrides else ""
        print(f"\nwrote {target}{note}; previous version in {target}.bak")
    return 0


# ------------------------------------------------------------------------------ resolving inputs

def resolve_shape(model_path: str) -> tuple[Shape, str]:
    """The model's shape; a local path missing on this machine (plan often runs on the launcher)
    falls back to the built-in shape of the same name, e.g. /models/DeepSeek-R1-Distill-Qwen-32B."""
    try:
        return shape_from_model_path(model_path), ""
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


def resolve_job(args: argparse.Namespace) -> Job:
    gpu_mem, gpu_source = _resolve_gpu(args.gpu, args.gpu_mem)
    nodes, per_node, topo_source = _resolve_topology(args.cluster, args.nodes, args.gpus_per_node)
    host, host_source = _resolve_host(args.host_mem)
    return Job(gpu_mem, gpu_source, nodes, per_node, topo_source, host, host_source)


def _resolve_gpu(name: str | None, mem: float | None) -> tuple[float, str]:
    # --gpu-mem is read as GiB: an "80 GB" HBM card is 80 GiB of which the driver shows ~79.6.
    if mem is not None:
        if mem <= 0:
            raise RecipeError(f"--gpu-mem must be > 0 (got {mem})")
        return mem, f"--gpu-mem {mem:g} (GiB)"
    if name is not None:
        spec = lookup_gpu(name)
        if spec is None:
            raise RecipeError(f"--gpu {name!r}: unknown GPU (known: {known_gpu_names()}); pass --gpu-mem GiB instead")
        return spec.mem_gib, spec.description
    local = _local_gpu()
    if local is None:
        raise RecipeError("no GPU on this machine to measure: pass --gpu NAME or --gpu-mem GiB")
    return local


def _local_gpu() -> tuple[float, str] | None:
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
    return float(mib) / 1024, f"{name}, {float(mib) / 1024:.1f} GiB (this machine, nvidia-smi)"


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


def _resolve_host(mem: float | None) -> tuple[float, str]:
    if mem is not None:
        if mem <= 0:
            raise RecipeError(f"--host-mem must be > 0 (got {mem})")
        return mem, f"--host-mem {mem:g} (GiB)"
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise RecipeError("cannot read this machine's RAM: pass --host-mem GiB") from None
    return pages * size / GIB, "this machine's RAM (pass --host-mem for the nodes)"


def _largest_shard_gib(model_path: str) -> float:
    """Largest weight file of a local checkpoint: what one rank holds at a time under zero.Init."""
    files = list(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    return max((f.stat().st_size / GIB for f in files), default=DEFAULT_CHECKPOINT_SHARD_GIB)


def tokens_per_micro_batch(recipe: Recipe) -> int:
    """Packed: the token budget; padded: every sample padded to max_length (the worst case)."""
    if recipe.data.packing:
        return recipe.train.micro_batch_tokens
    return recipe.train.micro_batch_size * recipe.data.max_length


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
    # Packed: the rows per step depend on the data, assume several; padded: global / (micro x world).
    accumulation = recipe.data.packing or (
        recipe.train.global_batch_size > recipe.train.micro_batch_size * job.world_size)
    return PlanInput(
        shape=shape, tokens_per_micro_batch=tokens_per_micro_batch(recipe), seq_len=recipe.data.max_length,
        world_size=job.world_size, gpus_per_node=job.gpus_per_node, gpu_mem_gib=job.gpu_mem_gib,
        host_mem_gib=job.host_mem_gib,
        precision="fp32" if recipe.train.precision == "fp32" else "bf16",  # plans are for GPUs: auto = bf16
        liger=recipe.model.liger != "off",  # auto = on with a GPU
        attention="eager" if recipe.model.attn_implementation == "eager" else "sdpa",
        lora_rank=recipe.lora.r if recipe.lora.enabled else None, lora_targets=tuple(recipe.lora.target_modules),
        buckets=buckets, overlap_comm=zero.overlap_comm, grad_accumulation=accumulation,
        hpz_partition_size=zero.hpz_partition_size or 1,
        checkpoint_shard_gib=checkpoint_shard_gib)


# ------------------------------------------------------------------------------------- output

def recipe_option(recipe: Recipe) -> Option | None:
    if recipe.zero.stage == 0:
        return None
    return Option(recipe.zero.stage, recipe.zero.offload_optimizer, recipe.zero.offload_params,
                  recipe.train.gradient_checkpointing)


def _fit_text(e: Estimate) -> str:
    if e.fits:
        return "yes"
    return "no: " + "+".join(name for ok, name in ((e.fits_gpu, "GPU"), (e.fits_host, "host")) if not ok)


def render_table(result: Plan, current: Option | None) -> str:
    head = (f"{'#':>2}  {'stage':>5} {'offload':>9} {'ckpt':>4} | {'params':>6} {'grads':>6} {'optim':>6} "
            f"{'activ':>6} {'logits':>6} {'step':>5} {'buffers':>7} | {'GPU':>6} {'peak at':<8} | "
            f"{'host load':>9} {'train':>6} | {'fits':<11} {'max tok':>7}")
    lines = [head, "-" * len(head)]
    best = result.recommended
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


def render(result: Plan, recipe: Recipe, job: Job, shape_note: str = "") -> str:
    inp = result.input
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
        f"after the {inp.safety_margin:.0%} margin; host: {job.host_mem_gib:.0f} GiB/node [{job.host_source}], "
        f"budget {result.host_budget_gib:.0f} GiB",
        "",
        "GiB per GPU (rank) and per node (host), fastest option first. GPU = params + grads + optim + the",
        "worst moment (peak at): the loss (saved activations + logits), the backward (activ) or the optimizer",
        "step (step: gradient copies being stepped) -- plus buffers = ZeRO buckets + gathered params + CUDA/NCCL",
        "runtime + allocator slack. max tok = largest micro-batch (tokens) that fits the GPU.",
        render_table(result, recipe_option(recipe)),
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
    best = result.recommended
    if best is None:
        out.append(f"recommendation: none -- {result.why()}")
    else:
        o = best.option
        settings = (f"zero.stage={o.stage} zero.offload_optimizer={str(o.offload_optimizer).lower()} "
                    f"zero.offload_params={str(o.offload_params).lower()} "
                    f"train.gradient_checkpointing={str(o.gradient_checkpointing).lower()}")
        out.append(f"recommended: {o.label}: {settings}")
        out.append(f"why: {result.why()}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------- --write

def apply_option(recipe: Recipe, option: Option) -> Recipe:
    """The recipe with the option's four settings, validated like a freshly loaded one."""
    zero = recipe.zero.model_copy(update={"stage": option.stage, "offload_optimizer": option.offload_optimizer,
                                          "offload_params": option.offload_params})
    train = recipe.train.model_copy(update={"gradient_checkpointing": option.gradient_checkpointing})
    updated = recipe.model_copy(update={"zero": zero, "train": train})
    # model_copy does not validate: round-trip through the loader's validation.
    return recipe_from_dict(updated.to_toml_dict(), "<recommended recipe>")


def write_recommendation(path: Path, recipe: Recipe, option: Option) -> Path:
    """Rewrite the recipe file (resolved: defaults spelled out, comments dropped), keeping a .bak."""
    updated = apply_option(recipe, option)
    text = recipe_to_toml(updated)
    if load_recipe_text(text) != updated:
        raise RecipeError(f"{path}: the rewritten recipe would not load back identically; not written")
    shutil.copy2(path, path.with_name(path.name + ".bak"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # atomic: a crash leaves the old file or the new one, never half of one
    return path


def load_recipe_text(text: str) -> Recipe:
    return recipe_from_dict(tomllib.loads(text), "<rewritten recipe>")
