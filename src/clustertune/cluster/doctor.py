"""`clustertune cluster doctor`: every pre-flight check on every node, in parallel, one table.

    clustertune cluster doctor --cluster cluster.toml [--recipe RECIPE.toml] [--fast]

Two rounds of one ssh per node, all nodes at once (each with a timeout):
  1. probe: interpreter, package versions (read from metadata, nothing imported), paths, pdsh,
     GPUs, route to the master, interfaces, free disk, /dev/shm; the master also writes a token
     file for the shared-filesystem check;
  2. the master really listens on master_addr:master_port while every node connects to it,
     looks for the master's token, and (unless --fast) ssh-es to every node (mutual matrix).
A row per node, a column per check, a verdict per check, the fix for each failure. Exit code 1
if anything blocking failed. `clustertune launch` runs the same checks (fast) before training.
"""

from __future__ import annotations

import json
import os
import secrets as _random
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustertune.cluster.inventory import Cluster, Node
from clustertune.cluster.remote import (LocalTarget, RemoteResult, SshTarget, classify_ssh_error, parallel,
                                        program, parse_result, run_snippet)
from clustertune.cluster.ssh import ClusterPaths

CHECKS = ("ssh", "mutual", "pdsh", "python", "versions", "paths", "gpus", "port", "nic", "shared-fs", "disk", "shm")
PACKAGES = ("torch", "deepspeed", "transformers", "clustertune")
GIB = 1024 ** 3


@dataclass(frozen=True)
class Cell:
    verdict: str  # ok | warn | fail | skip | info
    short: str = ""
    detail: str = ""
    fix: str = ""

    def text(self) -> str:
        word = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "-", "info": ""}[self.verdict]
        return (word + (" " if word and self.short else "") + self.short).strip() or "-"


SKIP = Cell("skip")


@dataclass
class Report:
    cluster: Cluster
    checks: tuple[str, ...]
    rows: dict[str, dict[str, Cell]] = field(default_factory=dict)
    nic_by_node: dict[str, str | None] = field(default_factory=dict)
    shared_fs: bool | None = None
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[tuple[str, str, Cell]]:
        return [(n, c, cell) for n, row in self.rows.items() for c, cell in row.items() if cell.verdict == "fail"]

    @property
    def warnings(self) -> list[tuple[str, str, Cell]]:
        return [(n, c, cell) for n, row in self.rows.items() for c, cell in row.items() if cell.verdict == "warn"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def verdict(self, check: str) -> str:
        cells = [row.get(check, SKIP) for row in self.rows.values()]
        if any(c.verdict == "fail" for c in cells):
            return "FAIL"
        if any(c.verdict == "warn" for c in cells):
            return "WARN"
        if all(c.verdict == "skip" for c in cells):
            return "-"
        return "ok"

    def render(self) -> str:
        c = self.cluster
        head = [f"cluster {c.name!r}: {len(c.nodes)} node(s), {c.world_size} slot(s), master {c.master_node.name} "
                f"({c.rendezvous_addr}:{c.master_port}), accelerator {c.accelerator}"]
        names = [n.name for n in c.ordered_nodes()]
        table = [["node", *self.checks]]
        table += [[n, *(self.rows[n].get(k, SKIP).text() for k in self.checks)] for n in names]
        table.append(["verdict", *(self.verdict(k) for k in self.checks)])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines = head + ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table]
        if self.failures:
            lines.append("")
            lines.append(f"blocking problems ({len(self.failures)}):")
            for node, check, cell in self.failures:
                lines.append(f"  {node} / {check}: {cell.detail or cell.short}")
                if cell.fix:
                    lines.append(f"      fix: {cell.fix}")
        if self.warnings:
            lines.append("")
            lines.append("warnings (not blocking):")
            for node, check, cell in self.warnings:
                lines.append(f"  {node} / {check}: {cell.detail or cell.short}")
                if cell.fix:
                    lines.append(f"      note: {cell.fix}")
        nics = {v for v in self.nic_by_node.values() if v}
        if nics:
            lines.append("")
            if len(nics) == 1:
                lines.append(f"NCCL_SOCKET_IFNAME=GLOO_SOCKET_IFNAME={nics.pop()} (interface holding each node's "
                             "route to the master)")
            else:
                lines.append("interfaces (route to the master): " +
                             ", ".join(f"{n}={v}" for n, v in self.nic_by_node.items()))
        lines += self.notes
        lines.append("")
        lines.append("doctor: OK" if self.ok else f"doctor: FAILED ({len(self.failures)} blocking problem(s))")
        return "\n".join(lines)


