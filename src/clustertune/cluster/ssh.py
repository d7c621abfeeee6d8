"""`clustertune cluster ssh`: passwordless, mutual, host-key-verified ssh between all nodes.

Per-cluster directory, on every node: ~/.clustertune/clusters/<cluster name>/ (0700)

    id_ed25519, id_ed25519.pub   the cluster key (ed25519, 0600), the same on every node
    known_hosts                  host keys of all nodes, seeded with ssh-keyscan from the master
    ssh_config                   one Host entry per node; used by ssh, pdsh and the launcher
    state.json                   which hosts need the legacy ssh-rsa algorithm

Nothing in ~/.ssh is touched except appending the cluster public key to authorized_keys. The
directory lives in the home directory, not next to cluster.toml, so a private key never ends up
in a project repository.

Host keys: trust on first use from the master (each new fingerprint is printed), accept-new in
the generated config, and a changed key is refused with the old and new fingerprints shown.
Host-key checking is never turned off. A server that offers only the SHA-1 `ssh-rsa` algorithm
gets `HostKeyAlgorithms +ssh-rsa` in its own Host entry only, with a warning.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from clustertune.cluster.inventory import Cluster, Node
from clustertune.cluster.remote import (RemoteResult, SshTarget, classify_ssh_error, parallel, run_snippet)
from clustertune.errors import UserError

KEY_NAME = "id_ed25519"
PLACEHOLDER = "@CLUSTER_DIR@"


class SshSetupError(UserError):
    """A problem that stops `cluster ssh`; the message says what to do."""

    exit_code = 1  # the nodes are not in a state to set up (like a failed doctor check), not bad input


@dataclass(frozen=True)
class ClusterPaths:
    dir: Path

    @classmethod
    def for_cluster(cls, cluster: Cluster, home: Path | None = None) -> "ClusterPaths":
        return cls((home or Path.home()) / ".clustertune" / "clusters" / cluster.name)

    @property
    def key(self) -> Path:
        return self.dir / KEY_NAME

    @property
    def pub(self) -> Path:
        return self.dir / f"{KEY_NAME}.pub"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    def legacy_hosts(self) -> set[str]:
        try:
            return set(json.loads(self.state.read_text())["legacy_hosts"])
        except (OSError, ValueError, KeyError):
            return set()

    def target(self, node: Node | str, *extra_opts: str) -> SshTarget:
        return SshTarget(self.ssh_config, node if isinstance(node, str) else node.name, tuple(extra_opts))


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------- key

def ensure_key(paths: ClusterPaths, comment: str) -> bool:
    """Create the cluster's ed25519 key if absent (0600). Returns True when a key was created."""
    paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(paths.dir, 0o700)
    os.chmod(paths.dir.parent.parent, 0o700)
    if paths.key.exists():
        if paths.key.stat().st_mode & 0o077:
            os.chmod(paths.key, 0o600)
        if not paths.pub.exists():
            pub = subprocess.run(["ssh-keygen", "-y", "-f", str(paths.key)], capture_output=True, text=True,
                                 check=True, timeout=30).stdout
            paths.pub.write_text(pub.strip() + f" {comment}\n")
        return False
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(paths.key)],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)
    os.chmod(paths.key, 0o600)
    return True


# --------------------------------------------------------------------------------- known_hosts

@dataclass(frozen=True)
class HostKey:
    host: str  # known_hosts host field: `addr` or `[addr]:port`
    keytype: str
    blob: str  # base64

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def line(self) -> str:
        return f"{self.host} {self.keytype} {self.blob}"

    @property
    def label(self) -> str:
        kind = self.keytype.removeprefix("ssh-").split("-")[0].upper()
        return f"{kind} {self.fingerprint}"


def parse_known_hosts(text: str) -> list[HostKey]:
    keys = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or line.lstrip().startswith("#") or parts[0].startswith("|"):
            continue
        if parts[0].startswith("@"):  # @cert-authority / @revoked markers: keep out of our logic
            continue
        for host in parts[0].split(","):
            keys.append(HostKey(host, parts[1], parts[2]))
    return keys


def render_known_hosts(keys: list[HostKey]) -> str:
    return "".join(k.line + "\n" for k in sorted(set(keys), key=lambda k: (k.host, k.keytype)))


def keyscan(node: Node, timeout: int = 5) -> tuple[list[HostKey], str]:
    argv = ["ssh-keyscan", "-T", str(timeout), "-p", str(node.port), node.address]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout * 4 + 5)
    except subprocess.TimeoutExpired:
        return [], "ssh-keyscan timed out"
    keys = [HostKey(node.ssh_target, k.keytype, k.blob) for k in parse_known_hosts(proc.stdout)]
    return keys, proc.stderr


