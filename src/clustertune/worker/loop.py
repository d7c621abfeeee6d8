"""The worker's run, one process per rank: set up -> data -> model assembly -> (resume) -> the
training loop -> final checkpoint -> export.

Started through clustertune.supervisor (`train` on one machine, `launch` with DeepSpeed's launcher,
torchrun or Slurm across nodes) and the per-rank wrapper cluster/rankexec.py, never directly by
users; see clustertune.worker for the command line.

The loop core is the same for every objective (worker/objectives): step plan -> forwards and
backwards (worker/step.py) -> optimizer step -> metrics, eval, checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from clustertune import watchdog
from clustertune.batch_math import lr_multiplier, total_steps
from clustertune.config import Recipe
from clustertune.worker import batching, checkpoint, distributed, engine, evaluate, metrics
from clustertune.worker.assemble import TrainingParts, assemble
from clustertune.worker.dataset import prepare_data
from clustertune.worker.export import export_hf_model
from clustertune.worker.model import describe, load_tokenizer, model_dtype
from clustertune.worker.nonfinite import NonFiniteGuard, is_nonfinite
from clustertune.worker.objectives import Objective, objective_for
from clustertune.worker.profiling import profile_step
from clustertune.worker.resume import find_resume_point, resume_from
from clustertune.worker.runtime import Runtime, setup_runtime, write_run_files
from clustertune.worker.save import save_checkpoint
from clustertune.worker.step import forward_backward


def run(recipe: Recipe, *, resume: bool = False) -> None:
    """Train `recipe` on this rank, save its checkpoints and export the model to RUN_DIR/final."""
    from clustertune.auto import require_resolved
    require_resolved(recipe)  # "auto" keys are the launcher's to resolve, once, for every rank
    heartbeat = watchdog.start_heartbeat(rank=distributed.world_info()[0], stall_timeout_s=recipe.run.stall_timeout_s)
    startup = StartupClock()
    rt = setup_runtime(recipe.train, collective_timeout_s=recipe.run.collective_timeout_s)
    run_dir = Path(recipe.run.output_dir)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, seed=recipe.train.seed, rt=rt, run_dir=run_dir,
                        objective=recipe.train.objective)
    objective = objective_for(recipe.train.objective, packing=recipe.data.packing, pad_id=tokenizer.pad_token_id,
                              dpo=recipe.dpo, token_budget=recipe.train.micro_batch_tokens, grpo=recipe.grpo,
                              tokenizer=tokenizer)
    steps = total_steps(num_samples=len(data.train), global_batch_size=samples_per_step(recipe, objective),
                        max_steps=recipe.train.max_steps, epochs=recipe.train.epochs)
    startup.lap("data")

    point = find_resume_point(run_dir, rt, recipe, total_steps=steps, num_samples=len(data.train)) if resume else None
    parts = assemble(recipe, rt, objective, load_universal=point is not None and point.universal)
    startup.lap("model and engine")
    if rt.is_main:
        write_run_files(run_dir, recipe, parts.ds_config, rt)
    objective.before_training(parts, data, rt=rt, run_dir=run_dir, resuming=point is not None, heartbeat=heartbeat)
    start_step = resume_from(parts.ds_engine, point, rt) if point is not None else 0
    startup.lap("resume" if point is not None else f"{recipe.train.objective} set-up")

    sink = metrics.MetricsSink(run_dir, enabled=rt.is_main, total_steps=steps, start_step=start_step)
    model_info = describe(parts.lm)
    sink.write(f"model: {model_info['parameters']:,} parameters ({model_info['trainable']:,} trainable); "
               f"{len(data.train)} samples; {steps} steps; world {rt.world_size}; ZeRO-{recipe.zero.stage}; "
               f"{rt.precision}; micro-batches/rank/step {parts.layout.gradient_accumulation_steps}")
    evaluator = evaluate.Evaluator(recipe=recipe, objective=objective, samples=data.eval, tokenizer=tokenizer,
                                   ds_engine=parts.ds_engine, lm=parts.lm, rt=rt, sink=sink)
    if resume:
        evaluator.restore_best(checkpoint.read_best(run_dir), start_step=start_step)
    if not evaluator.enabled and (recipe.eval.every_steps or recipe.eval.generate_samples):
        sink.write("warning: [eval] is set but there is no eval set (data.eval_files / data.eval_fraction)")
    try:
        loop = TrainingLoop(recipe=recipe, rt=rt, parts=parts, objective=objective, samples=data.train,
                            total_steps=steps, run_dir=run_dir, evaluator=evaluator, sink=sink, heartbeat=heartbeat,
                            startup=startup)
        loop.train(start_step)
        heartbeat.beat(steps, "final")
        if recipe.checkpoint.every_steps:
            loop.save(steps)
        best = evaluator.best_to_keep(steps)
        if best is not None:
            sink.write(f"best eval loss {best[1]:.4f} at step {best[0]}: clustertune export {run_dir} --best")
    finally:
        sink.close()

    export_dir = run_dir / "final"
    export_hf_model(parts.lm, tokenizer, export_dir, zero_stage=recipe.zero.stage, is_writer=rt.is_main,
                    lora_merge=recipe.lora.merge_on_export, dtype=model_dtype(rt.precision))
    distributed.barrier()
    if rt.is_main:
        print(f"exported Hugging Face model to {export_dir}", flush=True)
    heartbeat.stop()  # beats through the export, which is long for big models; the launcher must not see silence


class StartupClock:
    """Where the time before the first step went (users wait through all of it): one line,
    `first step after 41.2 s: data 3.1 s, model and engine 30.4 s, ...`."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self.last))
        self.last = now

    def total(self) -> float:
        return self.last - self.started

    def summary(self) -> str:
        return f"first step after {self.total():.1f} s: " + ", ".join(f"{n} {t:.1f} s" for n, t in self.laps)


