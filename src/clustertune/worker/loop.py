"""The worker: setup -> loop (train_step) -> checkpoint -> export. One process per rank.

Started by a launcher (clustertune.local for one machine, the DeepSpeed launcher across nodes),
never directly by users; see clustertune.worker for the command line.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from clustertune import watchdog
from clustertune.worker import batching, checkpoint, engine, evaluate, metrics
from clustertune.config import Recipe, recipe_to_toml
from clustertune.worker.kernels import VARLEN_ATTENTION
from clustertune.worker.profiling import profile_step
from clustertune.worker.model import (TokenLossModel, apply_lora, attention_implementation, build_causal_lm, describe,
                               load_tokenizer, model_dtype, use_liger)
from clustertune.shapes import shape_from_model_path

# How long ranks wait for one process's work: tokenizing a large dataset, or converting a 32B
# checkpoint for a new world size (~0.5 TB of bf16 weights + fp32 master and Adam states).
LONG_WAIT_S = 6 * 3600


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    on_gpu: bool
    device: torch.device
    precision: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(recipe: Recipe) -> Runtime:
    rank, local_rank, world = engine.world_info()
    want = recipe.train.device
    on_gpu = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    engine.init_distributed(on_gpu=on_gpu, timeout_s=recipe.run.collective_timeout_s)
    seed_everything(recipe.train.seed, deterministic=recipe.train.deterministic or not on_gpu)
    return Runtime(rank, local_rank, world, on_gpu, torch.device("cuda", local_rank) if on_gpu else torch.device("cpu"),
                   engine.resolve_precision(recipe.train, on_gpu=on_gpu))


def seed_everything(seed: int, *, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def write_run_files(run_dir: Path, recipe: Recipe, ds_config: dict[str, Any], rt: Runtime) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    (run_dir / "world.json").write_text(json.dumps(
        {"world_size": rt.world_size, "device": str(rt.device.type), "precision": rt.precision}, indent=2))
    from clustertune.manifest import write_manifest  # versions, git commit, environment (no secrets)
    write_manifest(run_dir, world_size=rt.world_size,
                   extra={"device": str(rt.device.type), "precision": rt.precision})


def prepare_data(recipe: Recipe, tokenizer, rt: Runtime, run_dir: Path):
    """Each node's local rank 0 validates and tokenizes (filling the cache); the others then load
    the cache, so every rank trains the identical filtered, shuffled list."""
    from clustertune.data import prepare_dataset
    cache_dir = Path(recipe.data.cache_dir) if recipe.data.cache_dir else run_dir.parent / ".cache" / "tokenized"

    def tokenize():
        watchdog.fault_point("data_preparation", rank=rt.rank, step=0)  # TEST-ONLY hook
        return prepare_dataset(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=cache_dir,
                               log=print if rt.is_main else (lambda *_: None))

    result = engine.while_others_wait(tokenize, works=rt.local_rank == 0, timeout_s=LONG_WAIT_S)
    if result is None:
        result = prepare_dataset(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=cache_dir,
                                 log=lambda *_: None)
    return result


def run(recipe: Recipe, *, resume: bool = False) -> dict[str, Any]:
    """Train `recipe` on this rank; returns a summary (rank 0's is complete)."""
    heartbeat = watchdog.start_heartbeat(rank=engine.world_info()[0], stall_timeout_s=recipe.run.stall_timeout_s)
    rt = setup_runtime(recipe)
    run_dir = Path(recipe.run.output_dir)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer, rt, run_dir)

    samples = data.train
    lengths = [len(s.input_ids) for s in samples]
    trained = [s.num_trained for s in samples]
    steps = batching.total_steps(num_samples=len(samples), global_batch_size=recipe.train.global_batch_size,
                                 max_steps=recipe.train.max_steps, epochs=recipe.train.epochs)

    point = find_resume_point(run_dir, rt, recipe, total_steps=steps, num_samples=len(samples)) if resume else None
    parts = build_training_engine(recipe, rt, load_universal=point is not None and point.universal)
    if rt.is_main:
        write_run_files(run_dir, recipe, parts.ds_config, rt)
    ds_engine, lm, layout, shape = parts.engine, parts.lm, parts.layout, parts.shape
    model_info = describe(lm)

    start_step = 0
    if point is not None:
        start_step = resume_from(ds_engine, point, rt)

    flops_per_tok_base = dict(matmul_params=shape.matmul_parameter_count(), layers=shape.num_hidden_layers,
                              hidden=shape.hidden_size)
    peak = metrics.detect_peak_flops()
    sink = metrics.MetricsSink(run_dir, enabled=rt.is_main, total_steps=steps, start_step=start_step)
    if rt.is_main:
        sink.write(f"model: {model_info['parameters']:,} parameters ({model_info['trainable']:,} trainable); "
                   f"{len(samples)} samples; {steps} steps; world {rt.world_size}; ZeRO-{recipe.zero.stage}; "
                   f"{rt.precision}; micro-batches/rank/step {layout.gradient_accumulation_steps}")
    evaluator = evaluate.Evaluator(recipe=recipe, samples=data.eval, tokenizer=tokenizer, ds_engine=ds_engine,
                                   lm=lm, rt=rt, sink=sink)
    if resume:
        evaluator.restore_best(checkpoint.read_best(run_dir), start_step=start_step)
    if not evaluator.enabled and (recipe.eval.every_steps or recipe.eval.generate_samples):
        sink.write("warning: [eval] is set but there is no eval set (data.eval_files / data.eval_fraction)")
    losses: list[float] = []
    try:
        for step in range(start_step, steps):
            heartbeat.beat(step, "train")
            indices = batching.step_sample_indices(step, num_samples=len(samples),
                                                   global_batch_size=recipe.train.global_batch_size,
                                                   seed=recipe.train.seed)
            plan = batching.plan_step(step, indices, lengths=lengths, trained=trained, layout=layout,
                                      packing=recipe.data.packing, token_budget=recipe.train.micro_batch_tokens)
            started = time.perf_counter()
            lr = recipe.train.lr * engine.lr_multiplier(step, train=recipe.train, total_steps=steps)
            with profile_step(run_dir / "profile", step + 1,
                              enabled=rt.is_main and recipe.train.profile_step == step + 1):
                engine.set_lr(ds_engine, lr)
                loss = train_step(ds_engine, plan, samples, rt=rt, packing=recipe.data.packing,
                                  pad_id=tokenizer.pad_token_id)
                grad_norm = engine.optimizer_step(ds_engine)
            if rt.on_gpu:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            losses.append(loss)
            if rt.is_main and ((step + 1) % recipe.train.log_every == 0 or step + 1 == steps):
                doc_lengths = [lengths[i] for i in indices]
                record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens": sum(doc_lengths), "trained_tokens": plan.trained_tokens, "step_time_s": elapsed,
                          **metrics.throughput(document_lengths=doc_lengths, elapsed_s=elapsed,
                                               world_size=rt.world_size, peak_flops_per_gpu=peak,
                                               **flops_per_tok_base)}
                if rt.on_gpu:
                    record["mem_gib"] = metrics.peak_memory_gib()
                sink.log(record)
            evaluator.maybe_run(step + 1, total_steps=steps)
            if recipe.checkpoint.every_steps and (step + 1) % recipe.checkpoint.every_steps == 0 and step + 1 < steps:
                save_checkpoint(ds_engine, run_dir, step + 1, recipe, rt, best=evaluator.best_to_keep(step + 1),
                                total_steps=steps, num_samples=len(samples))
        heartbeat.beat(steps, "final")
        if recipe.checkpoint.every_steps:
            save_checkpoint(ds_engine, run_dir, steps, recipe, rt, best=evaluator.best_to_keep(steps),
                            total_steps=steps, num_samples=len(samples))
        best = evaluator.best_to_keep(steps)
        if best is not None:
            sink.write(f"best eval loss {best[1]:.4f} at step {best[0]}: clustertune export {run_dir} --best")
    finally:
        sink.close()

    export_dir = run_dir / "final"
    checkpoint.export_hf_model(lm, tokenizer, export_dir, zero_stage=recipe.zero.stage, is_writer=rt.is_main,
                               lora_merge=recipe.lora.merge_on_export, dtype=model_dtype(rt.precision))
    engine.barrier()
    if rt.is_main:
        print(f"exported Hugging Face model to {export_dir}", flush=True)
    heartbeat.stop()  # beats through the export, which is long for big models; the launcher must not see silence
    return {"losses": losses, "steps": steps, "export_dir": str(export_dir), "model": lm, "tokenizer": tokenizer,
            "runtime": rt}