@dataclass
class KeyMerge:
    new: list[HostKey] = field(default_factory=list)
    known: list[HostKey] = field(default_factory=list)
    changed: list[tuple[HostKey, HostKey]] = field(default_factory=list)  # (old, new)


def merge_host_keys(existing: list[HostKey], scanned: list[HostKey]) -> KeyMerge:
    """Accept-new semantics per (host, key type): unknown -> new, same -> known, else changed."""
    by_type = {(k.host, k.keytype): k for k in existing}
    result = KeyMerge()
    for key in scanned:
        old = by_type.get((key.host, key.keytype))
        if old is None:
            result.new.append(key)
        elif old.blob == key.blob:
            result.known.append(key)
        else:
            result.changed.append((old, key))
    return result


# ---------------------------------------------------------------------------------- ssh_config

LEGACY_WARNING = """\
WARNING: {node} ({addr}) offers only the legacy host key algorithm 'ssh-rsa'.
  'ssh-rsa' signs with SHA-1, which is broken for signatures (practical chosen-prefix
  collisions since 2020); OpenSSH 8.8+ refuses it by default, which is why plain ssh says
  "no matching host key type found. Their offer: ssh-rsa".
  clustertune enabled `HostKeyAlgorithms +ssh-rsa` for {node} ONLY, in {config}.
  Host-key checking stays on: the host's key is still verified against known_hosts.
  Proper fix, on {node}: give sshd an ed25519 host key, then re-run `clustertune cluster ssh`:
      sudo ssh-keygen -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
      echo 'HostKey /etc/ssh/ssh_host_ed25519_key' | sudo tee -a /etc/ssh/sshd_config
      sudo systemctl restart ssh     # (or upgrade OpenSSH >= 7.2 for rsa-sha2-256/512 signatures)"""


def _q(path: str) -> str:
    return '"' + path.replace('"', '\\"') + '"'


def render_ssh_config(cluster: Cluster, cluster_dir: str, legacy: set[str] | frozenset[str] = frozenset(),
                      connect_timeout: int = 10) -> str:
    """One Host entry per node. `cluster_dir` is the absolute directory on the machine that will
    use the file (or the @CLUSTER_DIR@ placeholder that each node fills in)."""
    out = [f"# Generated by clustertune for cluster {cluster.name!r}; re-run `clustertune cluster ssh`",
           "# rather than editing. Used as `ssh -F <this file> NODE` by clustertune, pdsh and DeepSpeed.",
           ""]
    for node in cluster.nodes:
        out += [f"Host {node.name}",
                f"    HostName {node.address}",
                f"    Port {node.port}",
                f"    User {node.user}",
                f"    IdentityFile {_q(cluster_dir + '/' + KEY_NAME)}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {_q(cluster_dir + '/known_hosts')}",
                "    StrictHostKeyChecking accept-new",
                "    HashKnownHosts no",
                "    CheckHostIP no",
                "    BatchMode yes",
                "    PasswordAuthentication no",
                "    KbdInteractiveAuthentication no",
                f"    ConnectTimeout {connect_timeout}",
                "    ServerAliveInterval 15",
                "    ServerAliveCountMax 4"]
        if node.name in legacy:
            out += ["    # LEGACY: this server offers only 'ssh-rsa' (SHA-1 signatures). Enabled for this host",
                    "    # alone; fix the server by adding an ed25519 host key, then re-run `clustertune cluster ssh`.",
                    "    # (PubkeyAcceptedAlgorithms stays default: the cluster's own key is ed25519.)",
                    "    HostKeyAlgorithms +ssh-rsa"]
        out.append("")
    return "\n".join(out)