# ------------------------------------------------------------------------- expected disk usage

def model_parameter_count(model_path: str) -> int | None:
    """Parameters of a built-in shape, or estimated from a local model directory's weight files."""
    from clustertune.shapes import SHAPES
    if model_path in SHAPES:
        return SHAPES[model_path].parameter_count()
    path = Path(model_path)
    if not path.is_dir():
        return None
    size = sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    width = 2
    try:
        dtype = json.loads((path / "config.json").read_text()).get("torch_dtype") or "bfloat16"
        width = 4 if "32" in str(dtype) else 2
    except (OSError, ValueError):
        pass
    return size // width if size else None


def expected_disk_bytes(params: int, *, lora: bool, keep_last: int, checkpointing: bool, share: float,
                        export_here: bool, cpu: bool) -> int:
    """Bytes one node needs under the output directory: ZeRO checkpoints (fp32 master weights and
    two Adam moments, 12 B/param, plus the 16/32-bit weights) for keep_last + 1 checkpoints (the new
    one is written before the oldest is deleted), times this node's share of them (1 on a shared
    filesystem), plus the exported model (bf16, fp32 on CPU) where the export is written."""
    width = 4 if cpu else 2
    per_checkpoint = params * width if lora else params * (12 + width)
    total = int(per_checkpoint * (keep_last + 1) * share) if checkpointing else 0
    return total + (params * width if export_here else 0)


# ------------------------------------------------------------------------------------- running

def _targets(cluster: Cluster, paths: ClusterPaths | None) -> dict[str, SshTarget | LocalTarget]:
    if paths is None:
        return {n.name: LocalTarget(n.name) for n in cluster.nodes}
    return {n.name: paths.target(n) for n in cluster.nodes}


