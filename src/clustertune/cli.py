"""clustertune command line. Thin: parse, then call one function per subcommand.

    clustertune                      # the embedded demo (same as `clustertune demo`)
    clustertune train [RECIPE] [--set section.key=value ...] [--nproc N] [--resume]
    clustertune validate RECIPE [--set ...]
    clustertune plan RECIPE [--cluster cluster.toml] [--gpu h100 | --gpu-mem GB] [--write]
    clustertune launch RECIPE --cluster cluster.toml [--launcher deepspeed|torchrun|slurm]
    clustertune cluster init|ssh|doctor|stop ...   (see `clustertune cluster CMD --help`)
    clustertune sandbox up|down ...
    clustertune export RUN_DIR [--out DIR] [--best]
    clustertune report RUN_DIR

The launcher side never imports torch: every handler imports its module lazily, and only the
worker (clustertune.worker, started by the launcher) loads torch and DeepSpeed.
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
                   help="override any recipe field (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clustertune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("demo", help="train the bundled tiny model on the bundled task (CPU, 2 processes)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[])

    p = sub.add_parser("train", help="train a recipe on this machine (all local GPUs, or CPU)")
    _add_recipe_args(p, required=False)
    p.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs, or 2 on CPU)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")

    p = sub.add_parser("validate", help="validate a recipe and its data, print the resolved recipe")
    _add_recipe_args(p, required=True)
    p.add_argument("--no-data", action="store_true", help="check the recipe only, not the data files")

    p = sub.add_parser("export", help="write a run's newest checkpoint as a Hugging Face model")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    p.add_argument("--best", action="store_true",
                   help="the checkpoint with the best eval loss (checkpoint.keep_best) instead of the newest")

    p = sub.add_parser("plan", help="memory/feasibility per ZeRO option, with a recommendation")
    _add_recipe_args(p, required=True)
    p.add_argument("--cluster", default=None)
    p.add_argument("--gpu", default=None, help="h20, h100, h200, a100, ...")
    p.add_argument("--gpu-mem", type=float, default=None, help="GPU memory in GB")
    p.add_argument("--host-mem", type=float, default=None, help="host RAM per node in GB")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--write", action="store_true", help="write the recommendation into the recipe")
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
    p.add_argument("run_dir")

    p = sub.add_parser("launch", help="launch a recipe across the nodes of a cluster file")
    _add_recipe_args(p, required=True)
    p.add_argument("--cluster", default=None, help="cluster.toml (default: this machine only)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun", "slurm"], default="deepspeed")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--skip-doctor", action="store_true")

    p = sub.add_parser("cluster", help="cluster inventory, ssh setup, pre-flight doctor")
    p.add_argument("cluster_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("sandbox", help="a multi-node cluster on this machine from network namespaces")
    p.add_argument("sandbox_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["demo"])
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