def write_private(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- the procedure

@dataclass
class NodeStatus:
    node: Node
    state: str = "unknown"  # ok | auth | legacy | changed | down
    detail: str = ""


def probe_access(paths: ClusterPaths, node: Node, timeout: int = 20) -> tuple[str, str]:
    """Can the cluster key log in (BatchMode)? -> (kind, detail); kind 'ok' or an SshFailure kind."""
    argv = ["ssh", "-F", str(paths.ssh_config), "-o", "BatchMode=yes", "-o", "LogLevel=INFO", node.name, "true"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "ssh timed out"
    if proc.returncode == 0:
        return "ok", ""
    failure = classify_ssh_error(proc.stderr, proc.returncode)
    return failure.kind, failure.summary


def install_payload(cluster: Cluster, paths: ClusterPaths, legacy: set[str]) -> dict:
    return {
        "cluster": cluster.name,
        "authorized_key": paths.pub.read_text().strip(),
        "files": [
            {"name": KEY_NAME, "content": paths.key.read_text(), "mode": 0o600},
            {"name": f"{KEY_NAME}.pub", "content": paths.pub.read_text(), "mode": 0o644},
            {"name": "known_hosts", "content": paths.known_hosts.read_text(), "mode": 0o644},
            {"name": "ssh_config", "content": render_ssh_config(cluster, PLACEHOLDER, legacy), "mode": 0o644,
             "template": True},
            {"name": "state.json", "content": paths.state.read_text(), "mode": 0o644},
        ],
    }


def bootstrap_target(paths: ClusterPaths, node: Node, identity: Path | None, interactive: bool) -> SshTarget:
    """ssh with the user's existing access: a given key, else the agent/default keys, and (on a
    terminal) a password that ssh itself asks for once per node. Host keys are still checked
    against the cluster known_hosts."""
    opts = ["-o", f"BatchMode={'no' if interactive else 'yes'}"]
    if identity is not None:
        opts += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    else:
        opts += ["-o", "IdentitiesOnly=no"]
    if interactive:
        opts += ["-o", "PasswordAuthentication=yes", "-o", "KbdInteractiveAuthentication=yes",
                 "-o", "NumberOfPasswordPrompts=3"]
    return SshTarget(paths.ssh_config, node.name, tuple(opts))


def matrix(cluster: Cluster, paths: ClusterPaths, timeout: int = 10) -> dict[str, dict[str, dict]]:
    """For every ordered pair (a, b): can a ssh to b with BatchMode using a's own cluster files?
    Reached through the master's ssh to a. -> {a: {b: {"ok": bool, "error": str}}}"""
    names = [n.name for n in cluster.nodes]

    def row(a: Node) -> tuple[str, dict]:
        res = run_snippet(paths.target(a), "matrix", {"cluster": cluster.name, "peers": names, "timeout": timeout},
                          timeout=timeout * 3 + 30)
        if not res.ok or "peers" not in res.data:
            why = res.error or res.get("error", "no answer")
            return a.name, {b: {"ok": False, "error": f"cannot run on {a.name}: {why}"} for b in names}
        return a.name, res.data["peers"]

    return dict(parallel(row, cluster.nodes))


def format_matrix(names: list[str], result: dict[str, dict[str, dict]]) -> str:
    width = max(8, *(len(n) for n in names)) + 2
    lines = ["from \\ to".ljust(width) + "".join(n.ljust(width) for n in names)]
    for a in names:
        cells = "".join(("ok" if result[a][b]["ok"] else "FAIL").ljust(width) for b in names)
        lines.append(a.ljust(width) + cells)
    fails = [(a, b, result[a][b].get("error", "")) for a in names for b in names if not result[a][b]["ok"]]
    for a, b, err in fails:
        lines.append(f"  {a} -> {b}: {err}")
    return "\n".join(lines)


def matrix_ok(result: dict[str, dict[str, dict]]) -> bool:
    return all(cell["ok"] for row in result.values() for cell in row.values())


def scan_and_merge(cluster: Cluster, paths: ClusterPaths) -> None:
    """Seed/refresh the per-cluster known_hosts. Raises SshSetupError on a changed key or an
    unreachable node, before anything is installed anywhere."""
    existing = parse_known_hosts(paths.known_hosts.read_text()) if paths.known_hosts.exists() else []
    scans = parallel(lambda n: (n, *keyscan(n)), cluster.nodes)
    problems: list[str] = []
    accepted = list(existing)
    for node, keys, err in scans:
        if not keys:
            why = classify_ssh_error(err).summary if err.strip() else "no answer"
            problems.append(f"{node.name} ({node.address}:{node.port}): ssh-keyscan got no host key: {why}")
            continue
        merge = merge_host_keys(existing, keys)
        for old, new in merge.changed:
            problems.append(
                f"{node.name} ({node.address}:{node.port}): HOST KEY CHANGED, refusing to continue.\n"
                f"    known: {old.label}\n"
                f"    now:   {new.label}\n"
                "    This is what a man-in-the-middle attack looks like, or the server was reinstalled.\n"
                "    Verify the new fingerprint on the server itself (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub),\n"
                f"    then remove the old entry: ssh-keygen -R '{node.ssh_target}' -f {paths.known_hosts}")
        for key in merge.new:
            _say(f"  new host key for {node.name} ({node.address}:{node.port}): {key.label}")
            accepted.append(key)
    if problems:
        raise SshSetupError("\n".join(problems))
    write_private(paths.known_hosts, render_known_hosts(accepted))


def setup_ssh(cluster: Cluster, *, identity: Path | None = None, interactive: bool | None = None,
              home: Path | None = None) -> int:
    """The whole `cluster ssh` procedure. Returns an exit code."""
    paths = ClusterPaths.for_cluster(cluster, home)
    if interactive is None:
        interactive = identity is None and sys.stdin.isatty()
    if ensure_key(paths, f"clustertune-{cluster.name}"):
        _say(f"created the cluster key {paths.key} (ed25519)")
    else:
        _say(f"using the cluster key {paths.key}")

    _say(f"host keys -> {paths.known_hosts}")
    scan_and_merge(cluster, paths)

    # Which hosts need the legacy algorithm? Ask each server with the strict config first.
    legacy: set[str] = set()
    write_private(paths.state, json.dumps({"legacy_hosts": []}) + "\n")
    write_private(paths.ssh_config, render_ssh_config(cluster, str(paths.dir), legacy))
    status = {n.name: NodeStatus(n) for n in cluster.nodes}
    for node, (kind, detail) in zip(cluster.nodes, parallel(lambda n: probe_access(paths, n), cluster.nodes),
                                       strict=True):
        status[node.name].state, status[node.name].detail = kind, detail
        if kind == "legacy-hostkey":
            legacy.add(node.name)
    if legacy:
        write_private(paths.state, json.dumps({"legacy_hosts": sorted(legacy)}) + "\n")
        write_private(paths.ssh_config, render_ssh_config(cluster, str(paths.dir), legacy))
        for name in sorted(legacy):
            node = cluster.node(name)
            print(LEGACY_WARNING.format(node=name, addr=f"{node.address}:{node.port}", config=paths.ssh_config),
                  file=sys.stderr, flush=True)
            kind, detail = probe_access(paths, node)
            status[name].state, status[name].detail = kind, detail

    blocked = [s for s in status.values() if s.state not in ("ok", "auth")]
    if blocked:
        raise SshSetupError("cannot reach: " + "; ".join(f"{s.node.name}: {s.detail}" for s in blocked))

    # Install on every node: the ones that already accept the cluster key get refreshed files
    # through it; the others through the user's existing access, one node at a time when a
    # password may be typed.
    payload = install_payload(cluster, paths, legacy)
    need_bootstrap = [s.node for s in status.values() if s.state == "auth"]
    ready = [s.node for s in status.values() if s.state == "ok"]

    def install_with(target: SshTarget, node: Node, bootstrap: bool) -> tuple[Node, RemoteResult]:
        tty = interactive and bootstrap
        return node, run_snippet(target, "install", payload, timeout=300 if tty else 60, interactive=tty)

    results: list[tuple[Node, RemoteResult]] = parallel(lambda n: install_with(paths.target(n), n, False), ready)
    if need_bootstrap:
        how = (f"the key {identity}" if identity else
               "your password (ssh asks once per node)" if interactive else "your ssh agent / default keys")
        _say(f"installing the cluster key on {', '.join(n.name for n in need_bootstrap)} using {how}")

        def boot(n: Node) -> tuple[Node, RemoteResult]:
            return install_with(bootstrap_target(paths, n, identity, interactive), n, True)
        if interactive:  # one node at a time: ssh asks for each node's password on the terminal
            results += [boot(n) for n in need_bootstrap]
        else:
            results += parallel(boot, need_bootstrap)
    failed = [(n, r) for n, r in results if not r.ok]
    for node, res in results:
        if res.ok:
            _say(f"  {node.name}: cluster key {res.get('authorized')}, files in {res.get('dir')}")
    if failed:
        raise SshSetupError("installation failed on: " + "; ".join(f"{n.name}: {r.error}" for n, r in failed) +
                            "\n  (give an existing key with --identity, or run on a terminal to type a password)")

    _say("verifying: ssh with BatchMode from every node to every node")
    result = matrix(cluster, paths)
    names = [n.name for n in cluster.nodes]
    _say(format_matrix(names, result))
    if not matrix_ok(result):
        _say("mutual passwordless ssh: FAILED")
        return 1
    _say(f"mutual passwordless ssh: OK ({len(names)} nodes, {len(names) ** 2} ordered pairs)")
    _say(f"ssh config for other tools: ssh -F {paths.ssh_config} {names[0]}")
    return 0


def check_only(cluster: Cluster, home: Path | None = None) -> int:
    paths = ClusterPaths.for_cluster(cluster, home)
    if not paths.ssh_config.exists():
        print(f"no ssh config for cluster {cluster.name!r} at {paths.ssh_config}: run `clustertune cluster ssh`",
              file=sys.stderr)
        return 1
    result = matrix(cluster, paths)
    names = [n.name for n in cluster.nodes]
    _say(format_matrix(names, result))
    return 0 if matrix_ok(result) else 1