def run_doctor(cluster: Cluster, *, recipe: Any = None, mutual: bool = True, connect_timeout: int = 10,
               need_pdsh: bool = True, local: bool = False, python: str | None = None, workdir: str | None = None,
               home: Path | None = None) -> Report:
    """All checks; `local`: the implicit one-node cluster, probed without ssh."""
    python = python or sys.executable
    workdir = workdir or os.getcwd()
    checks = tuple(c for c in CHECKS if (mutual or c != "mutual") and (need_pdsh or c != "pdsh")
                   and not (local and c in ("ssh", "mutual", "pdsh", "shared-fs")))
    report = Report(cluster, checks)
    paths = None if local else ClusterPaths.for_cluster(cluster, home)
    master = cluster.master_node
    nodes = cluster.ordered_nodes()
    for n in nodes:
        report.rows[n.name] = {}

    if paths is not None and not paths.ssh_config.exists():
        for n in nodes:
            report.rows[n.name] = {c: SKIP for c in checks}
            report.rows[n.name]["ssh"] = Cell("fail", "no config", f"no ssh config for cluster {cluster.name!r} at "
                                              f"{paths.ssh_config}", "run `clustertune cluster ssh` first")
        return report
    targets = _targets(cluster, paths)
    if paths is not None:
        targets = {name: SshTarget(t.config, t.name, ("-o", f"ConnectTimeout={connect_timeout}"))
                   for name, t in targets.items()}

    output_dir = os.path.abspath(os.path.join(workdir, recipe.run.output_dir)) if recipe else workdir
    check_paths = [workdir] + _recipe_paths(recipe, workdir)
    token = f".clustertune-fs-{uuid.uuid4().hex[:12]}"

    def probe(n: Node) -> RemoteResult:
        args = {"python": python, "paths": check_paths, "master_addr": cluster.rendezvous_addr,
                "output_dir": output_dir, "write_token": token if (n.name == master.name and not local) else None}
        return run_snippet(targets[n.name], "probe", args, timeout=connect_timeout + 60)

    probes = dict(zip([n.name for n in nodes], parallel(probe, nodes), strict=True))
    reachable = [n for n in nodes if probes[n.name].ok]

    # Round 2: master listens, everyone connects (+ token, + mutual ssh).
    nonce = _random.token_hex(8)
    token_path = probes[master.name].get("token_path") if probes[master.name].ok else None
    listen_res, connects = _port_round(cluster, targets, reachable, nonce, token_path, mutual and not local,
                                       connect_timeout)

    ref = probes[master.name].get("versions") if probes[master.name].ok else None
    legacy = paths.legacy_hosts() if paths is not None else set()
    for n in nodes:
        report.rows[n.name] = _row(cluster, n, probes[n.name], connects.get(n.name), listen_res, ref, report,
                                   checks=checks, python=python, recipe=recipe, token_path=token_path, local=local)
        if n.name in legacy and report.rows[n.name].get("ssh", SKIP).verdict == "ok":
            report.rows[n.name]["ssh"] = Cell(
                "warn", "ssh-rsa", f"{n.name} offers only the legacy SHA-1 'ssh-rsa' host key algorithm "
                "(enabled for this host alone)",
                "add an ed25519 host key to its sshd, then re-run `clustertune cluster ssh`")
        if probes[n.name].ok:
            report.versions[n.name] = probes[n.name].get("versions") or {}
    if "shared-fs" in checks and token_path:
        others = [connects[n.name].get("token_seen") for n in reachable if n.name != master.name
                  and connects.get(n.name) and connects[n.name].ok]
        report.shared_fs = bool(others) and all(others) if others else None
    elif local:
        report.shared_fs = True
    _disk_cells(report, cluster, probes, recipe, nodes)
    return report


def _recipe_paths(recipe: Any, workdir: str) -> list[str]:
    """Recipe paths that exist here and so must exist on every node (built-in names do not)."""
    if recipe is None:
        return []
    out = []
    for p in [recipe.model.path, *recipe.data.train_files, *recipe.data.eval_files]:
        full = os.path.abspath(os.path.join(workdir, p))
        if os.path.exists(full):
            out.append(full)
    return out


