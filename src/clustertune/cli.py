"""clustertune command line. Thin: parse, then call one function per subcommand.

    clustertune                      # this usage; `clustertune demo` trains the embedded demo
    clustertune demo [--nproc N]
    clustertune train [RECIPE] [--set section.key=value ...] [--nproc N] [--resume]
    clustertune validate RECIPE [--set ...] [--nproc N | --cluster cluster.toml] [--no-data]
    clustertune plan RECIPE [--cluster cluster.toml] [--gpu h100 | --gpu-mem GiB] [--write]
    clustertune launch RECIPE --cluster cluster.toml [--launcher deepspeed|torchrun|slurm]
    clustertune cluster init|ssh|doctor|stop ...   (see `clustertune cluster CMD --help`)
    clustertune sandbox up|down|list|revoke-bootstrap|exec ...
    clustertune export RUN_DIR [--out DIR] [--best]
    clustertune report RUN_DIR

The launcher side never imports torch: every handler imports its module lazily (the cluster and
sandbox parsers come from their torch-free modules), and only the worker (clustertune.worker,
started by the launcher) loads torch and DeepSpeed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from clustertune.errors import UserError

# subcommand -> "module:function". Each handler takes the parsed argparse.Namespace and returns
# an exit code. Modules are imported only when their subcommand runs.
HANDLERS = {
    "demo": "clustertune.local:cmd_demo",
    "train": "clustertune.local:cmd_train",
    "validate": "clustertune.local:cmd_validate",
    "export": "clustertune.local:cmd_export",
    "plan": "clustertune.plan_cli:cmd_plan",
    "report": "clustertune.report:cmd_report",
    "launch": "clustertune.cluster.launch:cmd_launch",
    "cluster": "clustertune.cluster.commands:cmd_cluster",
    "sandbox": "clustertune.cluster.sandbox:cmd_sandbox",
}


def _add_recipe_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("recipe", nargs=None if required else "?", help="recipe TOML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any recipe field, value as a TOML literal (repeatable): --set train.lr=1e-5")


def positive_int(text: str) -> int:
    """argparse type for counts (--nproc): 0 and negatives are errors, never a silent default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from clustertune.cluster.commands import add_cluster_subcommands
    from clustertune.cluster.sandbox import add_sandbox_subcommands
    from clustertune.config import DEFAULT_MAX_STEPS

    parser = argparse.ArgumentParser(
        prog="clustertune",
        description="Fine-tune Hugging Face causal LMs with DeepSpeed: on this machine (train), or across the "
                    "nodes of a cluster (cluster init/ssh/doctor, plan, launch), then export and report.",
        epilog="New here? `clustertune demo` trains a tiny model on this machine's CPU in a few minutes. "
               "`clustertune COMMAND --help` explains each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train the bundled tiny model on the bundled task (CPU, 2 processes, a few "
                                    "minutes) and show its accuracy before and after")
    p.add_argument("--nproc", type=positive_int, default=2, help="worker processes (default: 2)")
    p.add_argument("--objective", choices=["sft", "dpo", "grpo"], default="sft",
                   help="sft: learn the task from examples (default); dpo: from preference pairs, held-out "
                        "preference accuracy before and after; grpo: a short SFT, then RL with an exact-match "
                        "reward, held-out exact match before and after the RL")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a field of the demo recipe (repeatable)")

    p = sub.add_parser("train", help="train a recipe on this machine (all local GPUs, or CPU)",
                       description="Train on this machine: one worker per local GPU, or 2 on the CPU. Without "
                                   "RECIPE the recipe defaults are used (train.device = auto: the GPUs when "
                                   f"present; train.max_steps = {DEFAULT_MAX_STEPS} unless --set gives it or "
                                   "train.epochs) and "
                                   "--set must give at least data.train_files. `clustertune demo` runs the "
                                   "bundled demo.")
    _add_recipe_args(p, required=False)
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="worker processes (default: one per local GPU, or 2 on CPU)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")

    p = sub.add_parser("validate", help="check a recipe, its model files, batch arithmetic and data; print the resolved recipe")

    _add_recipe_args(p, required=True)
    p.add_argument("--no-data", action="store_true", help="check the recipe and model files only, not the data")
    world = p.add_mutually_exclusive_group()
    world.add_argument("--nproc", type=positive_int, default=None,
                       help="check the batch arithmetic for this many processes (default: what `train` starts here)")
    world.add_argument("--cluster", default=None, metavar="CLUSTER.toml",
                       help="check the batch arithmetic for this cluster's slots")

    p = sub.add_parser("export", help="write a run's newest checkpoint as a Hugging Face model")
    p.add_argument("run_dir", help="the run's output directory (run.output_dir)")
    p.add_argument("--out", default=None, help="model directory to write (default: RUN_DIR/export)")
    p.add_argument("--best", action="store_true",
                   help="the checkpoint with the best eval loss (checkpoint.keep_best) instead of the newest")

    p = sub.add_parser("plan", help="memory/feasibility per ZeRO option, with a recommendation")
    _add_recipe_args(p, required=True)
    p.add_argument("--cluster", default=None, metavar="CLUSTER.toml",
                   help="take the nodes and GPUs per node from this cluster file")
    p.add_argument("--gpu", default=None, help="GPU model: h20, h100, h200, a100, ... (default: this machine's)")
    p.add_argument("--gpu-mem", type=float, default=None, metavar="GIB",
                   help="GPU memory per GPU in GiB (instead of --gpu)")
    p.add_argument("--host-mem", type=float, default=None, metavar="GIB",
                   help="host RAM per node in GiB (default: this machine's when planning for it; for other "
                        "machines the host check is skipped)")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (instead of --cluster)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (instead of --cluster)")
    p.add_argument("--write", action="store_true", help="write the recommendation into the recipe")
    p.add_argument("--lora-fit", nargs="?", const="", default=None, metavar="SHAPE",
                   help="only a table: does LoRA (the recipe's lora.r) with the base whole on each GPU fit on "
                        "h100/a100/h20/h200, for the recipe's model or the built-in SHAPE (GRPO: with its rollout)")
    # The time estimate (clustertune.timing): data size and bandwidth.
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="training samples (default: counted in data.train_files when they are here)")
    p.add_argument("--tokens-per-sample", type=float, default=None, metavar="T",
                   help="average tokens per sample (default: measured with model.path's tokenizer when here)")
    p.add_argument("--intra-node-gbps", type=float, default=None, metavar="Gbps",
                   help="bus bandwidth between the GPUs of a node in Gb/s (default: 1600, NVLink-class)")
    p.add_argument("--inter-node-gbps", type=float, default=None, metavar="Gbps",
                   help="bus bandwidth between nodes in Gb/s: 8 x the all-gather bus bandwidth in gigabytes/s "
                        "that cluster doctor reports (default: 100, one 100 Gb/s NIC per node)")

    p = sub.add_parser("report", help="plots and a summary of a run's metrics")
    p.add_argument("run_dir", help="the run's output directory (run.output_dir)")

    p = sub.add_parser("launch", help="launch a recipe across the nodes of a cluster file")
    _add_recipe_args(p, required=True)
    p.add_argument("--cluster", default=None, metavar="CLUSTER.toml", help="cluster file (default: this machine only)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun", "slurm"], default="deepspeed",
                   help="how ranks are started on the nodes (default: deepspeed, over pdsh and ssh)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--skip-doctor", action="store_true", help="launch without the pre-flight checks on every node")

    p = sub.add_parser("cluster", help="cluster inventory, ssh setup, pre-flight doctor, stop a run",
                       description="Cluster inventory, ssh setup, pre-flight doctor, stop a run.")
    add_cluster_subcommands(p)

    p = sub.add_parser("sandbox", help="a multi-node cluster on this machine from network namespaces",
                       description="A multi-node cluster on this machine from network namespaces (needs root).")
    add_sandbox_subcommands(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module_name, func_name = HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(handler(args) or 0)
    except UserError as err:  # the one place the CLI reports them; anything else is a bug: traceback
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
