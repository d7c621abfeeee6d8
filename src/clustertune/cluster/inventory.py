"""The cluster file: which nodes, how to reach them over ssh, how many ranks each runs.

    name = "gpu"              # names the per-cluster ssh directory (~/.clustertune/clusters/gpu)
    master = "node1"          # rank-0 node; default: the first node
    master_port = 29500       # torch.distributed rendezvous port on the master
    accelerator = "gpu"       # "gpu" (slots = GPUs per node) or "cpu" (gloo, DS_ACCELERATOR=cpu)

    [[nodes]]
    name = "node1"            # ssh Host alias, pdsh host and DeepSpeed hostfile name
    address = "10.0.0.11"     # IP or DNS name, reachable from every node
    user = "root"
    port = 22
    slots = 8
    nic = "eth0"              # optional: interface for NCCL/gloo (default: the route to the master)
    [nodes.env]               # optional: variables for this node's ranks alone (cluster/node_env.py)
    NCCL_HOSTID = "node1"

Every string that ever reaches a command line or a remote shell (names, addresses, users,
interfaces) is validated against a strict character set here, so a cluster file cannot make a
remote shell run anything the user did not intend. The DeepSpeed hostfile is generated from this,
never hand-edited. Launcher side: never imports torch.
"""

from __future__ import annotations

import getpass
import ipaddress
import re
import sys
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clustertune.cluster.node_env import check_node_env
from clustertune.config import format_validation_error, read_toml_file
from clustertune.errors import UserError


class ClusterError(UserError):
    """A cluster file (or flag) that cannot be used; the message is meant for the user as-is."""


# A node name is an ssh Host alias, a pdsh host and a DeepSpeed hostfile key: letters, digits and
# `._-`, starting with a letter or digit (no ssh pattern characters `*?!,`, no whitespace).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# RFC 1123 host name labels.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
NIC_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,14}$")  # IFNAMSIZ = 16 incl. NUL
SHELL_META = set("`$&|;<>()[]{}\\\"' \t\n*?!#~^%,=")


