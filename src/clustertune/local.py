"""One-machine commands: `clustertune demo`, `train`, `validate`, `export`.

    clustertune                                   # the embedded demo
    clustertune train configs/qwen2.5-1.5b-sft-1gpu.toml --set train.lr=1e-5
    clustertune validate configs/qwen2.5-1.5b-sft-1gpu.toml

`train` starts one worker per local GPU (or 2 on CPU) directly, streams their output with
rank prefixes into RUN_DIR/logs/, and stops all of them when one fails or on Ctrl-C. This side
never imports torch: workers are separate processes (python -m clustertune.worker).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from clustertune.config import Recipe, load_recipe, recipe_to_toml
from clustertune.gpus import local_gpu_count
from clustertune.watchdog import STALL_EXIT_CODE, StallMonitor, parse_heartbeat


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_launch_recipe(recipe: Recipe) -> Path:
    """The resolved recipe every worker reads, so overrides are applied once, in one place."""
    run_dir = Path(recipe.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "launch_recipe.toml"
    path.write_text(recipe_to_toml(recipe))
    return path


def worker_env(*, rank: int, world: int, port: int, on_gpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    if not on_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Two ranks on a small CPU box: one thread each avoids oversubscription.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // world)))
    return env


def _pump(stream, prefix: str, log_file, echo, monitor: StallMonitor) -> None:
    for line in iter(stream.readline, ""):
        beat = parse_heartbeat(line)
        if beat is not None:  # liveness for the stall monitor, not for the user or the log
            monitor.record(beat[0], None, beat[1], beat[2])
            continue
        log_file.write(line)
        log_file.flush()
        if echo:
            sys.stderr.write(f"{prefix}{line}")
    stream.close()


def check_data_before_start(recipe: Recipe) -> None:
    """Every record of the data files parsed and validated here, so bad input is one clear
    error (file:line) before any worker takes a GPU."""
    from clustertune.data import check_records
    report = check_records(recipe.data)
    print(f"data: {report.valid} records in {len(report.files)} file(s) read"
          + (f", {report.total_lines - report.valid} invalid skipped (data.skip_invalid)"
             if report.total_lines > report.valid else ""), file=sys.stderr)


def run_local_workers(recipe: Recipe, *, nproc: int, resume: bool, on_gpu: bool) -> int:
    """Start `nproc` workers on this machine and supervise them; returns the run's exit code."""
    check_data_before_start(recipe)
    launch_recipe = write_launch_recipe(recipe)
    logs = Path(recipe.run.output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "clustertune.worker", str(launch_recipe)] + (["--resume"] if resume else [])
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    monitor = StallMonitor(timeout=recipe.run.stall_timeout_s)
    for rank in range(nproc):
        log_file = open(logs / f"rank{rank}.log", "w", encoding="utf-8")
        # Rank 0 keeps the terminal's stderr for its progress bar; its stdout and every other
        # rank's output are prefixed and saved.
        proc = subprocess.Popen(cmd, env=worker_env(rank=rank, world=nproc, port=port, on_gpu=on_gpu),
                                stdout=subprocess.PIPE, stderr=None if rank == 0 else subprocess.STDOUT,
                                text=True, start_new_session=True)
        procs.append(proc)
        thread = threading.Thread(target=_pump, args=(proc.stdout, f"[rank {rank}] ", log_file, True, monitor),
                                  daemon=True)
        thread.start()
        pumps.append(thread)
    return _supervise(procs, pumps, monitor)


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM each worker's process group (started with start_new_session), SIGKILL stragglers."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _supervise(procs: list[subprocess.Popen], pumps: list[threading.Thread], monitor: StallMonitor) -> int:
    failed: tuple[int, int] | None = None
    try:
        while True:
            hang = monitor.check()
            if hang is not None:
                print(f"error: {hang}; stopping all workers", file=sys.stderr)
                _stop(procs)
                return STALL_EXIT_CODE
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping all workers", file=sys.stderr)
        _stop(procs)
        return 130
    if failed is not None:
        rank, code = failed
        print(f"error: rank {rank} exited with code {code}; stopping the other workers", file=sys.stderr)
        _stop(procs)
    for t in pumps:
        t.join(timeout=5)
    return failed[1] if failed else 0


def default_nproc(on_gpu: bool) -> int:
    return max(1, local_gpu_count()) if on_gpu else 2


def cmd_train(args) -> int:
    if args.recipe is None and not args.overrides:
        return cmd_demo(args)
    recipe = load_recipe(args.recipe, args.overrides)
    on_gpu = recipe.train.device == "cuda" or (recipe.train.device == "auto" and local_gpu_count() > 0)
    nproc = args.nproc or default_nproc(on_gpu)
    return run_local_workers(recipe, nproc=nproc, resume=args.resume, on_gpu=on_gpu)


def cmd_demo(args) -> int:
    """Accuracy of a fresh model, 2-process ZeRO-2 training on CPU, accuracy of the export."""
    recipe = load_recipe(None, getattr(args, "overrides", []))
    nproc = getattr(args, "nproc", None) or 2
    run_dir = Path(recipe.run.output_dir)
    started = time.monotonic()
    evaluate = [sys.executable, "-m", "clustertune.worker.demo_eval"]
    code = subprocess.run(evaluate + ["--random-init", "--seed", str(recipe.train.seed)]).returncode
    if code:
        return code
    code = run_local_workers(recipe, nproc=nproc, resume=False, on_gpu=False)
    if code:
        return code
    code = subprocess.run(evaluate + [str(run_dir / "final")]).returncode
    print(f"demo finished in {time.monotonic() - started:.0f} s; model in {run_dir / 'final'}", file=sys.stderr)
    return code


def cmd_validate(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe_to_toml(recipe))
    if args.no_data:
        return 0
    from clustertune.data import prepare_dataset
    from clustertune.worker.model import load_tokenizer
    import tempfile
    tokenizer = load_tokenizer(recipe.model)
    with tempfile.TemporaryDirectory() as cache:
        # prepare_dataset prints its report (counts per reason) through `log`
        prepare_dataset(recipe.data, tokenizer, seed=recipe.train.seed, cache_dir=Path(cache))
    return 0


def cmd_export(args) -> int:
    """clustertune export RUN_DIR [--out DIR] [--best]: newest complete checkpoint (or the best
    one by eval loss) -> HF safetensors."""
    import json
    run_dir = Path(args.run_dir)
    recipe_file = run_dir / "recipe.toml"
    if not recipe_file.is_file():
        print(f"error: {run_dir} is not a clustertune run directory (no recipe.toml)", file=sys.stderr)
        return 2
    recipe = load_recipe(recipe_file)
    world = json.loads((run_dir / "world.json").read_text()) if (run_dir / "world.json").is_file() else {}
    out = Path(args.out) if args.out else run_dir / "export"
    from clustertune.worker.checkpoint import export_from_checkpoint
    step = export_from_checkpoint(run_dir, out, model_section=recipe.model, lora_section=recipe.lora,
                                  precision=world.get("precision", "bf16"), best=getattr(args, "best", False))
    which = "best " if getattr(args, "best", False) else ""
    print(f"exported {which}step {step} of {run_dir} to {out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0