def _port_round(cluster: Cluster, targets: dict, reachable: list[Node], nonce: str, token_path: str | None,
                mutual: bool, connect_timeout: int) -> tuple[dict | None, dict[str, RemoteResult]]:
    master = cluster.master_node
    if not any(n.name == master.name for n in reachable):
        return None, {}
    listen_args = {"addr": cluster.rendezvous_addr, "port": cluster.master_port, "nonce": nonce,
                   "token_path": token_path, "expect": [n.name for n in reachable], "timeout": 30 + connect_timeout}
    argv = targets[master.name].argv("python3 -")
    listener = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_lines: list[str] = []
    watchdog = threading.Timer(90 + 4 * connect_timeout, listener.kill)  # bounds the READY wait too
    watchdog.start()
    try:
        assert listener.stdin is not None and listener.stdout is not None
        listener.stdin.write(program("listen", listen_args).encode())
        listener.stdin.close()
        listener.stdin = None  # so communicate() below does not flush it
        ready = False
        for raw in listener.stdout:  # READY arrives before anyone connects
            line = raw.decode("utf-8", "replace").rstrip("\n")
            out_lines.append(line)
            if line == "READY":
                ready = True
                break
        connects: dict[str, RemoteResult] = {}
        if ready:
            peers = [n.name for n in cluster.nodes] if mutual else []

            def connect(n: Node) -> RemoteResult:
                return run_snippet(targets[n.name], "connect",
                                   {"addr": cluster.rendezvous_addr, "port": cluster.master_port, "nonce": nonce,
                                    "name": n.name, "timeout": 5, "token_path": token_path,
                                    "cluster": cluster.name, "peers": peers, "ssh_timeout": connect_timeout},
                                   timeout=connect_timeout * 3 + 40)
            connects = dict(zip([n.name for n in reachable], parallel(connect, reachable), strict=True))
        rest, err = listener.communicate(timeout=60 + connect_timeout)
        out_lines.append(rest.decode("utf-8", "replace"))
    except subprocess.TimeoutExpired:
        listener.kill()
        listener.wait()
        return {"bound": False, "error": "the master's listener did not finish"}, {}
    finally:
        watchdog.cancel()
    result = parse_result("\n".join(out_lines))
    if result is None:
        result = {"bound": False, "error": classify_ssh_error(err.decode("utf-8", "replace")).summary}
    return result, connects


def _versions_cell(v: dict | None, ref: dict | None, is_master: bool, master_name: str) -> Cell:
    if not v or "error" in v:
        return Cell("fail", "error", f"cannot read package versions: {(v or {}).get('error', 'no answer')}",
                    "check that the interpreter runs on this node")
    missing = [p for p in PACKAGES if not v.get(p)]
    if missing:
        return Cell("fail", "missing", f"not installed: {', '.join(missing)}",
                    f"pip install the same {', '.join(missing)} as on {master_name} into this interpreter")
    if not is_master and ref:
        diff = [f"{p} {v.get(p)} (master {master_name}: {ref.get(p)})" for p in PACKAGES if v.get(p) != ref.get(p)]
        if v.get("python_version") != ref.get("python_version"):
            diff.append(f"python {v.get('python_version')} (master: {ref.get('python_version')})")
        if diff:
            pins = " ".join(f"{p}=={ref.get(p)}" for p in PACKAGES[:3] if ref.get(p))
            return Cell("fail", "differs", "different versions: " + "; ".join(diff),
                        f"install the master's versions on this node ({pins}), or share one environment")
    return Cell("ok", f"torch {v.get('torch')}")


