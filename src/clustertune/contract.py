"""The launcher-worker contract: every environment-variable name and every line format that the
launcher side (supervisor, cluster.launch, cluster.rankexec) and the worker side exchange, each
format with its writer and its parser here, side by side, so the two ends cannot drift apart.

    from clustertune import contract
    env[contract.SECRETS_FILE_ENV] = path                      # launcher writes
    os.environ.get(contract.SECRETS_FILE_ENV)                  # worker reads
    contract.rank_line(3, "step 1")  -> "[rank 3] step 1"      # rankexec writes
    contract.parse_rank_line(line)   -> (3, "step 1")          # the supervisor reads

Standard library only: both sides import it, and the launcher side never imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

# ------------------------------------------------------------------ environment variable names

# torch.distributed's names, set by every launcher (DeepSpeed's, torchrun, ours) for each rank.
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
# torch's CUDA allocator settings, and what the worker sets when the launch forwards none: growable
# segments (the planner's allocator slack depends on it: plan.expandable_segments_on).
ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
WORKER_DEFAULT_ALLOC_CONF = "expandable_segments:True"
# What DeepSpeed's per-node launcher sets instead: ranks on this node, and the node's rank.
DEEPSPEED_LOCAL_SIZE = "LOCAL_SIZE"
DEEPSPEED_NODE_RANK = "CROSS_RANK"
# torchrun's node rank (our own one-machine launcher sets it too: 0).
GROUP_RANK = "GROUP_RANK"
NODE_RANK_NAMES = (DEEPSPEED_NODE_RANK, GROUP_RANK)

# clustertune's own.
RUN_ID_ENV = "CLUSTERTUNE_RUN_ID"  # marks every process of one run (what a stop signals)
SECRETS_FILE_ENV = "CLUSTERTUNE_SECRETS_FILE"  # path of the 0600 secrets file (clustertune.secrets)
NODE_LOCAL_DIR_ENV = "CLUSTERTUNE_NODE_LOCAL_DIR"  # a node's own checkpoint directory (no shared fs)
NODE_NICS_ENV = "CLUSTERTUNE_NODE_NICS"  # comma-separated interface per node rank, when they differ
WORKER_MODULE_ENV = "CLUSTERTUNE_WORKER_MODULE"  # what rankexec starts (tests: a stand-in worker)
FAULT_ENV = "CLUSTERTUNE_FAULT"  # TEST-ONLY fault injection (clustertune.watchdog.fault_point)

DEFAULT_WORKER_MODULE = "clustertune.worker"
RANK_WRAPPER_MODULE = "clustertune.cluster.rankexec"


def node_rank(environ: Mapping[str, str]) -> str | None:
    """This node's rank as the launcher that started us names it (DeepSpeed or torchrun)."""
    for name in NODE_RANK_NAMES:
        if name in environ:
            return environ[name]
    return None


# --------------------------------------------------------------------------- the run's env file

def env_file_text(env: Mapping[str, str]) -> str:
    """The per-run environment file: bare NAME=VALUE lines, no comments or blank lines (the
    format of DeepSpeed's DS_ENV_FILE, which its runner also reads)."""
    return "".join(f"{name}={value}\n" for name, value in env.items())


def parse_env_file_text(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        out[name.strip()] = value.strip()
    return out


# ------------------------------------------------------------------------------ rank lines

# Every line a rank prints reaches the launcher as `[rank N] text` (rankexec adds the prefix).
_RANK_LINE_RE = re.compile(r"^\[rank (?P<rank>\d+)\] (?P<text>.*)$", re.DOTALL)


def rank_prefix(rank: int | str) -> str:
    return f"[rank {rank}] "


def rank_line(rank: int | str, text: str) -> str:
    return rank_prefix(rank) + text


def parse_rank_line(line: str) -> tuple[int, str] | None:
    """(rank, text) of a `[rank N] text` line, or None for any other line."""
    m = _RANK_LINE_RE.match(line)
    return (int(m["rank"]), m["text"]) if m else None


# ------------------------------------------------------------------------------ exit tag

# rankexec's last line for its rank: how the worker ended, seen by the launcher in the stream
# (on a remote node the launcher has no process to wait for).
EXIT_TAG = "clustertune-rank-exit"
_EXIT_RE = re.compile(EXIT_TAG + r" rank=(?P<rank>\S+) node=(?P<node>\S+) code=(?P<code>-?\d+)"
                      r" seconds=(?P<seconds>[\d.]+)")


@dataclass(frozen=True)
class RankExit:
    rank: str  # "?" when the launcher set no RANK
    node: str  # node rank, "?" when unknown
    code: int  # the worker's exit status; negative: killed by that signal
    seconds: float


def exit_line(rank: int | str, node: int | str, code: int, seconds: float) -> str:
    return f"{EXIT_TAG} rank={rank} node={node} code={code} seconds={seconds:.1f}"


def parse_exit(text: str) -> RankExit | None:
    m = _EXIT_RE.search(text)
    if not m:
        return None
    return RankExit(m["rank"], m["node"], int(m["code"]), float(m["seconds"]))


# ------------------------------------------------------------------------------ heartbeat

# Each rank's liveness and step, a few times per stall timeout (clustertune.watchdog).
HEARTBEAT_TAG = "clustertune-heartbeat"
_HEARTBEAT_RE = re.compile(HEARTBEAT_TAG + r" rank=(?P<rank>\d+) step=(?P<step>\d+) phase=(?P<phase>\w+)")


@dataclass(frozen=True)
class Heartbeat:
    rank: int
    step: int
    phase: str


def heartbeat_line(rank: int, step: int, phase: str) -> str:
    return f"{HEARTBEAT_TAG} rank={rank} step={step} phase={phase}"


def parse_heartbeat(text: str) -> Heartbeat | None:
    m = _HEARTBEAT_RE.search(text)
    return Heartbeat(int(m["rank"]), int(m["step"]), m["phase"]) if m else None
