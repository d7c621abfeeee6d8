"""Per-rank wrapper that every launcher (our own supervisor on one machine, DeepSpeed's per-node
launch, torchrun, srun) starts for each rank instead of the worker itself:

    python -u -m clustertune.cluster.rankexec [--env-file RUN_DIR/launch/run.env] [--raw-stderr] RECIPE [--resume]

It
  * applies the run's environment file (the allow-listed, non-secret variables; the secrets stay
    in the 0600 file named by CLUSTERTUNE_SECRETS_FILE, which the worker itself reads);
  * fills LOCAL_WORLD_SIZE from DeepSpeed's LOCAL_SIZE, and picks this node's interface for
    NCCL/gloo from CLUSTERTUNE_NODE_NICS (by node rank) when the nodes' interfaces differ;
  * starts `python -m clustertune.worker RECIPE ...` (or CLUSTERTUNE_WORKER_MODULE) and prefixes
    every output line with `[rank N]`, so the launcher can tell ranks apart in one stream;
    with --raw-stderr the worker's stderr instead goes untouched to this process's stderr (the
    rank whose live progress bar the user watches: a bar redraws with \r, never a whole line);
  * dies with its parent, and takes the worker with it (PR_SET_PDEATHSIG), so a killed node
    launcher leaves no orphan; SIGTERM/SIGINT are forwarded to the worker;
  * ends with one line `[rank N] clustertune-rank-exit rank=N node=K code=C seconds=S`.

The names and line formats are clustertune.contract's. Standard library only (no torch): this
process lives as long as the worker.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time

from clustertune import contract
from clustertune.cluster import node_env

_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except OSError:
        pass


def read_env_file(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as handle:
        return contract.parse_env_file_text(handle.read())


def child_env(environ: dict[str, str], env_file: dict[str, str]) -> dict[str, str]:
    env = dict(environ)
    env.update(env_file)
    if contract.LOCAL_WORLD_SIZE not in env and contract.DEEPSPEED_LOCAL_SIZE in env:
        env[contract.LOCAL_WORLD_SIZE] = env[contract.DEEPSPEED_LOCAL_SIZE]
    nics = env.get(contract.NODE_NICS_ENV)
    node_rank = contract.node_rank(env)
    if nics and node_rank is not None:
        names = nics.split(",")
        if int(node_rank) < len(names) and names[int(node_rank)]:
            env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = names[int(node_rank)]
    env = node_env.apply(env, node_rank)  # this node's [nodes.env] of the cluster file
    env["PYTHONUNBUFFERED"] = "1"
    return env


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 1
    env_file: dict[str, str] = {}
    raw_stderr = False
    while argv[:1] in (["--env-file"], ["--raw-stderr"]):
        if argv[0] == "--raw-stderr":
            raw_stderr, argv = True, argv[1:]
        else:
            env_file, argv = read_env_file(argv[1]), argv[2:]
    env = child_env(dict(os.environ), env_file)
    rank = env.get(contract.RANK, "?")
    node = contract.node_rank(env) or "?"
    module = env.get(contract.WORKER_MODULE_ENV, contract.DEFAULT_WORKER_MODULE)
    if not _MODULE_RE.match(module):
        print(contract.rank_line(rank, f"{contract.WORKER_MODULE_ENV}={module!r} is not a module name"), flush=True)
        return 2
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-u", "-m", module, *argv], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=None if raw_stderr else subprocess.STDOUT,
                            preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    assert proc.stdout is not None
    prefix = contract.rank_prefix(rank).encode()
    for raw in iter(proc.stdout.readline, b""):
        _write_line(prefix + raw.rstrip(b"\n"))
    code = proc.wait()
    _write_line(contract.rank_line(rank, contract.exit_line(rank, node, code, time.monotonic() - started)).encode())
    return code if code >= 0 else 128 - code


def _write_line(line: bytes) -> None:
    """One write(2) per line: the ranks of a node share one pipe to the launcher, and writes of up
    to PIPE_BUF bytes are atomic, so lines of different ranks never interleave."""
    data = line + b"\n"
    try:
        while data:
            data = data[os.write(1, data):]
    except BrokenPipeError:  # the launcher's stream is gone; keep draining, the worker decides
        pass


if __name__ == "__main__":
    sys.exit(main())