@dataclass
class TrainingEngine:
    engine: Any
    lm: Any
    layout: engine.BatchLayout
    shape: Any
    ds_config: dict[str, Any]
    hf_ds_config: Any  # keeps transformers' ZeRO-3 registration alive while the model lives


def build_training_engine(recipe: Recipe, rt: Runtime, *, load_universal: bool = False) -> TrainingEngine:
    """Model (partitioned at creation under ZeRO-3), kernels, LoRA, DeepSpeed engine."""
    layout = engine.batch_layout(recipe.train, world_size=rt.world_size, packing=recipe.data.packing)
    shape = shape_from_model_path(recipe.model.path)
    ds_config = engine.build_deepspeed_config(recipe.train, recipe.zero, layout=layout,
                                              precision=rt.precision, hidden_size=shape.hidden_size,
                                              load_universal=load_universal,
                                              node_local_storage=checkpoint.node_local_dir() is not None)
    zero3 = recipe.zero.stage == 3
    hf_ds_config, zero_init = engine.zero3_init_context(ds_config) if zero3 else (None, None)
    attn = attention_implementation(recipe.model, on_gpu=rt.on_gpu, packing=recipe.data.packing)
    lm = build_causal_lm(recipe.model, dtype=model_dtype(rt.precision), zero3_context=zero_init,
                         gradient_checkpointing=recipe.train.gradient_checkpointing, attn=attn,
                         liger=use_liger(recipe.model, on_gpu=rt.on_gpu))
    if recipe.train.compile:
        from clustertune.worker.kernels import compile_decoder_layers
        compile_decoder_layers(lm)
    lm = apply_lora(lm, recipe.lora)
    module = TokenLossModel(lm, varlen=attn == VARLEN_ATTENTION)
    ds_engine = engine.initialize(module, ds_config=ds_config, train=recipe.train, on_gpu=rt.on_gpu)
    return TrainingEngine(ds_engine, lm, layout, shape, ds_config, hf_ds_config)


