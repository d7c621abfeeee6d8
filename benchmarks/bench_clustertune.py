"""clustertune's own training path on one GPU, on the benchmark workload (benchmarks/workload.py):
the real model assembly, step plans, packing, kernels and forward/backward step from src/clustertune.

    PYTHONPATH=src python3 benchmarks/bench_clustertune.py --shape qwen2.5-1.5b --stage 2 \
        --mode var --seq 4096 --batch 32 --budget 16384 --gc --steps 30
"""
import argparse, json, os, socket, statistics, sys, threading, time

STARTED = time.perf_counter()

sys.path.insert(0, os.path.dirname(__file__))
from workload import sample_lengths, sample_tokens  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--shape", default="qwen2.5-1.5b", help="built-in shape or an HF directory (--init)")
p.add_argument("--layers", type=int, default=None, help="truncate the shape to this many layers")
p.add_argument("--stage", type=int, default=2); p.add_argument("--mode", default="var")
p.add_argument("--seq", type=int, default=4096); p.add_argument("--batch", type=int, default=32, help="samples per step")
p.add_argument("--budget", type=int, default=16384, help="tokens per packed micro-batch")
p.add_argument("--gc", action="store_true"); p.add_argument("--steps", type=int, default=30)
p.add_argument("--no-liger", action="store_true"); p.add_argument("--attn", default="auto")
p.add_argument("--no-pack", action="store_true", help="padded micro-batches of --mbs samples")
p.add_argument("--mbs", type=int, default=4)
p.add_argument("--order", choices=["sequential", "shuffled"], default="sequential",
               help="samples per step: in order (the HF peers' sequential sampler, for the loss gate) or "
                    "the CLI's seeded epoch permutation (benchmarks/cli_vs_harness.py: the same rows as the CLI)")
p.add_argument("--persist", type=int, default=None, help="zero.param_persistence_threshold")
p.add_argument("--subgroup", type=int, default=None, help="zero.sub_group_size (ZeRO-3)")
p.add_argument("--offload", action="store_true", help="zero.offload_optimizer (CPU Adam)")
p.add_argument("--compile", action="store_true", help="train.compile (regional torch.compile)")
p.add_argument("--lr", type=float, default=1e-5); p.add_argument("--tag", default="")
p.add_argument("--device", default="cuda", help="cpu: smoke-test this script without a GPU")
p.add_argument("--profile", default=None, help="directory: profile step N-2 into DIR/step_K.txt (+ trace)")
p.add_argument("--liger-layer-kernels", default=None,
               help="comma list overriding clustertune.worker.kernels.LIGER_LAYER_KERNELS (rope,rms_norm,swiglu; "
                    "'' for none: HF's own ops in the layers, the fused loss stays) for an A/B")
p.add_argument("--liger-chunk-mem-const", type=int, default=None,
               help="override clustertune.plan.LIGER_CHUNK_MEM_CONST (the fused loss's chunk size) for an A/B; "
                    "1 is Liger's own default")
p.add_argument("--lean-mlp", choices=["on", "off"], default=None,
               help="override clustertune.plan.LEAN_MLP (the MLP recomputes silu(gate) * up in backward) for an A/B")
p.add_argument("--diagnose", action="store_true",
               help="where the step's time goes: the host's enqueue time per step (before the closing sync) "
                    "and every synchronizing CUDA call of step N-2 with its caller (torch.cuda.set_sync_debug_mode)")
p.add_argument("--every-n", type=int, default=1, help="train.checkpoint_every_n_layers (with --gc)")
p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON",
               help="recipe override, e.g. --set zero.grad_accum_dtype='\"fp32\"' (repeatable)")
p.add_argument("--busy", action="store_true",
               help="GPU busy share of step N-2 from a kernels-only profile (no CPU ops recorded, so the host "
                    "runs at about its unprofiled speed); written with --profile's layout into --profile or /tmp")
p.add_argument("--cu-seqlens-on-gpu", action="store_true",
               help="issue 13's lever 'cu_seqlens on the CPU in collate', its before: collate's sample boundaries "
                    "dropped, so the model derives them from position ids on the GPU (two syncs per micro-batch)")
a = p.parse_args()

os.environ.setdefault("RANK", "0"); os.environ.setdefault("LOCAL_RANK", "0"); os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
from clustertune import contract  # noqa: E402
# The workers' allocator default (worker/__main__), set before torch starts CUDA: the harness measures the
# memory `clustertune train` runs with (without it, rows at the card's edge retried allocations).
os.environ.setdefault(contract.ALLOC_CONF_ENV, contract.WORKER_DEFAULT_ALLOC_CONF)
if "MASTER_PORT" not in os.environ:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); os.environ["MASTER_PORT"] = str(s.getsockname()[1])

import torch  # noqa: E402

