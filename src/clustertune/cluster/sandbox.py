"""A real multi-node cluster on one Linux machine, from network namespaces (needs root).

    sudo clustertune sandbox up [--name NAME] [--nodes 2] [--slots 1] [--legacy node2]
    sudo clustertune sandbox up --nodes 2 --gpus-per-node 2 [--sshd /path/to/sshd]   # GPU nodes
    sudo clustertune sandbox up ... --env LD_LIBRARY_PATH=/usr/local/nvidia/lib64   # in every node's shell
    sudo clustertune sandbox exec node1 [--name NAME] -- clustertune cluster ssh --cluster CLUSTER.toml ...
    sudo clustertune sandbox down [--name NAME]

Layout (NAME defaults to "sandbox"):
  * a "switch" namespace ct-NAME-sw holding the bridge br0: nothing is added to the host's own
    network namespace, so the nodes can reach each other and nothing else;
  * per node a namespace ct-NAME-nodeK with one veth pair (eth0 inside the node, its peer on the
    bridge), address 10.231.S.(10+K)/24, loopback up;
  * per node its own sshd (own host key, own config, listening only on the node's address,
    started by PID and recorded), its own home directory (sshd `SetEnv HOME=...`) and its own
    authorized_keys, so every node is a separate ssh identity even though the nodes share this
    machine's filesystem (which makes the sandbox a shared-filesystem cluster);
  * optionally nodes that offer only the legacy `ssh-rsa` host key algorithm (--legacy);
  * a one-time bootstrap key authorized on every node, standing in for the password a user types
    once per node; `sandbox revoke-bootstrap` removes it everywhere;
  * with --gpus-per-node G: node K owns GPUs K*G .. K*G+G-1 of this machine (CUDA_VISIBLE_DEVICES
    in its shell environment and in the cluster file's `[nodes.env]`, which the launcher hands to
    that node's ranks alone), slots = G, accelerator "gpu", nic "eth0". NCCL would see one host
    (same hostname hash) and join the nodes through shared memory and CUDA IPC, which fails across
    network namespaces (ncclSystemError, measured); a distinct NCCL_HOSTID per node makes every
    node another host to it, so between nodes it uses NET/Socket over eth0 like between servers,
    while the GPUs of one node keep P2P. NCCL_IB_DISABLE=1: the nodes are joined by eth0 alone.

sshd: the first of $CLUSTERTUNE_SSHD (or --sshd), /usr/sbin/sshd, /usr/local/sbin/sshd, /sbin/sshd,
`sshd` on PATH; it needs its privilege-separation user `sshd` and directory /run/sshd (created).

State (names, PIDs, paths) is recorded in /run/clustertune-sandbox/NAME/state.json as each piece
is created, so `down` removes exactly what `up` created, even after a failed `up`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clustertune.cluster.inventory import NAME_RE, Cluster, Node, cluster_to_toml
from clustertune.gpus import local_gpu_ids
from clustertune.errors import UserError

ROOT = Path("/run/clustertune-sandbox")
PRIVSEP = Path("/run/sshd")
SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")


class SandboxError(UserError):
    """This machine cannot build or run the sandbox (not root, a tool missing, a node down)."""

    exit_code = 1  # the machine, not the command line, is what needs fixing


def _run(argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise SandboxError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


SSHD_ENV = "CLUSTERTUNE_SSHD"


def find_sshd(preferred: str | None = None) -> str:
    """The sshd binary: `preferred` (--sshd) or $CLUSTERTUNE_SSHD when given, else the usual places."""
    chosen = preferred or os.environ.get(SSHD_ENV)
    if chosen:
        if not os.path.isabs(chosen) or not os.access(chosen, os.X_OK):
            raise SandboxError(f"sshd {chosen!r} (--sshd / ${SSHD_ENV}) is not an executable absolute path "
                               "(sshd must be started by its absolute path)")
        return chosen
    for path in SSHD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("sshd")
    if found:
        return os.path.abspath(found)
    raise SandboxError("sshd not found (apt-get install openssh-server, or give its path with --sshd)")


def assign_gpus(gpu_ids: list[str], nodes: int, per_node: int) -> list[list[str]]:
    """Node K gets the K-th run of per_node GPUs; an error when the machine has too few."""
    if nodes * per_node > len(gpu_ids):
        raise SandboxError(f"--nodes {nodes} x --gpus-per-node {per_node} needs {nodes * per_node} GPUs; this "
                           f"machine has {len(gpu_ids)} ({','.join(gpu_ids) or 'none'}): lower --gpus-per-node")
    return [gpu_ids[k * per_node:(k + 1) * per_node] for k in range(nodes)]


def gpu_node_env(sandbox: str, node: str, gpus: list[str]) -> dict[str, str]:
    """What makes a sandbox node a GPU server of its own to CUDA and NCCL (see the module doc)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "NCCL_HOSTID": f"{sandbox}-{node}", "NCCL_IB_DISABLE": "1"}


