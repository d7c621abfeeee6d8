"""One-machine commands: `clustertune demo`, `train`, `validate`, `export`.

    clustertune demo                              # the embedded demo
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
    """clustertune train RECIPE [--set ...] [--nproc N] [--resume]; without RECIPE, the recipe
    defaults (config.default_recipe: the GPUs when present) plus --set, e.g.
    clustertune train --set model.path=/models/Qwen2.5-0.5B --set data.train_files='["train.jsonl"]'"""
    from clustertune.config import RecipeError, default_recipe
    from clustertune.preflight import check_before_workers, note_cpu_with_gpus
    if args.recipe is None and not args.overrides:
        raise RecipeError("train needs a recipe file (clustertune train RECIPE.toml), or --set keys over the recipe "
                          "defaults (at least --set data.train_files='[\"train.jsonl\"]'); to see a run first: "
                          "clustertune demo")
    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else default_recipe(args.overrides)
    gpus = local_gpu_count()
    on_gpu = recipe.train.device == "cuda" or (recipe.train.device == "auto" and gpus > 0)
    note_cpu_with_gpus(on_gpu=on_gpu, visible_gpus=gpus, device=recipe.train.device)
    nproc = args.nproc or default_nproc(on_gpu)
    source = f"--nproc {nproc}" if args.nproc else f"the default --nproc: {nproc}, {'local GPUs' if on_gpu else 'CPU'}"
    check_before_workers(recipe, world_size=nproc, world_source=source)
    return run_local_workers(recipe, nproc=nproc, resume=args.resume, on_gpu=on_gpu)


def cmd_demo(args) -> int:
    """Accuracy of a fresh model, 2-process ZeRO-2 training on CPU, accuracy of the export.
    --objective dpo: the DPO demo (demo.demo_dpo_recipe_dict), held-out preference accuracy."""
    if getattr(args, "objective", "sft") == "grpo":
        return _grpo_demo(args)
    dpo = getattr(args, "objective", "sft") == "dpo"
    if dpo:
        from clustertune.config import apply_overrides, recipe_from_dict
        from clustertune.demo import demo_dpo_recipe_dict
        overrides = getattr(args, "overrides", [])
        recipe = recipe_from_dict(apply_overrides(demo_dpo_recipe_dict(), overrides), "<demo recipe (dpo)>", overrides)
    else:
        recipe = load_recipe(None, getattr(args, "overrides", []))
    nproc = getattr(args, "nproc", None) or 2
    from clustertune.preflight import check_before_workers
    check_before_workers(recipe, world_size=nproc, world_source=f"--nproc {nproc}")
    run_dir = Path(recipe.run.output_dir)
    started = time.monotonic()
    evaluate = [sys.executable, "-m", "clustertune.worker.demo_eval", *(["--preference"] if dpo else [])]
    code = subprocess.run(evaluate + ["--random-init", "--seed", str(recipe.train.seed)]).returncode
    if code:
        return code
    code = run_local_workers(recipe, nproc=nproc, resume=False, on_gpu=False)
    if code:
        return code
    code = subprocess.run(evaluate + [str(run_dir / "final")]).returncode
    print(f"demo finished in {time.monotonic() - started:.0f} s; model in {run_dir / 'final'}", file=sys.stderr)
    return code


def _grpo_demo(args) -> int:
    """`clustertune demo --objective grpo`: a short SFT of the tiny model (RUN_DIR-sft), its held-out
    exact match, GRPO from it with the exact-match reward, the exact match after. --set applies to
    the GRPO stage."""
    from clustertune.config import apply_overrides, recipe_from_dict
    from clustertune.demo import DEMO_GRPO_SFT_STEPS, demo_grpo_recipe_dict, demo_recipe_dict
    from clustertune.preflight import check_before_workers
    overrides, nproc = getattr(args, "overrides", []), getattr(args, "nproc", None) or 2
    tree = apply_overrides(demo_grpo_recipe_dict("<the SFT stage's export>"), overrides)
    run_dir = Path(tree["run"]["output_dir"])
    sft_dir = run_dir.with_name(run_dir.name + "-sft")
    tree["model"]["path"] = str(sft_dir / "final")
    sft = recipe_from_dict(apply_overrides(demo_recipe_dict(), [
        f"run.output_dir={sft_dir}", f"train.max_steps={DEMO_GRPO_SFT_STEPS}", "checkpoint.every_steps=0"]),
        "<demo recipe (grpo: the SFT stage)>")
    check_before_workers(sft, world_size=nproc, world_source=f"--nproc {nproc}")
    started = time.monotonic()
    evaluate = [sys.executable, "-m", "clustertune.worker.demo_eval"]
    print(f"GRPO demo: first {DEMO_GRPO_SFT_STEPS} steps of SFT in {sft_dir}", file=sys.stderr)
    code = run_local_workers(sft, nproc=nproc, resume=False, on_gpu=False)
    if code:
        return code
    label = f"before GRPO ({DEMO_GRPO_SFT_STEPS}-step SFT)"
    code = subprocess.run(evaluate + [str(sft_dir / "final"), "--label", label]).returncode
    if code:
        return code
    recipe = recipe_from_dict(tree, "<demo recipe (grpo)>", overrides)
    check_before_workers(recipe, world_size=nproc, world_source=f"--nproc {nproc}")
    code = run_local_workers(recipe, nproc=nproc, resume=False, on_gpu=False)
    if code:
        return code
    code = subprocess.run(evaluate + [str(run_dir / "final"), "--label", "after GRPO"]).returncode
    print(f"demo finished in {time.monotonic() - started:.0f} s; model in {run_dir / 'final'}", file=sys.stderr)
    return code


def cmd_validate(args) -> int:
    """clustertune validate RECIPE [--set ...] [--nproc N | --cluster cluster.toml] [--no-data]:
    the resolved recipe, the model and tokenizer files, the batch arithmetic for the world size
    the run will have, and (unless --no-data) every record tokenized as the workers will."""
    from clustertune.preflight import check_before_workers, model_on_this_machine
    recipe = load_recipe(args.recipe, args.overrides)
    print(recipe_to_toml(recipe))
    from clustertune.auto import auto_keys
    auto = auto_keys(recipe)
    if auto:
        print(f"note: {', '.join(auto)} = \"auto\": `train` / `launch` resolve them for the GPUs they run on "
              "(the CPU: ZeRO-2, 8192 tokens, no checkpointing); `clustertune plan RECIPE --gpu NAME` shows to what",
              file=sys.stderr)
    world_size, world_source = _validate_world(recipe, args)
    model_here = not args.cluster or model_on_this_machine(recipe.model)
    check_before_workers(recipe, world_size=world_size, world_source=world_source, model_here=model_here)
    print(f"ok: {'model files, ' if model_here else ''}batch arithmetic for world size {world_size} "
          f"({world_source})", file=sys.stderr)
    if args.no_data or not model_here:
        return 0
    from clustertune.config import RecipeError, tokenized_cache_dir
    from clustertune.data import prepare_dataset
    from clustertune.worker.model import load_tokenizer
    try:
        tokenizer = load_tokenizer(recipe.model)
    except (OSError, ValueError) as err:  # files are there (checked above) but transformers refuses them
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"model.path {recipe.model.path!r}: the tokenizer does not load: {first}") from None
    # The cache the workers use, so the path printed is real and a later `train` starts from it.
    prepare_dataset(recipe.data, tokenizer, seed=recipe.train.seed,
                    cache_dir=tokenized_cache_dir(recipe.data, run_dir=Path(recipe.run.output_dir)),
                    objective=recipe.train.objective)
    return 0


def _validate_world(recipe: Recipe, args) -> tuple[int, str]:
    """The world size validate checks the batch arithmetic for, and where it came from: the
    cluster file's slots, --nproc, or what `clustertune train` would start here."""
    if args.cluster:
        from clustertune.cluster.inventory import load_cluster
        cluster = load_cluster(args.cluster)
        return cluster.world_size, f"{args.cluster}: {len(cluster.nodes)} node(s)"
    if args.nproc:
        return args.nproc, f"--nproc {args.nproc}"
    on_gpu = recipe.train.device == "cuda" or (recipe.train.device == "auto" and local_gpu_count() > 0)
    return default_nproc(on_gpu), f"what `clustertune train` starts here, {'local GPUs' if on_gpu else 'CPU'}; see --nproc"


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
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is an existing file; give a directory (new or existing) for the model",
              file=sys.stderr)
        return 2
    from clustertune.worker.export import export_from_checkpoint
    step = export_from_checkpoint(run_dir, out, model_section=recipe.model, lora_section=recipe.lora,
                                  precision=world.get("precision", "bf16"), best=getattr(args, "best", False))
    which = "best " if getattr(args, "best", False) else ""
    print(f"exported {which}step {step} of {run_dir} to {out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0