from clustertune import shapes  # noqa: E402
from clustertune.worker import batching, engine  # noqa: E402
from clustertune.worker.assemble import assemble  # noqa: E402
from clustertune.worker.objectives import objective_for  # noqa: E402
from clustertune.worker.runtime import setup_runtime  # noqa: E402
from clustertune.worker.step import forward_backward  # noqa: E402
from clustertune.worker.profiling import profile_step  # noqa: E402
from pathlib import Path  # noqa: E402
from clustertune.config import recipe_from_dict  # noqa: E402
from clustertune.data import Sample  # noqa: E402

model_path = a.shape
if a.layers:  # a truncated built-in shape, registered under a new name for this process
    import dataclasses
    base = shapes.lookup_shape(a.shape)
    model_path = f"{a.shape}-{a.layers}l"
    shapes.SHAPES[model_path] = dataclasses.replace(base, num_hidden_layers=a.layers)

recipe_dict = {
    "run": {"output_dir": "/tmp/bench_run"},
    "model": {"path": model_path, "liger": "off" if a.no_liger else "on", "attn_implementation": a.attn},
    # Samples are generated below (benchmarks/workload.py); the file list only satisfies the schema.
    "data": {"train_files": ["<synthetic: benchmarks/workload.py>"], "packing": not a.no_pack, "max_length": a.seq},
    "train": {"max_steps": a.steps, "global_batch_size": a.batch, "micro_batch_size": a.mbs,
              "micro_batch_tokens": max(a.budget, a.seq), "lr": a.lr, "schedule": "constant",
              "adam_beta2": 0.999, "grad_clip": 1.0, "gradient_checkpointing": a.gc,
              "checkpoint_every_n_layers": a.every_n, "device": a.device, "compile": a.compile},
    "zero": {"stage": a.stage, "offload_optimizer": a.offload, **({"param_persistence_threshold": a.persist} if a.persist is not None else {}),
             **({"sub_group_size": a.subgroup} if a.subgroup is not None else {})},
}
for override in a.set:
    dotted, _, value = override.partition("=")
    section, _, key = dotted.partition(".")
    recipe_dict.setdefault(section, {})[key] = json.loads(value)
recipe = recipe_from_dict(recipe_dict)
rt = setup_runtime(recipe.train, collective_timeout_s=recipe.run.collective_timeout_s)
objective = objective_for(packing=recipe.data.packing, pad_id=0)


class HostPeak:
    """This node's host memory in use, sampled every 0.5 s, above what it was before the engine."""

    def __init__(self):
        import psutil
        self._vm = psutil.virtual_memory
        self.base = self._vm().used
        self.peak = self.base
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            vm = self._vm()
            self.peak = max(self.peak, vm.used)
            if vm.available < 6 * 2**30:  # stop before the kernel's OOM killer takes the machine
                print(f"HOST-OOM-GUARD: {vm.available / 2**30:.1f} GiB available, used {self.gib:.1f} GiB above "
                      f"the start; stopping", flush=True)
                os._exit(3)
            time.sleep(0.5)

    @property
    def gib(self) -> float:
        return (self.peak - self.base) / 2**30


if a.liger_layer_kernels is not None:  # our own constant, read by worker/kernels.py when the model is built
    from clustertune.worker import kernels as worker_kernels
    worker_kernels.LIGER_LAYER_KERNELS = tuple(k for k in a.liger_layer_kernels.split(",") if k)
if a.liger_chunk_mem_const is not None:  # our own constant, read by worker/kernels.py when the model is built
    from clustertune import plan as planner
    planner.LIGER_CHUNK_MEM_CONST = a.liger_chunk_mem_const

if a.lean_mlp is not None:  # our own constant, read by plan.lean_mlp_applies when the model is built
    from clustertune import plan as planner
    planner.LEAN_MLP = a.lean_mlp == "on"

if a.cu_seqlens_on_gpu:  # our own function, called through the module by the objectives
    collate_with_boundaries = batching.collate

    def collate_without_boundaries(*args, **kwargs):
        batch = collate_with_boundaries(*args, **kwargs)
        batch.pop("cu_seq_lens", None), batch.pop("max_length", None)
        return batch
    batching.collate = collate_without_boundaries

host = HostPeak()
built_at = time.perf_counter()
parts = assemble(recipe, rt, objective)
engine_s = time.perf_counter() - built_at
first_step_at = None
shape = parts.shape

n_samples = a.steps * a.batch
lengths = sample_lengths(a.mode, n_samples, a.seq)
samples = []
for i, n in enumerate(lengths):
    ids = sample_tokens(i, n, vocab=shape.vocab_size).tolist()
    samples.append(Sample(ids, ids[1:] + [-100]))
units = [objective.loss_units(s) for s in samples]

