"""Per-rank entry point, started by a launcher (never by hand):

    RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        python -m clustertune.worker runs/demo/launch/recipe.toml [--set train.lr=1e-3] [--resume]

Secrets reach the worker only through the 0600 file named by CLUSTERTUNE_SECRETS_FILE.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clustertune.worker")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    # Before torch touches CUDA: growable segments instead of fixed-size blocks keep reserved memory
    # close to allocated (what clustertune.plan's FRAGMENTATION counts); torchtitan's launch script
    # sets the same. A value the user exported wins (even an empty one: torch's default).
    from clustertune import contract
    os.environ.setdefault(contract.ALLOC_CONF_ENV, contract.WORKER_DEFAULT_ALLOC_CONF)

    import warnings
    # torch.distributed deprecation chatter from inside DeepSpeed, once per rank per call site.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    from clustertune.config import load_recipe
    from clustertune.errors import UserError
    from clustertune.worker.distributed import PeerFailed, shutdown_distributed
    rank = os.environ.get(contract.RANK, "0")
    try:
        secrets_file = os.environ.get(contract.SECRETS_FILE_ENV)
        if secrets_file:  # an unsafe or malformed file is a SecretsFileError: one line, below
            from clustertune.secrets import load_secrets_file
            load_secrets_file(secrets_file)
        recipe = load_recipe(args.recipe, args.overrides)
        from clustertune.worker.loop import run
        run(recipe, resume=args.resume)
    except UserError as err:
        # Raised where every rank stands together (set-up, or work all ranks waited for).
        print(f"error (rank {rank}): {err}", file=sys.stderr, flush=True)
        shutdown_distributed(wait_for_peers=False)
        return err.exit_code
    except PeerFailed as err:  # the failing rank prints the whole error; one line here
        print(f"rank {rank} stops: {err}", file=sys.stderr, flush=True)
        shutdown_distributed(wait_for_peers=False)
        return 2
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    exit_code = main()
    # Everything the run owns is closed and flushed by now (metrics, checkpoints fsynced, the
    # export). Interpreter finalization adds nothing but risk: C++ threads and shared memory of
    # gloo and DeepSpeed's CPU comm op sometimes abort it (SIGABRT/SIGBUS, seen in about 1 of 5
    # 2-rank CPU runs that end on an error), which would replace a clean exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