def _row(cluster: Cluster, n: Node, res: RemoteResult, conn: RemoteResult | None, listen: dict | None,
         ref: dict | None, report: Report, *, checks: tuple[str, ...], python: str, recipe: Any,
         token_path: str | None, local: bool) -> dict[str, Cell]:
    master = cluster.master_node
    is_master = n.name == master.name
    row: dict[str, Cell] = {c: SKIP for c in checks}
    if not res.ok:
        failure = classify_ssh_error(res.stderr, res.returncode)
        row["ssh" if "ssh" in checks else "python"] = Cell(
            "fail", failure.kind if res.returncode == 255 else "error",
            f"{n.user}@{n.address}:{n.port}: {res.error}", failure.fix if res.returncode == 255 else
            "make python3 available on the node")
        report.nic_by_node[n.name] = n.nic
        return row
    d = res.data
    if "ssh" in checks:
        row["ssh"] = Cell("ok")
    if "pdsh" in checks:
        row["pdsh"] = (Cell("ok") if d.get("pdsh") else
                       Cell("fail", "missing", "pdsh not installed on the master (the DeepSpeed launcher runs it)",
                            "apt-get install pdsh (or dnf install pdsh pdsh-rcmd-ssh)")
                       ) if is_master else Cell("info", "")
    row["python"] = Cell("ok") if d.get("python_exists") else Cell(
        "fail", "missing", f"{python} does not exist on this node",
        "create the same Python environment at the same path on every node (DeepSpeed starts this exact "
        "interpreter on each node), or put it on a shared filesystem")
    row["versions"] = _versions_cell(d.get("versions"), ref, is_master, master.name) if d.get("python_exists") else SKIP
    missing = [p for p, ok in d.get("paths", {}).items() if not ok]
    row["paths"] = Cell("ok") if not missing else Cell(
        "fail", f"{len(missing)} missing", "missing on this node: " + ", ".join(missing),
        "copy them to the same absolute path on every node, or use a shared filesystem")
    gpus = d.get("gpus")
    cpu_mode = cluster.accelerator == "cpu" or (recipe is not None and recipe.train.device == "cpu")
    if cpu_mode:
        row["gpus"] = Cell("warn", "cpu mode", f"cpu mode: {n.slots} CPU rank(s), gloo backend"
                           + (f" ({gpus} GPU(s) present but unused)" if gpus else ""),
                           "fine for tests; set accelerator = \"gpu\" in the cluster file for GPU training")
    elif gpus is None:
        row["gpus"] = Cell("fail", "none", "no GPU visible (nvidia-smi not found)" + (
            f": {d.get('gpu_error')}" if d.get("gpu_error") else ""),
                           "install the NVIDIA driver, or set accelerator = \"cpu\" in the cluster file")
    elif gpus < n.slots:
        row["gpus"] = Cell("fail", f"{gpus}<{n.slots}", f"{gpus} GPU(s) visible, slots = {n.slots}",
                           f"set slots = {gpus} for {n.name} in the cluster file, or fix the driver / "
                           "CUDA_VISIBLE_DEVICES")
    else:
        row["gpus"] = Cell("ok", f"{gpus}")
    # master port
    if listen is not None and is_master and not listen.get("bound") and "errno 99" in str(listen.get("error")):
        row["port"] = Cell("fail", "bad addr", f"{cluster.rendezvous_addr} is not an address of the master "
                           f"{master.name}: {listen.get('error')}",
                           "set master_addr to one of the master's own addresses (or remove it)")
    elif listen is not None and is_master and not listen.get("bound"):
        row["port"] = Cell("fail", "busy", f"cannot listen on {cluster.rendezvous_addr}:{cluster.master_port}: "
                           f"{listen.get('error')}",
                           "another run (or program) holds the port: stop it, or choose another master_port")
    elif conn is None or not conn.ok:
        row["port"] = Cell("fail", "error", f"port check did not run: {conn.error if conn else 'master unreachable'}")
    elif conn.get("port_ok"):
        row["port"] = Cell("ok")
    else:
        row["port"] = Cell("fail", "blocked", f"cannot connect to {cluster.rendezvous_addr}:{cluster.master_port}: "
                           f"{conn.get('port_error')}",
                           f"allow TCP {cluster.master_port} (and the ephemeral ports NCCL/gloo use) from this node to "
                           "the master; check master_addr")
    # interface
    route = d.get("route") or {}
    nics = d.get("nics") or []
    dev = route.get("dev")
    if n.nic is not None and n.nic not in nics:
        row["nic"] = Cell("fail", n.nic, f"interface {n.nic!r} (nic in the cluster file) does not exist on {n.name}; "
                          f"it has: {', '.join(nics)}",
                          f"set nic = \"{dev}\" for {n.name} (its route to the master) or remove the nic key"
                          if dev else "fix or remove the nic key")
        report.nic_by_node[n.name] = None
    elif not dev:
        row["nic"] = Cell("fail", "no route", f"no route to the master {cluster.rendezvous_addr}: {route.get('error')}",
                          "fix the network/address")
        report.nic_by_node[n.name] = n.nic
    elif n.nic is not None and n.nic != dev:
        row["nic"] = Cell("warn", n.nic, f"nic = {n.nic} but the route to the master goes through {dev}",
                          "fine if that interface reaches the master; otherwise set nic = \"%s\"" % dev)
        report.nic_by_node[n.name] = n.nic
    else:
        row["nic"] = Cell("ok", dev)
        report.nic_by_node[n.name] = dev
    # shared filesystem
    if "shared-fs" in checks:
        if is_master:
            row["shared-fs"] = (Cell("info", "token") if token_path else
                                Cell("warn", "no token", d.get("token_error", "")))
        elif conn is not None and conn.ok and token_path:
            row["shared-fs"] = Cell("info", "shared") if conn.get("token_seen") else Cell(
                "warn", "not shared", "the output directory is not on a filesystem shared with the master",
                "not blocking: the launcher copies the run files to every node; each node keeps its own "
                "checkpoint shards; the exported model is written on the master")
    # shm
    shm = d.get("shm")
    if shm is None:
        row["shm"] = Cell("warn", "none", "/dev/shm missing", "mount a tmpfs on /dev/shm")
    elif shm < 256 * 1024 ** 2 and not cpu_mode:
        row["shm"] = Cell("fail", _gib(shm), f"/dev/shm is only {_gib(shm)}: NCCL needs shared memory",
                          "in Docker: --shm-size=16g (or --ipc=host); else remount /dev/shm larger")
    elif shm < GIB:
        row["shm"] = Cell("warn", _gib(shm), f"/dev/shm is only {_gib(shm)}",
                          "larger is safer for NCCL and data loader workers (Docker: --shm-size=16g)")
    else:
        row["shm"] = Cell("ok", _gib(shm))
    # mutual
    if "mutual" in checks:
        m = (conn.get("matrix") if conn is not None and conn.ok else None) or {}
        if "peers" not in m:
            row["mutual"] = Cell("fail", "error", f"mutual check did not run: {m.get('error', 'no answer')}",
                                 "run `clustertune cluster ssh`")
        else:
            bad = {p: r.get("error", "") for p, r in m["peers"].items() if not r.get("ok")}
            row["mutual"] = Cell("ok") if not bad else Cell(
                "fail", f"{len(bad)} fail", "cannot ssh to: " + "; ".join(f"{p} ({e})" for p, e in bad.items()),
                "run `clustertune cluster ssh` (installs the key, config and known_hosts on every node)")
    row.setdefault("disk", SKIP)
    return row