def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SyncLog:
    """Every synchronizing CUDA call while active, keyed by its innermost caller outside torch."""
    def __init__(self): self.calls = {}
    def __enter__(self):
        import traceback, warnings
        self._saved = warnings.showwarning
        def record(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}({f.name})" for f in frames[-3:][::-1])
            self.calls[where] = self.calls.get(where, 0) + 1
        warnings.showwarning = record
        self._filters = warnings.catch_warnings(); self._filters.__enter__(); warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn"); return self
    def __exit__(self, *exc):
        import warnings
        torch.cuda.set_sync_debug_mode("default"); self._filters.__exit__(*exc); warnings.showwarning = self._saved


host_times, sync_calls = [], {}
times, losses = [], []
for step in range(a.steps):
    indices = (batching.step_sample_indices(step, num_samples=n_samples, global_batch_size=a.batch,
                                            seed=recipe.train.seed) if a.order == "shuffled"
               else list(range(step * a.batch, (step + 1) * a.batch)))
    plan = batching.plan_step(step, indices, lengths=lengths, units=units, layout=parts.layout,
                              packing=recipe.data.packing, token_budget=recipe.train.micro_batch_tokens)
    sync(); t0 = time.perf_counter()
    # the CLI's own profiler (train.profile_step) on the same step number, written to the same layout
    watch = SyncLog() if a.diagnose and torch.cuda.is_available() and step == a.steps - 3 else None
    with profile_step(Path(a.profile or "/tmp/bench_busy"), step + 1, kernels_only=a.busy,
                      enabled=bool(a.profile or a.busy) and step == a.steps - 3):
        if watch: watch.__enter__()
        engine.set_lr(parts.ds_engine, a.lr)
        losses.append(forward_backward(parts.ds_engine, objective, plan, samples, rt=rt).loss)
        engine.optimizer_step(parts.ds_engine)
        if watch: watch.__exit__(None, None, None); sync_calls = watch.calls
    host_times.append(time.perf_counter() - t0)
    sync(); times.append(time.perf_counter() - t0)
    if first_step_at is None:
        first_step_at = time.perf_counter() - STARTED

step_s = statistics.median(times[5:]) if len(times) > 6 else statistics.median(times)
tok_step = sum(lengths) / a.steps  # whole step, all ranks: plan_step splits each step's samples over the ranks
from clustertune import flops  # noqa: E402  (the same MFU arithmetic and peak table as the worker and the planner)
fpt = flops.model_flops_per_token(shape, flops.effective_context(lengths))
tps = tok_step / step_s
gpu_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
peak = flops.peak_flops_per_gpu(gpu_name) or 0.0
if rt.rank != 0:  # one line per run; rank 0's peak memory stands for every rank (same shapes)
    sys.exit(0)
print("RESULT " + json.dumps({"impl": "clustertune", "world_size": rt.world_size, "gpu": gpu_name, "tag": a.tag, "shape": model_path, "stage": a.stage, "mode": a.mode,
      "seq": a.seq, "batch": a.batch, "budget": a.budget, "packed": not a.no_pack, "gc": a.gc,
      "liger": not a.no_liger, "attn": parts.lm.config._attn_implementation,
      "tokens_per_step": round(tok_step), "step_s": round(step_s, 4), "tok_per_s": round(tps),
      "tok_per_s_per_gpu": round(tps / rt.world_size),
      "mfu": round(flops.mfu(cluster_tokens_per_s=tps, flops_per_tok=fpt, world_size=rt.world_size,
                             peak_flops_per_gpu=peak), 4),
      # GiB (the key keeps its old name for the logs' readers: plan_validation.py, bench.py)
      "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0,
      "offload": a.offload, "layers": shape.num_hidden_layers, "liger_chunk_mem_const": a.liger_chunk_mem_const, "liger_layer_kernels": a.liger_layer_kernels, "lean_mlp": a.lean_mlp, "every_n": a.every_n,
      "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries") if torch.cuda.is_available() else None,
      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else 0,
      "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "engine_build_s": round(engine_s, 1),
      "time_to_first_step_s": round(first_step_at, 1), "host_peak_gib_node": round(host.gib, 1),
      "step_times": [round(t, 3) for t in times], "losses": losses[:20],
      "overrides": a.set, "every_n": a.every_n, "optimizer": type(parts.ds_engine.optimizer).__name__,
      **({"busy": (Path(a.profile or "/tmp/bench_busy") / f"step_{a.steps - 2}.txt").read_text().splitlines()[0]}
         if a.busy else {}),
      **({"host_enqueue_s": round(statistics.median(host_times[5:] or host_times), 4),
          "sync_calls": dict(sorted(sync_calls.items(), key=lambda kv: -kv[1])[:12])} if a.diagnose else {})}),
      flush=True)
