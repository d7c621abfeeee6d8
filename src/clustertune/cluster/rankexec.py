"""Per-rank wrapper that a launcher (DeepSpeed's per-node launch, torchrun, srun) starts on each
node instead of the worker itself:

    python -u -m clustertune.cluster.rankexec [--env-file RUN_DIR/launch/run.env] RECIPE [--resume]

It
  * applies the run's environment file (the allow-listed, non-secret variables; the secrets stay
    in the 0600 file named by CLUSTERTUNE_SECRETS_FILE, which the worker itself reads);
  * fills LOCAL_WORLD_SIZE from DeepSpeed's LOCAL_SIZE, and picks this node's interface for
    NCCL/gloo from CLUSTERTUNE_NODE_NICS (by node rank) when the nodes' interfaces differ;
  * starts `python -m clustertune.worker RECIPE ...` (or CLUSTERTUNE_WORKER_MODULE) and prefixes
    every output line with `[rank N]`, so the launcher can tell ranks apart in one stream;
  * dies with its parent, and takes the worker with it (PR_SET_PDEATHSIG), so a killed node
    launcher leaves no orphan; SIGTERM/SIGINT are forwarded to the worker;
  * ends with one line `[rank N] clustertune-rank-exit rank=N node=K code=C seconds=S`.

Standard library only (no torch): this process lives as long as the worker.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time

from clustertune.cluster import node_env

EXIT_TAG = "clustertune-rank-exit"
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except OSError:
        pass


def read_env_file(path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def child_env(environ: dict[str, str], env_file: dict[str, str]) -> dict[str, str]:
    env = dict(environ)
    env.update(env_file)
    if "LOCAL_WORLD_SIZE" not in env and "LOCAL_SIZE" in env:
        env["LOCAL_WORLD_SIZE"] = env["LOCAL_SIZE"]
    nics = env.get("CLUSTERTUNE_NODE_NICS")
    node_rank = env.get("CROSS_RANK", env.get("GROUP_RANK"))
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
    if argv[:1] == ["--env-file"]:
        env_file = read_env_file(argv[1])
        argv = argv[2:]
    env = child_env(dict(os.environ), env_file)
    rank = env.get("RANK", "?")
    node = env.get("CROSS_RANK", env.get("GROUP_RANK", "?"))
    module = env.get("CLUSTERTUNE_WORKER_MODULE", "clustertune.worker")
    if not _MODULE_RE.match(module):
        print(f"[rank {rank}] CLUSTERTUNE_WORKER_MODULE={module!r} is not a module name", flush=True)
        return 2
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-u", "-m", module, *argv], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    assert proc.stdout is not None
    prefix = f"[rank {rank}] ".encode()
    for raw in iter(proc.stdout.readline, b""):
        _write_line(prefix + raw.rstrip(b"\n"))
    code = proc.wait()
    _write_line(f"[rank {rank}] {EXIT_TAG} rank={rank} node={node} code={code} "
                f"seconds={time.monotonic() - started:.1f}".encode())
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