def check_address(value: str) -> str:
    """An IPv4/IPv6 address or a DNS host name; anything else (spaces, shell metacharacters,
    `user@host`, `host:port`) is an error that names the offending character. Numbers that only
    look like an IPv4 address (`10.0.0.256`, `172.16.80`, `010.0.0.1`) are errors, not host names,
    and so are addresses no node can have (0.0.0.0, ::, multicast, broadcast)."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    bad = sorted(set(value) & (SHELL_META | {"@", "/"}))
    if bad and ":" not in value:
        raise ValueError(f"{value!r} contains {', '.join(repr(c) for c in bad)}: an address is an IP or a host name, "
                         "with no shell metacharacters, user@ or :port (use the user/port keys)")
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        ip = None
    if ip is not None:
        _check_usable_ip(value, ip)
        return str(ip)
    if ":" in value:
        raise ValueError(f"{value!r} is not an IPv6 address; write the ssh port in `port`, not after a colon")
    _check_not_a_broken_ipv4(value)
    if not HOSTNAME_RE.match(value):
        raise ValueError(f"{value!r} is not an IP address or a valid host name")
    return value


def _check_usable_ip(value: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if ip.is_unspecified:
        raise ValueError(f"{value!r} is the unspecified (zero) address, not a host: give the node's own address")
    if ip.is_multicast:
        raise ValueError(f"{value!r} is a multicast address, not a host: give the node's own address")
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{value!r} is the broadcast address, not a host: give the node's own address")


def _check_not_a_broken_ipv4(value: str) -> None:
    """A name whose last label is all digits is no host name (RFC 1123 top-level labels are not
    numeric): it is a mistyped IPv4 address, and the resolver would read it in surprising ways
    (`172.16.80` is 172.16.0.80, `010.0.0.1` is 8.0.0.1 to inet_aton)."""
    parts = value.rstrip(".").split(".")
    if not parts[-1].isdigit():
        return
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"{value!r} is neither an IPv4 address nor a host name (a host name cannot end in a "
                         "number)")
    if len(parts) != 4:
        raise ValueError(f"{value!r} has {len(parts)} number(s), an IPv4 address has 4 (a.b.c.d): a digit group "
                         "is missing or extra")
    for part in parts:
        if len(part) > 1 and part.startswith("0"):
            plain = ".".join(str(int(p)) for p in parts)
            raise ValueError(f"{value!r}: the leading zero in {part!r} is ambiguous (octal for some tools, decimal "
                             f"for others); write {plain!r} if that is the address you mean")
        if int(part) > 255:
            raise ValueError(f"{value!r}: {part} is not an IPv4 number (each of the 4 is 0-255)")
    raise ValueError(f"{value!r} is not a valid IPv4 address")


def same_host_key(address: str) -> str:
    """How two addresses are compared for duplicates: host names ignore case (DNS does); IPs are
    already in canonical form (check_address)."""
    return address.rstrip(".").lower()


def network_warnings(cluster: "Cluster") -> list[str]:
    """Nodes whose IP address looks like it is on another network than the master's: one is in a
    private range and the other public, or both IPv4 but in different /16s. Usually a typo (the
    seed article typed 172.168.x.y, a public address, for a node of a 172.16.0.0/12 network), so a
    warning, not an error."""
    master = cluster.master_node
    try:
        master_ip = ipaddress.ip_address(master.address)
    except ValueError:
        return []  # a host name: its network is known only after DNS
    warnings = []
    for i, node in enumerate(cluster.nodes):
        try:
            ip = ipaddress.ip_address(node.address)
        except ValueError:
            continue
        if node.name == master.name or ip.version != master_ip.version or ip.is_loopback:
            continue
        reason = None
        if ip.is_private != master_ip.is_private and (ip.is_global or master_ip.is_global):
            reason = (f"{ip} is a {'private' if ip.is_private else 'public'} address and the master's "
                      f"{master_ip} a {'private' if master_ip.is_private else 'public'} one")
        elif ip.version == 4 and ip.is_private == master_ip.is_private \
                and ipaddress.ip_network(f"{ip}/16", strict=False) != ipaddress.ip_network(f"{master_ip}/16", strict=False):
            reason = f"{ip} and the master's {master_ip} are in different /16 networks"
        if reason:
            warnings.append(f"nodes[{i}] ({node.name}) address {ip} is on another network than the master "
                            f"{master.name} ({master_ip}): {reason}. A typo? Nodes of one cluster are "
                            "normally on one network; fix the address, or ignore this if they reach each other")
    return warnings


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)


class Node(_Strict):
    name: str
    address: str
    user: str = Field(default_factory=getpass.getuser)
    port: int = Field(default=22, ge=1, le=65535)
    slots: int = Field(default=1, ge=1, le=1024)
    nic: str | None = None
    env: dict[str, str] = Field(default_factory=dict)  # this node's ranks only (cluster/node_env.py)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return check_node_env(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid node name (letters, digits, '._-', starting with a "
                             "letter or digit, at most 63 characters)")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        return check_address(v)

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not USER_RE.match(v):
            raise ValueError(f"{v!r} is not a valid user name")
        return v

    @field_validator("nic")
    @classmethod
    def _nic(cls, v: str | None) -> str | None:
        if v is not None and not NIC_RE.match(v):
            raise ValueError(f"{v!r} is not a valid network interface name")
        return v

    @property
    def ssh_target(self) -> str:
        """How ssh-keyscan and known_hosts name this host: `addr` on port 22, `[addr]:port` else."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


class Cluster(_Strict):
    name: str = "cluster"
    master: str | None = None
    master_addr: str | None = None  # default: the master node's address
    master_port: int = Field(default=29500, ge=1024, le=65535)
    accelerator: Literal["gpu", "cpu"] = "gpu"
    nodes: list[Node] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid cluster name (letters, digits, '._-')")
        return v

    @field_validator("master_addr")
    @classmethod
    def _master_addr(cls, v: str | None) -> str | None:
        return None if v is None else check_address(v)

    @model_validator(mode="after")
    def _consistent(self) -> "Cluster":
        # Names and host names are compared ignoring case: ssh matches Host aliases and DNS
        # resolves names that way, so `GPU1` and `gpu1` are one node listed twice.
        seen_names: dict[str, int] = {}
        seen_addr: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            name_key = node.name.lower()
            if name_key in seen_names:
                j = seen_names[name_key]
                raise ValueError(f"nodes[{i}].name: duplicate node name {node.name!r} (also nodes[{j}]: "
                                 f"{self.nodes[j].name!r}; names are compared ignoring case)")
            seen_names[name_key] = i
            addr_key = same_host_key(node.address)
            if addr_key in seen_addr:
                j = seen_addr[addr_key]
                raise ValueError(f"nodes[{i}].address: duplicate address {node.address!r} "
                                 f"(also nodes[{j}].address {self.nodes[j].address!r}; host names are compared "
                                 "ignoring case): each node must be listed once")
            seen_addr[addr_key] = i
        names = [n.name for n in self.nodes]
        if self.master is not None and self.master not in names:
            raise ValueError(f"master: {self.master!r} is not one of the nodes "
                             f"({', '.join(names)})")
        if len(self.nodes) > 1:
            for i, node in enumerate(self.nodes):
                if is_loopback(node.address):
                    raise ValueError(f"nodes[{i}].address: {node.address!r} is a loopback address; in a "
                                     "cluster of several nodes the others cannot reach it, use the "
                                     "node's network address")
        return self

    # ------------------------------------------------------------------ derived views
    @property
    def master_node(self) -> Node:
        name = self.master or self.nodes[0].name
        return next(n for n in self.nodes if n.name == name)

    @property
    def rendezvous_addr(self) -> str:
        return self.master_addr or self.master_node.address

    def ordered_nodes(self) -> list[Node]:
        """The master first (it holds rank 0), then the others in file order."""
        master = self.master_node
        return [master] + [n for n in self.nodes if n.name != master.name]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ClusterError(f"no node named {name!r} in cluster {self.name!r}")

    @property
    def world_size(self) -> int:
        return sum(n.slots for n in self.nodes)


