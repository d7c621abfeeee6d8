"""Variables of one node, from the cluster file, for the ranks on that node alone.

    [[nodes]]
    name = "node2"
    address = "10.0.0.12"
    slots = 2
    [nodes.env]
    CUDA_VISIBLE_DEVICES = "2,3"   # this node's GPUs (nodes that share a machine, like the sandbox's)
    NCCL_HOSTID = "node2"          # NCCL counts ranks with another host id as another machine

The launcher has one environment file for the whole run (DeepSpeed's runner exports it to every
node), so each node's variables travel in it as `CLUSTERTUNE_NODEENV_<node rank>_<NAME>=value`;
rankexec keeps the entries of its own node rank (the launcher's CROSS_RANK / GROUP_RANK), sets them,
and drops the rest. A node's variables win over the run-wide ones.

CUDA_VISIBLE_DEVICES composes with DeepSpeed's: its per-node launcher always sets
CUDA_VISIBLE_DEVICES to the indices 0..n-1 of the node's slots, so under it (LOCAL_SIZE set) the
node's list is indexed by those: node "2,3" and DeepSpeed "0,1" give "2,3"; DeepSpeed "1" gives "3".
Under torchrun the node's list is used as it is.

Standard library only: rankexec imports it.
"""

from __future__ import annotations

import re
from typing import Mapping

from clustertune import contract

PREFIX = "CLUSTERTUNE_NODEENV_"
_ENTRY_RE = re.compile(r"^" + PREFIX + r"(?P<node>\d+)_(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Values travel on a remote shell's command line: only characters a shell leaves alone.
VALUE_RE = re.compile(r"^[\w@%+=:,./-]*$")
# Set per rank by the launchers, or by clustertune itself: a cluster file cannot decide them.
RESERVED = frozenset({contract.RANK, contract.LOCAL_RANK, contract.WORLD_SIZE, contract.LOCAL_WORLD_SIZE,
                      contract.MASTER_ADDR, contract.MASTER_PORT, contract.DEEPSPEED_LOCAL_SIZE,
                      contract.DEEPSPEED_NODE_RANK, "CROSS_SIZE", contract.GROUP_RANK, "DS_ENV_FILE", "PATH",
                      "LD_LIBRARY_PATH", "LD_PRELOAD", "HOME", "PYTHONPATH"})
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def check_node_env(env: Mapping[str, str]) -> dict[str, str]:
    """The validated variables of one node; ValueError naming the variable otherwise."""
    from clustertune.secrets import is_secret_name
    for name, value in env.items():
        if not NAME_RE.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
        if name in RESERVED or name.startswith("CLUSTERTUNE_"):
            raise ValueError(f"{name} is set by the launcher for each rank; it cannot be set per node")
        if is_secret_name(name):
            raise ValueError(f"{name} looks like a secret: a cluster file is no place for it (export it in "
                             "the launching shell and list it in run.env_passthrough)")
        if not VALUE_RE.match(value):
            raise ValueError(f"{name} = {value!r}: a remote shell would interpret it (allowed: letters, digits "
                             "and _@%+=:,./-)")
    return dict(env)


def encode(per_node: list[Mapping[str, str]]) -> dict[str, str]:
    """Env-file entries for each node's variables, by node rank (the order of the hostfile)."""
    return {f"{PREFIX}{rank}_{name}": value for rank, env in enumerate(per_node) for name, value in env.items()}


def apply(environ: Mapping[str, str], node_rank: str | None) -> dict[str, str]:
    """`environ` without any node's entries, plus this node's variables (see the module doc)."""
    env = {k: v for k, v in environ.items() if not k.startswith(PREFIX)}
    if node_rank is None:
        return env
    for key, value in environ.items():
        m = _ENTRY_RE.match(key)
        if not m or m["node"] != str(node_rank):
            continue
        name = m["name"]
        if name == VISIBLE_DEVICES and contract.DEEPSPEED_LOCAL_SIZE in environ and environ.get(VISIBLE_DEVICES):
            value = compose_visible_devices(value, environ[VISIBLE_DEVICES])
        env[name] = value
    return env


def compose_visible_devices(node_devices: str, launcher_indices: str) -> str:
    """The node's devices picked by the launcher's indices into them ("2,3" by "1" -> "3")."""
    devices = [d for d in node_devices.split(",") if d]
    picked = []
    for index in launcher_indices.split(","):
        if not index.isdigit() or int(index) >= len(devices):
            return node_devices  # not indices into this node's list: the node's own list stands
        picked.append(devices[int(index)])
    return ",".join(picked)
