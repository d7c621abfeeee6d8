"""`clustertune cluster init|ssh|doctor`.

    clustertune cluster init --node gpu1=root@10.0.0.11:22:8 --node gpu2=root@10.0.0.12:22:8 [--out cluster.toml]
    clustertune cluster init                       # on a terminal: asks, node by node
    clustertune cluster ssh [--cluster cluster.toml] [--identity ~/.ssh/id_ed25519] [--check]
    clustertune cluster doctor [--cluster cluster.toml] [--recipe RECIPE.toml] [--fast]
    clustertune cluster stop RUN_DIR [--cluster cluster.toml]   # stop a run whose launcher died

Node spec: NAME=[USER@]ADDRESS[:PORT[:SLOTS[:NIC]]]; IPv6 in brackets; empty fields take
defaults (user: you, port 22, slots: --slots). The master is the first node unless --master.

`cluster ssh` keeps the cluster's key, known_hosts and ssh config in
~/.clustertune/clusters/<cluster name>/ on every node (see clustertune.cluster.ssh). To install
the key it uses the access you already have: --identity KEY, else your ssh agent / default
keys, else (on a terminal) ssh itself asks for each node's password, once per node. Run it on
the master node; every later step (doctor, launch) uses only the cluster key.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any, Callable

from clustertune.cluster.inventory import (Cluster, ClusterError, Node, cluster_from_dict, cluster_to_toml,
                                           load_cluster, parse_node_spec)
from pydantic import ValidationError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clustertune cluster", description="cluster inventory, ssh, pre-flight doctor")
    sub = p.add_subparsers(dest="action", required=True)

    init = sub.add_parser("init", help="write a cluster file from flags, or interactively")
    init.add_argument("--out", "--cluster", dest="out", default="cluster.toml")
    init.add_argument("--name", default=None, help="cluster name (default: the file's stem)")
    init.add_argument("--node", action="append", default=[], metavar="NAME=[USER@]ADDR[:PORT[:SLOTS[:NIC]]]")
    init.add_argument("--user", default=None, help="default ssh user (default: you)")
    init.add_argument("--slots", type=int, default=1, help="default slots (GPUs) per node")
    init.add_argument("--master", default=None, help="master node name (default: the first)")
    init.add_argument("--master-addr", default=None, help="rendezvous address, if not the master's ssh address")
    init.add_argument("--master-port", type=int, default=29500)
    init.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    init.add_argument("--interactive", action="store_true", help="ask even when stdin is not a terminal")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    ssh = sub.add_parser("ssh", help="passwordless, mutual, host-key-verified ssh between all nodes")
    ssh.add_argument("--cluster", default="cluster.toml")
    ssh.add_argument("--identity", "-i", default=None,
                     help="an existing private key that already logs in to the nodes (else: agent, default "
                          "keys, or a password typed once per node on a terminal)")
    ssh.add_argument("--check", action="store_true", help="only verify the mutual matrix")

    doc = sub.add_parser("doctor", help="pre-flight checks on every node, one table")
    doc.add_argument("--cluster", default="cluster.toml")
    doc.add_argument("--recipe", default=None, help="check the recipe's paths and disk needs too")
    doc.add_argument("--set", dest="overrides", action="append", default=[])
    doc.add_argument("--fast", action="store_true", help="skip the mutual ssh matrix and the interconnect test")
    doc.add_argument("--timeout", type=int, default=10, help="ssh connect timeout, seconds")

    stop = sub.add_parser("stop", help="stop every process of a run on every node (e.g. after the launcher died)")
    stop.add_argument("run_dir", help="the run's output directory (holds launch/run.json)")
    stop.add_argument("--cluster", default="cluster.toml")
    return p


def cmd_cluster(args: argparse.Namespace) -> int:
    a = _parser().parse_args(args.cluster_args)
    if a.action == "init":
        return cmd_init(a)
    cluster = load_cluster(a.cluster)
    if a.action == "stop":
        from clustertune.cluster.launch import stop_run
        return stop_run(cluster, Path(a.run_dir))
    if a.action == "ssh":
        from clustertune.cluster import ssh
        if a.check:
            return ssh.check_only(cluster)
        return ssh.setup_ssh(cluster, identity=Path(a.identity).expanduser() if a.identity else None)
    if a.action == "doctor":
        from clustertune.cluster import doctor
        recipe = None
        if a.recipe:
            from clustertune.config import load_recipe
            recipe = load_recipe(a.recipe, a.overrides)
        report = doctor.run_doctor(cluster, recipe=recipe, mutual=not a.fast, connect_timeout=a.timeout,
                                   bandwidth=not a.fast)
        print(report.render())
        return 0 if report.ok else 1
    return 2


# ---------------------------------------------------------------------------------------- init

def _ask(prompt: str, default: str | None, check: Callable[[str], Any], read: Callable[[str], str]) -> Any:
    while True:
        shown = f"{prompt} [{default}]: " if default not in (None, "") else f"{prompt}: "
        answer = read(shown).strip()
        if not answer and default is not None:
            answer = default
        try:
            return check(answer)
        except (ValueError, ClusterError, ValidationError) as err:
            msg = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            print(f"  {msg.removeprefix('Value error, ')}", file=sys.stderr)


def _interactive(a: argparse.Namespace, read: Callable[[str], str]) -> dict[str, Any]:
    def ranged(lo: int, hi: int) -> Callable[[str], int]:
        def check(s: str) -> int:
            v = int(s)
            if not lo <= v <= hi:
                raise ValueError(f"must be between {lo} and {hi}")
            return v
        return check

    def positive(s: str) -> int:
        v = int(s)
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    def field(name: str) -> Callable[[str], Any]:
        def check(value: str) -> Any:
            probe = {"name": "n", "address": "127.0.0.1", name: value}
            return getattr(Node.model_validate(probe), name)
        return check

    tree: dict[str, Any] = {}
    tree["name"] = _ask("cluster name", a.name or Path(a.out).stem or "cluster",
                        lambda s: Cluster.model_validate(
                            {"name": s, "nodes": [{"name": "n", "address": "127.0.0.1"}]}).name,
                        read)
    count = _ask("number of nodes", "2", positive, read)
    nodes = []
    for i in range(count):
        print(f"node {i + 1} of {count}")
        node = {"name": _ask("  name", f"node{i + 1}", field("name"), read),
                "address": _ask("  address (IP or host name)", None, field("address"), read),
                "user": _ask("  ssh user", a.user or getpass.getuser(), field("user"), read),
                "port": _ask("  ssh port", "22", ranged(1, 65535), read),
                "slots": _ask("  slots (GPUs)", str(a.slots), positive, read)}
        nic = _ask("  network interface (empty: the route to the master)", "", lambda s: s, read)
        if nic:
            node["nic"] = field("nic")(nic)
        nodes.append(node)
    tree["nodes"] = nodes
    names = [n["name"] for n in nodes]
    master = _ask("master node", names[0], lambda s: s if s in names else (_ for _ in ()).throw(
        ValueError(f"one of {', '.join(names)}")), read)
    if master != names[0]:
        tree["master"] = master
    tree["master_port"] = _ask("master port", str(a.master_port), ranged(1024, 65535), read)
    tree["accelerator"] = _ask("accelerator (gpu|cpu)", a.accelerator,
                               lambda s: s if s in ("gpu", "cpu") else (_ for _ in ()).throw(ValueError("gpu or cpu")),
                               read)
    return tree


def build_from_flags(a: argparse.Namespace) -> dict[str, Any]:
    tree: dict[str, Any] = {"name": a.name or Path(a.out).stem or "cluster", "master_port": a.master_port,
                            "accelerator": a.accelerator,
                            "nodes": [parse_node_spec(s, a.user, a.slots) for s in a.node]}
    if a.master:
        tree["master"] = a.master
    if a.master_addr:
        tree["master_addr"] = a.master_addr
    return tree


def cmd_init(a: argparse.Namespace, read: Callable[[str], str] | None = None) -> int:
    out = Path(a.out)
    if out.exists() and not a.force:
        raise ClusterError(f"{out} exists; use --force to overwrite")
    if a.node:
        tree = build_from_flags(a)
    elif a.interactive or sys.stdin.isatty():
        tree = _interactive(a, read or input)
    else:
        raise ClusterError("give the nodes with --node NAME=[USER@]ADDRESS[:PORT[:SLOTS[:NIC]]] (repeatable), "
                           "or run on a terminal to be asked")
    cluster = cluster_from_dict(tree, "<cluster init>")
    out.write_text(cluster_to_toml(cluster))
    print(f"wrote {out}: {len(cluster.nodes)} nodes, {cluster.world_size} slots, master {cluster.master_node.name} "
          f"({cluster.rendezvous_addr}:{cluster.master_port})")
    print(f"next: clustertune cluster ssh --cluster {out}")
    return 0