def unavailable_reason(sshd: str | None = None) -> str | None:
    """Why a sandbox cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth pairs and sshd on namespace addresses)"
    if not shutil.which("ip"):
        return "`ip` (iproute2) not installed"
    try:
        find_sshd(sshd)
    except SandboxError as err:
        return str(err)
    try:
        pwd.getpwnam("sshd")
    except KeyError:
        return ("no user `sshd` (sshd's privilege separation user): "
                "useradd --system --no-create-home --home-dir /run/sshd --shell /usr/sbin/nologin sshd")
    for tool in ("ssh", "ssh-keygen", "ssh-keyscan"):
        if not shutil.which(tool):
            return f"`{tool}` (openssh-client) not installed"
    probe = f"ct-probe-{os.getpid()}"
    try:
        proc = _run(["ip", "netns", "add", probe], check=False)
        if proc.returncode != 0:
            return f"`ip netns add` does not work here: {proc.stderr.strip()}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


@dataclass
class SandboxNode:
    name: str
    ns: str
    address: str
    dir: str
    legacy: bool = False
    env: dict[str, str] = field(default_factory=dict)
    sshd_pid: int | None = None

    @property
    def home(self) -> Path:
        return Path(self.dir) / "home"

    @property
    def etc(self) -> Path:
        return Path(self.dir) / "etc"

    @property
    def sshd_config(self) -> Path:
        return self.etc / "sshd_config"

    @property
    def sshd_log(self) -> Path:
        return self.etc / "sshd.log"

    @property
    def authorized_keys(self) -> Path:
        return self.home / ".ssh" / "authorized_keys"


@dataclass
class SandboxState:
    name: str
    dir: str
    subnet: str  # "10.231.S"
    switch_ns: str
    nodes: list[SandboxNode] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)  # created, in creation order
    created_privsep: bool = False
    bootstrap_key: str | None = None
    slots: int = 1
    gpus_per_node: int = 0  # 0: a CPU cluster (gloo)
    sshd: str | None = None  # the sshd binary chosen at `up`

    def save(self) -> None:
        path = Path(self.dir) / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, name: str, root: Path = ROOT) -> "SandboxState":
        path = root / name / "state.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise SandboxError(f"no sandbox named {name!r} (no {path})") from None
        raw["nodes"] = [SandboxNode(**n) for n in raw["nodes"]]
        return cls(**raw)


class Sandbox:
    """Build and tear down a sandbox cluster. Usable as a context manager (down on exit)."""

    def __init__(self, name: str = "sandbox", nodes: int = 2, *, slots: int = 1, legacy: tuple[str, ...] = (),
                 node_env: dict[str, dict[str, str]] | None = None, gpus_per_node: int = 0,
                 sshd: str | None = None, env: dict[str, str] | None = None, root: Path = ROOT):
        if not NAME_RE.match(name) or len(name) > 24:
            raise SandboxError(f"sandbox name {name!r}: letters, digits, '._-', at most 24 characters")
        if nodes < 1 or nodes > 200:
            raise SandboxError("--nodes must be between 1 and 200")
        if gpus_per_node < 0:
            raise SandboxError("--gpus-per-node must be >= 1 (or 0: CPU nodes)")
        self.name, self.n, self.root = name, nodes, root
        self.gpus_per_node, self.sshd = gpus_per_node, sshd
        self.slots = gpus_per_node or slots
        self.legacy = set(legacy)
        names = [f"node{i + 1}" for i in range(nodes)]
        for name, value in (env or {}).items():  # goes into sshd_config's SetEnv "NAME=VALUE"
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name) or any(c in value for c in '"\\\n'):
                raise SandboxError(f"--env {name}={value!r}: a variable name, and a value without quotes, "
                                   "backslashes or newlines")
        given = {k: dict(v) for k, v in (node_env or {}).items()}
        self.node_env = {n: {**(env or {}), **given.get(n, {})} for n in names if env or n in given}
        unknown = (self.legacy | set(given)) - set(names)
        if unknown:
            raise SandboxError(f"unknown sandbox node(s): {', '.join(sorted(unknown))} (nodes are {', '.join(names)})")
        self.state: SandboxState | None = None
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------------------------ up
    @property
    def dir(self) -> Path:
        return self.root / self.name

    def up(self) -> "Sandbox":
        reason = unavailable_reason(self.sshd)
        if reason:
            raise SandboxError(f"cannot build a sandbox: {reason}")
        if (self.dir / "state.json").exists():
            raise SandboxError(f"sandbox {self.name!r} already exists ({self.dir}); `clustertune sandbox down "
                               f"--name {self.name}` first")
        gpus = assign_gpus(local_gpu_ids(), self.n, self.gpus_per_node) if self.gpus_per_node else None
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.dir.mkdir(mode=0o755)
        subnet_octet = 1 + int(hashlib.sha256(self.name.encode()).hexdigest(), 16) % 250
        st = self.state = SandboxState(name=self.name, dir=str(self.dir), subnet=f"10.231.{subnet_octet}",
                                       switch_ns=f"ct-{self.name}-sw", slots=self.slots,
                                       gpus_per_node=self.gpus_per_node, sshd=find_sshd(self.sshd))
        if gpus is not None:  # each node's shell sees its own GPUs (the NCCL settings go in the cluster file)
            for k, ids in enumerate(gpus):
                self.node_env.setdefault(f"node{k + 1}", {}).setdefault("CUDA_VISIBLE_DEVICES", ",".join(ids))
        st.save()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self.state.namespaces.append(ns)
        self.state.save()
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _build(self) -> None:
        st = self.state
        if not PRIVSEP.exists():
            PRIVSEP.mkdir(mode=0o755)
            st.created_privsep = True
        self._add_ns(st.switch_ns)
        _run(["ip", "-n", st.switch_ns, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", st.switch_ns, "link", "set", "br0", "up"])
        boot = self.dir / "bootstrap_ed25519"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"clustertune-sandbox-{self.name}-bootstrap",
              "-f", str(boot)])
        st.bootstrap_key = str(boot)
        for i in range(self.n):
            name = f"node{i + 1}"
            node = SandboxNode(name=name, ns=f"ct-{self.name}-{name}", address=f"{st.subnet}.{11 + i}",
                               dir=str(self.dir / name), legacy=name in self.legacy,
                               env=dict(self.node_env.get(name, {})))
            st.nodes.append(node)
            st.save()
            self._add_ns(node.ns)
            # One veth pair, created directly in its two namespaces: eth0 in the node, nodeK on the bridge.
            _run(["ip", "link", "add", name, "netns", st.switch_ns, "type", "veth", "peer", "name", "eth0",
                  "netns", node.ns])
            _run(["ip", "-n", st.switch_ns, "link", "set", name, "master", "br0", "up"])
            _run(["ip", "-n", node.ns, "addr", "add", f"{node.address}/24", "dev", "eth0"])
            _run(["ip", "-n", node.ns, "link", "set", "eth0", "up"])
            self._prepare_node(node, boot.with_suffix(".pub").read_text())
            self.start_sshd(node)
        self._write_cluster_file()
        st.save()

    def _prepare_node(self, node: SandboxNode, bootstrap_pub: str) -> None:
        for d, mode in ((Path(node.dir), 0o755), (node.etc, 0o755), (node.home, 0o755), (node.home / ".ssh", 0o700)):
            d.mkdir(mode=mode, exist_ok=True)
            os.chmod(d, mode)
        fd = os.open(node.authorized_keys, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, bootstrap_pub.encode())
        os.close(fd)
        self._host_key(node)
        setenv = " ".join(f'"{k}={v}"' for k, v in {"HOME": str(node.home), **node.env}.items())
        lines = [f"ListenAddress {node.address}", "Port 22"]
        if node.legacy:  # an old server: only an RSA host key, only the SHA-1 "ssh-rsa" algorithm
            lines += [f"HostKey {node.etc / 'ssh_host_rsa_key'}", "HostKeyAlgorithms ssh-rsa"]
        else:
            lines += [f"HostKey {node.etc / 'ssh_host_ed25519_key'}"]
        lines += [f"PidFile {node.etc / 'sshd.pid'}",
                  f"AuthorizedKeysFile {node.authorized_keys}",
                  "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
                  "PermitRootLogin prohibit-password", "StrictModes yes", "PrintMotd no",
                  "MaxStartups 200:30:400", "MaxSessions 100", "LogLevel INFO",
                  f"SetEnv {setenv}", "Subsystem sftp internal-sftp"]
        node.sshd_config.write_text("\n".join(lines) + "\n")

    def _host_key(self, node: SandboxNode) -> None:
        kind = "rsa" if node.legacy else "ed25519"
        key = node.etc / f"ssh_host_{kind}_key"
        for path in (key, key.with_suffix(".pub")):
            path.unlink(missing_ok=True)
        argv = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"{node.name}-host", "-f", str(key)]
        if kind == "rsa":
            argv[4:4] = ["-b", "2048"]
        _run(argv)

    def start_sshd(self, node: SandboxNode | str) -> None:
        node = self.node(node) if isinstance(node, str) else node
        sshd = self.state.sshd or find_sshd(self.sshd)
        _run([sshd, "-t", "-f", str(node.sshd_config)])
        log = open(node.sshd_log, "ab")
        try:
            # `ip netns exec` execs sshd, so the PID we record is sshd's own.
            proc = subprocess.Popen(["ip", "netns", "exec", node.ns, sshd, "-D", "-e", "-f", str(node.sshd_config)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        node.sshd_pid = proc.pid
        self._procs[node.name] = proc
        self.state.save()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if f"Server listening on {node.address} port 22" in node.sshd_log.read_text(errors="replace"):
                return
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise SandboxError(f"sshd for {node.name} did not start: {node.sshd_log.read_text(errors='replace')[-500:]}")

    def stop_sshd(self, node: SandboxNode | str) -> None:
        node = self.node(node) if isinstance(node, str) else node
        if node.sshd_pid is not None:
            _stop_pid(node.sshd_pid, str(node.sshd_config), self._procs.pop(node.name, None))
            node.sshd_pid = None
            self.state.save()

    def rotate_host_key(self, node: SandboxNode | str) -> None:
        """Give a node a new host key (a reinstalled server, or an attacker): restart its sshd."""
        node = self.node(node) if isinstance(node, str) else node
        self.stop_sshd(node)
        self._host_key(node)
        self.start_sshd(node)

    def revoke_bootstrap(self) -> None:
        """Remove the one-time bootstrap key from every node and delete it."""
        st = self.state
        if not st.bootstrap_key:
            return
        pub = Path(st.bootstrap_key + ".pub")
        blob = pub.read_text().split()[1] if pub.exists() else None
        for node in st.nodes:
            if blob and node.authorized_keys.exists():
                kept = [line for line in node.authorized_keys.read_text().splitlines(keepends=True) if blob not in line]
                node.authorized_keys.write_text("".join(kept))
        for path in (Path(st.bootstrap_key), pub):
            path.unlink(missing_ok=True)
        st.bootstrap_key = None
        st.save()

    def _write_cluster_file(self) -> None:
        st = self.state
        if st.gpus_per_node:
            nodes = [Node(name=n.name, address=n.address, user="root", port=22, slots=st.slots, nic="eth0",
                          env=gpu_node_env(self.name, n.name, n.env["CUDA_VISIBLE_DEVICES"].split(",")))
                     for n in st.nodes]
        else:
            nodes = [Node(name=n.name, address=n.address, user="root", port=22, slots=st.slots) for n in st.nodes]
        cluster = Cluster(name=self.name, master_port=29500, accelerator="gpu" if st.gpus_per_node else "cpu",
                          nodes=nodes)
        self.cluster_file.write_text(cluster_to_toml(cluster))

    # ------------------------------------------------------------------------------- helpers
    @property
    def cluster_file(self) -> Path:
        return self.dir / "cluster.toml"

    @property
    def nodes(self) -> list[SandboxNode]:
        return self.state.nodes

    def node(self, name: str) -> SandboxNode:
        for n in self.state.nodes:
            if n.name == name:
                return n
        raise SandboxError(f"no node {name!r} in sandbox {self.name!r}")

    def exec_argv(self, node: SandboxNode | str, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """argv that runs a command "on" a node: in its namespace, with its home directory."""
        node = self.node(node) if isinstance(node, str) else node
        pairs = [f"{k}={v}" for k, v in {"HOME": str(node.home), **node.env, **(env or {})}.items()]
        return ["ip", "netns", "exec", node.ns, "env", *pairs, *argv]

    # ---------------------------------------------------------------------------------- down
    @classmethod
    def attach(cls, name: str, root: Path = ROOT) -> "Sandbox":
        state = SandboxState.load(name, root)
        sb = cls(name, len(state.nodes) or 1, slots=state.slots, sshd=state.sshd, root=root)
        sb.state = state
        return sb

    def down(self) -> list[str]:
        """Remove everything this sandbox created: sshd processes, processes still running in the
        node namespaces (started through the nodes' sshd), namespaces (with their veth pairs and the
        bridge), keys and directories. Returns what could not be removed (empty on success)."""
        st = self.state
        problems: list[str] = []
        if st is None:
            return problems
        for node in st.nodes:
            if node.sshd_pid is not None:
                _stop_pid(node.sshd_pid, str(node.sshd_config), self._procs.pop(node.name, None))
        for ns in reversed(st.namespaces):
            _kill_ns_processes(ns)
            proc = _run(["ip", "netns", "del", ns], check=False)
            if proc.returncode != 0 and ns in _list_ns():
                problems.append(f"namespace {ns}: {proc.stderr.strip()}")
        shutil.rmtree(st.dir, ignore_errors=True)
        if Path(st.dir).exists():
            problems.append(f"directory {st.dir} not removed")
        if st.created_privsep and PRIVSEP.exists() and not any(self.root.iterdir()):
            try:
                PRIVSEP.rmdir()
            except OSError:
                pass
        if self.root.exists() and not any(self.root.iterdir()):
            self.root.rmdir()
        self.state = None
        return problems

    def __enter__(self) -> "Sandbox":
        return self.up() if self.state is None else self

    def __exit__(self, *exc) -> None:
        self.down()


def _list_ns() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def _stop_pid(pid: int, must_contain: str, proc: subprocess.Popen | None) -> None:
    """Stop one recorded process, after checking its command line is still ours (PID reuse)."""
    if proc is not None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return
    if must_contain not in _cmdline(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _gone(pid):
        time.sleep(0.05)
    if not _gone(pid):
        os.kill(pid, signal.SIGKILL)


def _kill_ns_processes(ns: str) -> None:
    """Processes still inside one of our node namespaces were started through that node's sshd
    (sessions, workers of a run): they belong to the sandbox and go with it."""
    pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split() if p.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if not _gone(p)]
        for pid in live:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(not _gone(p) for p in live):
            time.sleep(0.05)


def list_sandboxes(root: Path = ROOT) -> list[str]:
    if not root.exists():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "state.json").exists())


# ------------------------------------------------------------------------------------- CLI

class _ActionParser(argparse.ArgumentParser):
    """`exec NODE [--name N] -- CMD ...`: the words after `--` are the command, split off before
    argparse reads the rest (a `nargs="*"` positional after an option and `--` is an error)."""

    takes_command = False

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        command: list[str] = []
        if self.takes_command and "--" in args:
            cut = args.index("--")
            args, command = args[:cut], args[cut + 1:]
        namespace, extras = super().parse_known_args(args, namespace)
        if self.takes_command:
            namespace.exec_command = command
        return namespace, extras


def add_sandbox_subcommands(p: argparse.ArgumentParser) -> None:
    """`up`, `down`, `list`, `revoke-bootstrap`, `exec` under `clustertune sandbox`."""
    sub = p.add_subparsers(dest="action", required=True, parser_class=_ActionParser)
    name_help = "sandbox name (default: sandbox)"
    up = sub.add_parser("up", help="create the namespaces, bridge, veth pairs and sshd of each node")
    up.add_argument("--name", default="sandbox", help=name_help)
    up.add_argument("--nodes", type=int, default=2, help="number of nodes (default: 2)")
    up.add_argument("--slots", type=int, default=1, help="ranks per node written in the cluster file (CPU nodes)")
    up.add_argument("--gpus-per-node", type=int, default=0, metavar="G",
                    help="GPU nodes: node K owns GPUs K*G..K*G+G-1 of this machine, NCCL sees separate hosts")
    up.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a variable for every node's shell (sshd SetEnv), e.g. the machine's LD_LIBRARY_PATH "
                    "that a login shell would not have (repeatable)")
    up.add_argument("--sshd", default=None, help=f"the sshd binary (absolute path; default ${SSHD_ENV} or the "
                    "usual places)")
    up.add_argument("--legacy", action="append", default=[], metavar="NODE",
                    help="this node's sshd offers only the legacy ssh-rsa host key algorithm (repeatable)")
    down = sub.add_parser("down", help="remove everything `up` created")
    down.add_argument("--name", default="sandbox", help=name_help)
    sub.add_parser("list", help="sandboxes that exist now")
    rv = sub.add_parser("revoke-bootstrap", help="remove the one-time bootstrap key from every node")
    rv.add_argument("--name", default="sandbox", help=name_help)
    ex = sub.add_parser("exec", help="run a command on a node (its namespace and home directory)",
                        usage="clustertune sandbox exec NODE [--name NAME] -- COMMAND ...")
    ex.takes_command = True
    ex.add_argument("node", help="node name, e.g. node1")
    ex.add_argument("--name", default="sandbox", help=name_help)


def cmd_sandbox(a: argparse.Namespace) -> int:
    """`clustertune sandbox ACTION ...`, parsed by the main parser (add_sandbox_subcommands)."""
    command: list[str] = getattr(a, "exec_command", [])
    if a.action == "up":
        common = dict(item.split("=", 1) for item in a.env if "=" in item)
        if len(common) != len(a.env):
            raise SandboxError("--env takes NAME=VALUE")
        sb = Sandbox(a.name, a.nodes, slots=a.slots, legacy=tuple(a.legacy), gpus_per_node=a.gpus_per_node,
                     sshd=a.sshd, env=common).up()
        print(f"sandbox {a.name!r} is up: {len(sb.nodes)} nodes on a private bridge")
        for n in sb.nodes:
            print(f"  {n.name}: {n.address} (namespace {n.ns}, sshd pid {n.sshd_pid}"
                  f"{', legacy ssh-rsa only' if n.legacy else ''}"
                  + (f", GPUs {n.env['CUDA_VISIBLE_DEVICES']}" if sb.state.gpus_per_node else "") + ")")
        print(f"cluster file:   {sb.cluster_file}")
        print(f"bootstrap key:  {sb.state.bootstrap_key} (stands in for your password; revoke with "
              f"`clustertune sandbox revoke-bootstrap --name {a.name}`)")
        print("next, on the master node:")
        print(f"  clustertune sandbox exec node1 --name {a.name} -- clustertune cluster ssh "
              f"--cluster {sb.cluster_file} --identity {sb.state.bootstrap_key}")
        print(f"  clustertune sandbox down --name {a.name}")
        return 0
    if a.action == "list":
        for name in list_sandboxes():
            print(name)
        return 0
    sb = Sandbox.attach(a.name)
    if a.action == "down":
        problems = sb.down()
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"sandbox {a.name!r} removed" if not problems else f"sandbox {a.name!r} partly removed")
        return 1 if problems else 0
    if a.action == "revoke-bootstrap":
        sb.revoke_bootstrap()
        print("bootstrap key removed from every node and deleted")
        return 0
    if a.action == "exec":
        if not command:
            print("error: give a command after --", file=sys.stderr)
            return 2
        return subprocess.call(sb.exec_argv(a.node, command))
    return 2
