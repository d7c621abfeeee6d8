"""Helpers for the multi-node tests on one machine: each node is a network namespace with its own
eth0, address and sshd (clustertune.cluster.sandbox). Need root; skipped with the reason otherwise.

Every sandbox is torn down by a finalizer, even when the test fails, and the teardown itself is
checked: no namespace, sshd, process or file of the sandbox may remain. Every subprocess has a
timeout. Traffic goes only to loopback and to addresses inside the namespaces created here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from clustertune.cluster.sandbox import Sandbox, unavailable_reason  # noqa: F401 (Sandbox: type)
from clustertune.secrets import is_secret_name

REPO = Path(__file__).resolve().parents[2]
FAKE_WORKER_DIR = Path(__file__).resolve().parent / "fakeworker"
_REASON = unavailable_reason()

needs_sandbox = pytest.mark.skipif(_REASON is not None, reason=f"cluster sandbox unavailable: {_REASON}")


def base_env() -> dict[str, str]:
    """This process's environment without secret-looking variables, so that the developer's own
    tokens never reach a test run (and counts of forwarded secrets are exact)."""
    return {k: v for k, v in os.environ.items() if not is_secret_name(k)}


def ns_exists(ns: str) -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return any(line.split()[0] == ns for line in out.splitlines() if line.strip())


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def run_pids(run_id: str) -> list[int]:
    """Live processes whose environment carries this run's id."""
    marker = f"CLUSTERTUNE_RUN_ID={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0") and pid_alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                pass
    return found


class Harness:
    """A sandbox plus helpers that do what a user on the master node (node1) would do."""

    def __init__(self, sb: Sandbox, tmp: Path):
        self.sb = sb
        self.tmp = tmp

    def run(self, node: str, argv: list[str], *, timeout: float = 120, env: dict | None = None,
            extra_env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run on a node. `env`: variables passed through the process environment (never argv:
        secrets go this way)."""
        proc_env = dict(base_env(), **(env or {}))
        return subprocess.run(self.sb.exec_argv(node, argv, extra_env), capture_output=True, text=True,
                              timeout=timeout, env=proc_env, cwd=cwd or self.tmp, stdin=subprocess.DEVNULL)

    def clustertune(self, *args: str, node: str = "node1", timeout: float = 120, env: dict | None = None,
                    cwd: Path | None = None) -> subprocess.CompletedProcess:
        return self.run(node, [sys.executable, "-m", "clustertune.cli", *args], timeout=timeout, env=env, cwd=cwd)

    def setup_ssh(self, cluster_file: Path | None = None) -> subprocess.CompletedProcess:
        """`cluster ssh` with the one-time bootstrap credential, which is then revoked."""
        out = self.clustertune("cluster", "ssh", "--cluster", str(cluster_file or self.sb.cluster_file),
                               "--identity", self.sb.state.bootstrap_key)
        assert out.returncode == 0, out.stdout + out.stderr
        self.sb.revoke_bootstrap()
        return out

    def home(self, node: str) -> Path:
        return self.sb.node(node).home

    def cluster_dir(self, node: str) -> Path:
        return self.home(node) / ".clustertune" / "clusters" / self.sb.name


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