def train_step(ds_engine, plan: batching.StepPlan, samples, *, rt: Runtime, packing: bool, pad_id: int) -> float:
    """Forward/backward over this rank's micro-batches of one step; returns the step's mean
    loss per trained token over all ranks."""
    mine = plan.per_rank[rt.rank]
    # DeepSpeed averages gradients over ranks; scaling by world size turns that average into the
    # sum over ranks, so the gradient is sum(token losses) / (step's trained tokens).
    scale = rt.world_size / max(1, plan.trained_tokens)
    loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    for m, group in enumerate(mine):
        batch = batching.collate([samples[i] for i in group], packing=packing, pad_id=pad_id)
        total = ds_engine(**batching.to_device(batch, rt.device))
        engine.backward(ds_engine, total * scale, is_last_micro_batch=m == len(mine) - 1)
        loss_sum += total.detach().double()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    return float(loss_sum) / max(1, plan.trained_tokens)


def save_checkpoint(ds_engine, run_dir: Path, step: int, recipe: Recipe, rt: Runtime,
                    best: tuple[int, float] | None = None, *, total_steps: int | None = None,
                    num_samples: int | None = None) -> None:
    """Every rank writes (and fsyncs) its shards and its RNG state; after a barrier the marker is
    written; after a second barrier the old checkpoints are rotated away, so a crash between
    markers never leaves nodes without a common complete step.
    `best`: (step, eval loss) of the best checkpoint so far (keep_best), recorded and kept."""
    tag = checkpoint.tag_for(step)
    root = checkpoint.checkpoint_root(run_dir)
    (root / tag).mkdir(parents=True, exist_ok=True)
    watchdog.fault_point("before_shards", rank=rt.rank, step=step)  # TEST-ONLY fault hook (no-op normally)
    torch.save(rng_state(rt), root / tag / rng_file(rt.rank))
    engine.save_checkpoint(ds_engine, root, tag, client_state={"step": step})
    watchdog.fault_point("after_shards", rank=rt.rank, step=step)
    engine.barrier()
    watchdog.fault_point("after_barrier", rank=rt.rank, step=step)
    # One marker writer and one rotator per filesystem: global rank 0 with a shared filesystem,
    # each node's local rank 0 when every node has its own directory (CLUSTERTUNE_NODE_LOCAL_DIR).
    writer = rt.local_rank == 0 if checkpoint.node_local_dir() is not None else rt.is_main
    if writer:
        per_epoch = batching.steps_per_epoch(num_samples or recipe.train.global_batch_size,
                                             recipe.train.global_batch_size)
        checkpoint.write_marker(root / tag, checkpoint.marker_info(
            step=step, world_size=rt.world_size, zero_stage=recipe.zero.stage, recipe=recipe,
            total_steps=total_steps or step, num_samples=num_samples or 0,
            global_batch_size=recipe.train.global_batch_size, steps_per_epoch=max(1, per_epoch),
            nodes=node_count(rt), deepspeed_version=engine.deepspeed_version()))
        if best is not None:
            checkpoint.write_best(run_dir, step=best[0], eval_loss=best[1])
    engine.barrier()
    if writer:
        checkpoint.rotate(run_dir, recipe.checkpoint.keep_last, protect={best[0]} if best else frozenset())
    engine.barrier()