def _gib(b: float) -> str:
    return f"{b / GIB:.1f}G" if b < 10 * GIB else f"{b / GIB:.0f}G"


def _disk_cells(report: Report, cluster: Cluster, probes: dict[str, RemoteResult], recipe: Any,
                nodes: list[Node]) -> None:
    params = model_parameter_count(recipe.model.path) if recipe is not None else None
    for n in nodes:
        res = probes[n.name]
        if not res.ok or "disk" not in report.checks:
            continue
        free = res.data["disk"]["free"]
        if params is None:
            report.rows[n.name]["disk"] = Cell("ok", _gib(free) + " free")
            continue
        shared = report.shared_fs is not False
        need = expected_disk_bytes(
            params, lora=recipe.lora.enabled, keep_last=recipe.checkpoint.keep_last,
            checkpointing=recipe.checkpoint.every_steps > 0,
            share=1.0 if shared else n.slots / cluster.world_size,
            export_here=shared or n.name == cluster.master_node.name,
            cpu=cluster.accelerator == "cpu" or recipe.train.device == "cpu")
        if free < need:
            report.rows[n.name]["disk"] = Cell(
                "fail", f"{_gib(free)}<{_gib(need)}",
                f"{_gib(free)} free at {res.data['disk']['path']}, the run needs about {_gib(need)} "
                f"(checkpoints x{recipe.checkpoint.keep_last + 1} + export)",
                "free space, lower checkpoint.keep_last, or point run.output_dir at a bigger disk")
        else:
            report.rows[n.name]["disk"] = Cell("ok", f"{_gib(free)}")