def hostfile_text(cluster: Cluster) -> str:
    """DeepSpeed/MPI hostfile, master first so that it holds rank 0: `name slots=N` lines."""
    return "".join(f"{n.name} slots={n.slots}\n" for n in cluster.ordered_nodes())


def cluster_from_dict(tree: dict[str, Any], source: str = "<cluster>") -> Cluster:
    try:
        return Cluster.model_validate(tree)
    except ValidationError as err:
        raise ClusterError(format_validation_error(err, source, "cluster file")) from None


def load_cluster(path: str | Path, warn: Callable[[str], None] | None = None) -> Cluster:
    """The validated cluster file; its warnings (network_warnings) go to `warn`, by default
    stderr, so every command that reads the file shows them."""
    path = Path(path)
    tree = read_toml_file(path, ClusterError, "cluster file not found (create one with `clustertune cluster init`)")
    cluster = cluster_from_dict(tree, str(path))
    for text in network_warnings(cluster):
        (warn or _warn_stderr)(f"{path}: {text}")
    return cluster


def _warn_stderr(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def localhost_cluster(slots: int, accelerator: Literal["gpu", "cpu"], master_port: int = 29500) -> Cluster:
    """The implicit one-node cluster of `clustertune launch` without --cluster."""
    return Cluster(name="localhost", master_port=master_port, accelerator=accelerator,
                   nodes=[Node(name="localhost", address="127.0.0.1", slots=slots)])


def cluster_to_toml(cluster: Cluster) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = ["# clustertune cluster file (clustertune cluster init). Validated on load: unknown keys,",
           "# duplicate nodes, slots < 1 and shell metacharacters are errors.",
           f"name = {q(cluster.name)}"]
    if cluster.master is not None:
        out.append(f"master = {q(cluster.master)}")
    if cluster.master_addr is not None:
        out.append(f"master_addr = {q(cluster.master_addr)}")
    out.append(f"master_port = {cluster.master_port}")
    out.append(f"accelerator = {q(cluster.accelerator)}")
    for n in cluster.nodes:
        out += ["", "[[nodes]]", f"name = {q(n.name)}", f"address = {q(n.address)}", f"user = {q(n.user)}",
                f"port = {n.port}", f"slots = {n.slots}"]
        if n.nic is not None:
            out.append(f"nic = {q(n.nic)}")
        if n.env:
            out += ["[nodes.env]", *(f"{k} = {q(v)}" for k, v in n.env.items())]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------- `cluster init` flags

_NODE_SPEC_RE = re.compile(
    r"^(?P<name>[^=]+)=(?:(?P<user>[^@]+)@)?(?P<addr>\[[^\]]+\]|[^:\[\]]+)"
    r"(?::(?P<port>\d*))?(?::(?P<slots>\d*))?(?::(?P<nic>[^:]+))?$")


def parse_node_spec(spec: str, default_user: str | None = None, default_slots: int = 1) -> dict[str, Any]:
    """`NAME=[USER@]ADDRESS[:PORT[:SLOTS[:NIC]]]` -> node dict (validated later by Node).
    IPv6 addresses go in brackets: `n1=root@[fd00::1]:22:8`. Empty fields take defaults:
    `n1=10.0.0.1::8` is port 22, 8 slots."""
    m = _NODE_SPEC_RE.match(spec)
    if not m:
        raise ClusterError(f"--node {spec!r}: expected NAME=[USER@]ADDRESS[:PORT[:SLOTS[:NIC]]], "
                           "e.g. gpu1=root@10.0.0.11:22:8")
    addr = m["addr"]
    if addr.startswith("["):
        addr = addr[1:-1]
    node: dict[str, Any] = {"name": m["name"], "address": addr,
                            "user": m["user"] or default_user or getpass.getuser(),
                            "port": int(m["port"]) if m["port"] else 22,
                            "slots": int(m["slots"]) if m["slots"] else default_slots}
    if m["nic"]:
        node["nic"] = m["nic"]
    return node