# ------------------------------------------------------------------------------ resume

@dataclass
class ResumePoint:
    step: int
    directory: Path  # checkpoints/step_N (on this node)
    marker: dict[str, Any]
    universal: bool  # saved on another world size / ZeRO stage: load its universal conversion


def node_count(rt: Runtime) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", rt.world_size)) or rt.world_size)
    return max(1, rt.world_size // max(1, local))


def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank:05d}.pt"


def rng_state(rt: Runtime) -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if rt.on_gpu:
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    return state


def restore_rng(state: dict[str, Any], rt: Runtime) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if rt.on_gpu and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], rt.device)


def find_resume_point(run_dir: Path, rt: Runtime, recipe: Recipe, *, total_steps: int,
                      num_samples: int) -> ResumePoint | None:
    """The newest step complete on every node (ranks agree by all-gathering the complete steps
    each one sees), prepared for loading: converted to a universal checkpoint (by one process)
    when it was saved on another world size or ZeRO stage. Collective: call on every rank."""
    mine = [step for step, _ in checkpoint.complete_checkpoints(run_dir)]
    everyone: list[Any] = [mine]
    if dist.is_initialized() and rt.world_size > 1:
        everyone = [None] * rt.world_size
        dist.all_gather_object(everyone, mine)
    step = checkpoint.newest_common_step(everyone)
    if step is None:
        if rt.is_main:
            seen = sorted({s for steps in everyone for s in steps})
            print("--resume: no checkpoint complete on every node" + (f" (complete somewhere: {seen})" if seen
                  else "") + ", starting from step 0", flush=True)
        return None
    directory = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(step)
    marker = checkpoint.read_marker(directory)
    if rt.is_main:
        if mine and mine[-1] != step:
            print(f"resume: step {mine[-1]} is not complete on every node; taking step {step}", flush=True)
        for problem in checkpoint.resume_problems(marker, recipe=recipe, total_steps=total_steps,
                                                  num_samples=num_samples):
            print(f"warning: resume will not be exact: {problem}", flush=True)
    old_world, old_stage = marker.get("world_size", rt.world_size), marker.get("zero_stage", recipe.zero.stage)
    universal = old_world != rt.world_size or old_stage != recipe.zero.stage
    if universal:
        node_local = checkpoint.node_local_dir() is not None
        if node_local and max(int(marker.get("nodes", 1)), node_count(rt)) > 1:
            raise RuntimeError(
                f"resume: checkpoint step {step} was saved by world size {old_world} (ZeRO-{old_stage}) and this "
                f"run has world size {rt.world_size} (ZeRO-{recipe.zero.stage}); changing it needs every rank's "
                f"shards in one directory, but {checkpoint.NODE_LOCAL_ENV} keeps them per node. Copy every "
                f"node's {directory.name} into one directory and resume with a shared checkpoint directory")

        def convert() -> None:
            print(f"resume: step {step} was saved with world size {old_world} (ZeRO-{old_stage}); converting it "
                  f"to a universal checkpoint for world size {rt.world_size}", flush=True)
            watchdog.fault_point("universal_conversion", rank=rt.rank, step=step)  # TEST-ONLY hook
            engine.convert_to_universal(directory, directory / "universal")

        engine.while_others_wait(convert, works=rt.is_main, timeout_s=LONG_WAIT_S)
    return ResumePoint(step, directory, marker, universal)


def resume_from(ds_engine, point: ResumePoint, rt: Runtime) -> int:
    """Load model, optimizer and this rank's RNG; returns the step to continue from. Data order
    and LR are pure functions of the step, so nothing else needs restoring."""
    if point.universal:
        state = engine.load_checkpoint(ds_engine, point.directory, "universal")
    else:
        state = engine.load_checkpoint(ds_engine, point.directory.parent, point.directory.name)
    step = int(state.get("step", point.step))
    rng = point.directory / rng_file(rt.rank)
    if rng.is_file():
        restore_rng(torch.load(rng, weights_only=False), rt)
    elif rt.is_main:
        print(f"resume: no saved RNG state for rank {rt.rank} (world size changed); keeping the seeded one",
              flush=True)
    if rt.is_main:
        print(f"resumed from {point.directory} (step {step})", flush=True)
    return step