def samples_per_step(recipe: Recipe, objective: Objective) -> int:
    """Data samples an optimizer step takes: the global batch, or for GRPO its prompts (the global
    batch counts completions, group_size per prompt)."""
    return recipe.train.global_batch_size // getattr(objective, "group_size", 1)


class TrainingLoop:
    """Steps start_step..total_steps-1: plan -> forwards/backwards -> optimizer step -> metrics,
    eval, periodic checkpoint. Every rank runs it (collective)."""

    def __init__(self, *, recipe: Recipe, rt: Runtime, parts: TrainingParts, objective: Objective,
                 samples: list[Any], total_steps: int, run_dir: Path, evaluator: evaluate.Evaluator,
                 sink: metrics.MetricsSink, heartbeat: watchdog.Heartbeat, startup: "StartupClock | None" = None):
        self.recipe, self.rt, self.parts, self.objective = recipe, rt, parts, objective
        self.startup = startup
        self.samples, self.total_steps, self.run_dir = samples, total_steps, run_dir
        self.evaluator, self.sink, self.heartbeat = evaluator, sink, heartbeat
        self.lengths = [len(s.input_ids) for s in samples]
        self.units = [objective.loss_units(s) for s in samples]
        shape = parts.shape
        self.flops_base = dict(matmul_params=shape.matmul_parameter_count(), layers=shape.num_hidden_layers,
                               hidden=shape.hidden_size)
        self.peak_flops = metrics.detect_peak_flops()
        self.guard = NonFiniteGuard(max_in_row=recipe.train.max_nonfinite_steps)
        self.warned_alloc_retries = False

    def train(self, start_step: int) -> None:
        train, every = self.recipe.train, self.recipe.checkpoint.every_steps
        for step in range(start_step, self.total_steps):
            self.heartbeat.beat(step, "train")
            done = step + 1  # optimizer steps completed after this one (1-based, as logged and saved)
            record, outcome = self.step(step)
            nonfinite = is_nonfinite(record["loss"], outcome.grad_norm)
            if nonfinite:
                record["skipped"] = not outcome.applied
            if self.startup is not None and step == start_step:
                self.startup.lap("first step")
                record["time_to_first_step_s"] = round(self.startup.total(), 2)
                self.sink.write(self.startup.summary())
            if self.rt.is_main and (nonfinite or done % train.log_every == 0 or done == self.total_steps):
                self.sink.log(record)
            warning = metrics.alloc_retry_warning(step=done, retries=record.get("alloc_retries", 0),
                                                  warned=self.warned_alloc_retries)
            if warning and self.rt.is_main:
                self.sink.write(warning)
                self.warned_alloc_retries = True
            # Raises TrainingDiverged on every rank together: all see the same all-reduced values.
            if self.guard.check(step=done, loss=record["loss"], grad_norm=outcome.grad_norm, applied=outcome.applied):
                self.sink.write(self.guard.message(done, loss=record["loss"], grad_norm=outcome.grad_norm))
            self.evaluator.maybe_run(done, total_steps=self.total_steps)
            if every and done % every == 0 and done < self.total_steps:
                self.save(done)

    def step(self, step: int) -> tuple[dict[str, Any], engine.OptimizerStep]:
        """One optimizer step; returns its metrics record and the optimizer's outcome."""
        train, rt, ds_engine = self.recipe.train, self.rt, self.parts.ds_engine
        indices = batching.step_sample_indices(step, num_samples=len(self.samples),
                                               global_batch_size=samples_per_step(self.recipe, self.objective),
                                               seed=train.seed)
        samples, lengths, units = self.samples, self.lengths, self.units
        if hasattr(self.objective, "rollout"):  # GRPO: the step trains on completions sampled now
            samples = self.objective.rollout(step, indices, self.samples, rt=rt, seed=train.seed)
            indices = list(range(len(samples)))
            lengths = [len(s.input_ids) for s in samples]
            units = [self.objective.loss_units(s) for s in samples]
        plan = batching.plan_step(step, indices, lengths=lengths, units=units, layout=self.parts.layout,
                                  packing=self.recipe.data.packing, token_budget=train.micro_batch_tokens)
        # What stays allocated between steps (weights, gradient buffers, optimizer states): the step's
        # peak minus this is what its activations and transients took (clustertune.plan's split).
        resident_gib = metrics.allocated_gib() if rt.on_gpu else None
        started = time.perf_counter()
        lr = train.lr * lr_multiplier(step, train=train, total_steps=self.total_steps)
        with profile_step(self.run_dir / "profile", step + 1, kernels_only=train.profile_kernels_only,
                          enabled=rt.is_main and train.profile_step == step + 1):
            engine.set_lr(ds_engine, lr)
            result = forward_backward(ds_engine, self.objective, plan, samples, rt=rt)
            outcome = engine.optimizer_step(ds_engine)
            if rt.on_gpu:
                torch.cuda.synchronize()
            # Inside the profiled block: the step's time, not the seconds its profile takes to write.
            elapsed = time.perf_counter() - started
        doc_lengths = [lengths[i] for i in indices]
        record = {"step": step + 1, "loss": result.loss, "lr": lr,
                  **({} if outcome.grad_norm is None else {"grad_norm": outcome.grad_norm}),
                  "tokens": sum(doc_lengths), **self.objective.step_metrics(result.metric_sums, plan),
                  "step_time_s": elapsed,
                  **metrics.throughput(document_lengths=doc_lengths, elapsed_s=elapsed, world_size=rt.world_size,
                                       peak_flops_per_gpu=self.peak_flops, **self.flops_base)}
        if rt.on_gpu:
            record["mem_gib"] = metrics.peak_memory_gib()
            record["mem_reserved_gib"] = metrics.peak_reserved_gib()
            record["mem_resident_gib"] = resident_gib
            record["alloc_retries"] = metrics.alloc_retries()
        return record, outcome

    def save(self, step: int) -> None:
        save_checkpoint(self.parts.ds_engine, self.run_dir, step, self.recipe, self.rt,
                        best=self.evaluator.best_to_keep(step), total_steps=self.total_steps,
                        num_samples=len(self.samples))
