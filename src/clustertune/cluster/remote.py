"""Running the snippets of remote_snippets.py on nodes: over ssh with the per-cluster config, or
locally (the implicit one-node cluster). Every call has a timeout; calls fan out over a thread
pool so that a cluster of N nodes answers in about the time of the slowest node.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from clustertune.cluster import remote_snippets

T = TypeVar("T")
R = TypeVar("R")

_SOURCE = Path(remote_snippets.__file__).read_text(encoding="utf-8")


def program(command: str, args: dict[str, Any]) -> str:
    """The full program sent on stdin: the snippet module plus one call whose only argument is a
    JSON document inside a Python string literal (repr of a str: no code can hide in it)."""
    payload = json.dumps({"command": command, "args": args})
    return f"{_SOURCE}\n_main({payload!r})\n"


@dataclass(frozen=True)
class RemoteResult:
    ok: bool  # the transport worked and the snippet answered
    data: dict[str, Any]
    returncode: int
    stderr: str
    error: str = ""  # human summary when not ok

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


@dataclass(frozen=True)
class SshTarget:
    """One node reached through `ssh -F <cluster ssh_config> <node name>`."""
    config: Path
    name: str
    extra_opts: tuple[str, ...] = ()

    def argv(self, remote_command: str) -> list[str]:
        return ["ssh", "-F", str(self.config), *self.extra_opts, self.name, remote_command]


@dataclass(frozen=True)
class LocalTarget:
    """This machine, without ssh (the implicit localhost cluster)."""
    name: str = "localhost"

    def argv(self, remote_command: str) -> list[str]:
        assert remote_command == "python3 -"
        return [sys.executable, "-"]


Target = SshTarget | LocalTarget


def parse_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(remote_snippets.MARKER):
            return json.loads(line[len(remote_snippets.MARKER):])
    return None


def run_snippet(target: Target, command: str, args: dict[str, Any], timeout: float = 60,
                interactive: bool = False) -> RemoteResult:
    """Run one snippet on a node. `interactive`: let ssh use the terminal (password prompts)."""
    argv = target.argv("python3 -")
    try:
        proc = subprocess.run(argv, input=program(command, args).encode("utf-8"), stdout=subprocess.PIPE,
                              stderr=None if interactive else subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return RemoteResult(False, {}, -1, "", f"timed out after {timeout:.0f} s")
    except FileNotFoundError as err:
        return RemoteResult(False, {}, -1, "", f"{err.filename}: not installed")
    stdout = proc.stdout.decode("utf-8", "replace")
    stderr = (proc.stderr or b"").decode("utf-8", "replace")
    data = parse_result(stdout)
    if data is None:
        if proc.returncode == 127 or "python3: command not found" in stderr:
            summary = "python3 not found on the node"
        else:
            summary = classify_ssh_error(stderr, proc.returncode).summary
        return RemoteResult(False, {}, proc.returncode, stderr, summary)
    if "exception" in data:
        return RemoteResult(False, data, proc.returncode, stderr, f"snippet failed: {data['exception']}")
    return RemoteResult(True, data, proc.returncode, stderr)


def parallel(fn: Callable[[T], R], items: Iterable[T], workers: int = 32) -> list[R]:
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


# ------------------------------------------------------------------- ssh failure classification

@dataclass(frozen=True)
class SshFailure:
    kind: str  # legacy-hostkey | hostkey-changed | auth | refused | timeout | unreachable | dns | other
    summary: str
    fix: str
    offer: tuple[str, ...] = ()


_OFFER_RE = re.compile(r"no matching host key type found\. Their offer: (\S+)")


def classify_ssh_error(stderr: str, returncode: int = 255) -> SshFailure:
    """Turn ssh's stderr into a kind, a one-line summary and the fix a user should apply."""
    text = stderr or ""
    m = _OFFER_RE.search(text)
    if m:
        offer = tuple(m.group(1).split(","))
        return SshFailure("legacy-hostkey", f"server offers only legacy host key algorithms: {m.group(1)}",
                          "run `clustertune cluster ssh`: it enables HostKeyAlgorithms +ssh-rsa for this host "
                          "alone (and explains the proper fix: an ed25519 host key on the server)", offer)
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
        return SshFailure("hostkey-changed", "host key changed (or not trusted): connection refused",
                          "verify the server's new key out of band, then remove the old entry with "
                          "`ssh-keygen -R HOST -f <cluster dir>/known_hosts` and re-run `clustertune cluster ssh`")
    if "Permission denied" in text:
        return SshFailure("auth", "reachable, but the cluster key is not accepted (Permission denied)",
                          "run `clustertune cluster ssh` to install the cluster key")
    if "Connection refused" in text:
        return SshFailure("refused", "connection refused (no sshd on that address/port?)",
                          "start sshd on the node, check the address and port in cluster.toml")
    if "timed out" in text or "Connection timed out" in text:
        return SshFailure("timeout", "connection timed out", "check the address, the network path and firewalls")
    if "No route to host" in text or "Network is unreachable" in text:
        return SshFailure("unreachable", "no route to host (node down or wrong address)",
                          "check that the node is up and the address in cluster.toml is right")
    if "Could not resolve hostname" in text or "Name or service not known" in text:
        return SshFailure("dns", "host name does not resolve", "fix the address in cluster.toml")
    last = [line for line in text.splitlines() if line.strip()]
    return SshFailure("other", last[-1] if last else f"ssh exited with code {returncode}",
                      "run the same ssh by hand with -v to see why")
