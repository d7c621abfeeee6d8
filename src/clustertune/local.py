"""One-machine commands: `clustertune demo`, `train`, `validate`, `export`.

    clustertune                                   # the embedded demo
    clustertune train configs/qwen2.5-1.5b-sft-1gpu.toml --set train.lr=1e-5
    clustertune validate configs/qwen2.5-1.5b-sft-1gpu.toml

`train` starts one worker per local GPU (or 2 on CPU) through the one supervisor of every launch
(clustertune.supervisor, the `local` launcher of cluster.launch): the same allow-listed
environment and 0600 secrets file as a cluster run, output with rank prefixes saved in
RUN_DIR/logs/, rank 0's progress bar live on the terminal, every rank stopped when one fails or
on Ctrl-C. This side never imports torch: workers are separate processes (python -m clustertune.worker).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from clustertune.config import Recipe, load_recipe, recipe_to_toml
from clustertune.gpus import local_gpu_count


def run_local_workers(recipe: Recipe, *, nproc: int, resume: bool, on_gpu: bool) -> int:
    """`nproc` ranks on this machine through the one supervisor (clustertune.supervisor); the
    run's exit code."""
    from clustertune.cluster.launch import launch_here
    return launch_here(recipe, nproc=nproc, on_gpu=on_gpu, resume=resume)


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
    from clustertune.worker.export import export_from_checkpoint
    step = export_from_checkpoint(run_dir, out, model_section=recipe.model, lora_section=recipe.lora,
                                  precision=world.get("precision", "bf16"), best=getattr(args, "best", False))
    which = "best " if getattr(args, "best", False) else ""
    print(f"exported {which}step {step} of {run_dir} to {out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0
