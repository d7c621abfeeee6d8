"""`clustertune cluster doctor`: every pre-flight check on every node, in parallel, one table.

    clustertune cluster doctor --cluster cluster.toml [--recipe RECIPE.toml] [--fast]

Two rounds of one ssh per node, all nodes at once (each with a timeout), then (unless --fast) the
interconnect test:
  1. probe: interpreter, package versions (read from metadata, nothing imported), paths, pdsh,
     GPUs, route to the master, interfaces, free disk, /dev/shm; the master also writes a token
     file for the shared-filesystem check;
  2. the master really listens on master_addr:master_port while every node connects to it,
     looks for the master's token, and (unless --fast) ssh-es to every node (mutual matrix);
  3. `python -m clustertune.worker.bandwidth` on every node (node.slots ranks each, NCCL on GPUs,
     gloo on CPU): all-reduce and all-gather bus bandwidth across all nodes and each node's own
     all-reduce, in GB/s; with --recipe, a warning (and the ZeRO++ keys to set) when the link
     between nodes would take more than 20% of the planned step (cluster/interconnect.py).
A row per node, a column per check, a verdict per check, the fix for each failure. Exit code 1
if anything blocking failed. `clustertune launch` runs the same checks (fast) before training.

Each column is one small function of a node's facts (NodeFacts: its probe and port-round
answers) returning a Cell; NODE_CHECKS maps column names to them. Nothing but run_doctor talks
to the nodes, and nothing but run_doctor writes into the Report.
"""

from __future__ import annotations

import json
import os
import secrets as _random
import shlex
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustertune.cluster.inventory import Cluster, Node
from clustertune.cluster.node_env import VALUE_RE
from clustertune.cluster.remote import (LocalTarget, RemoteResult, SshTarget, classify_ssh_error, parallel,
                                        program, parse_result, run_snippet)
from clustertune.cluster.ssh import ClusterPaths

CHECKS = ("ssh", "mutual", "pdsh", "python", "versions", "paths", "gpus", "port", "nic", "shared-fs", "disk", "shm",
          "bandwidth")
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
    # The smallest GPU of each node that said (nvidia-smi): (name, GiB). train.micro_batch_tokens /
    # gradient_checkpointing "auto" are planned for the smallest of the cluster (clustertune.auto).
    gpu_memory: dict[str, tuple[str, float]] = field(default_factory=dict)
    shared_fs: bool | None = None
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bandwidth: "BandwidthResult | None" = None

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
        if self.bandwidth is not None:
            lines.append("")
            lines += self.bandwidth.lines(names)
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


# ------------------------------------------------------------------------------- node facts

@dataclass(frozen=True)
class NodeFacts:
    """What the rounds learned about one node: everything a column's check looks at."""
    cluster: Cluster
    node: Node
    probe: RemoteResult  # round 1
    connect: RemoteResult | None = None  # round 2: port, token, mutual ssh
    listen: dict | None = None  # round 2, the master's listener (the same for every node)
    ref_versions: dict | None = None  # the master's package versions
    python: str = sys.executable
    recipe: Any = None
    token_path: str | None = None
    legacy_hostkey: bool = False  # `cluster ssh` enabled ssh-rsa for this host alone

    @property
    def is_master(self) -> bool:
        return self.node.name == self.cluster.master_node.name

    @property
    def data(self) -> dict[str, Any]:
        return self.probe.data

    @property
    def cpu_mode(self) -> bool:
        return self.cluster.accelerator == "cpu" or (self.recipe is not None and self.recipe.train.device == "cpu")

    @property
    def connected(self) -> bool:
        return self.connect is not None and self.connect.ok


def route_nic(f: NodeFacts) -> str | None:
    """The interface NCCL/gloo should use on this node: the cluster file's nic when it exists there,
    else the one holding the route to the master; None when neither is known."""
    if not f.probe.ok:
        return f.node.nic
    dev = (f.data.get("route") or {}).get("dev")
    if f.node.nic is not None:
        return f.node.nic if f.node.nic in (f.data.get("nics") or []) else None
    return dev


# ------------------------------------------------------------------------ one check per column

def check_ssh(f: NodeFacts) -> Cell:
    if f.legacy_hostkey:
        return Cell("warn", "ssh-rsa", f"{f.node.name} offers only the legacy SHA-1 'ssh-rsa' host key algorithm "
                    "(enabled for this host alone)",
                    "add an ed25519 host key to its sshd, then re-run `clustertune cluster ssh`")
    return Cell("ok")


def check_pdsh(f: NodeFacts) -> Cell:
    if not f.is_master:
        return Cell("info", "")
    return Cell("ok") if f.data.get("pdsh") else Cell(
        "fail", "missing", "pdsh not installed on the master (the DeepSpeed launcher runs it)",
        "apt-get install pdsh (or dnf install pdsh pdsh-rcmd-ssh)")


def check_python(f: NodeFacts) -> Cell:
    return Cell("ok") if f.data.get("python_exists") else Cell(
        "fail", "missing", f"{f.python} does not exist on this node",
        "create the same Python environment at the same path on every node (DeepSpeed starts this exact "
        "interpreter on each node), or put it on a shared filesystem")


def versions_cell(v: dict | None, ref: dict | None, is_master: bool, master_name: str) -> Cell:
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


def check_versions(f: NodeFacts) -> Cell:
    if not f.data.get("python_exists"):
        return SKIP
    return versions_cell(f.data.get("versions"), f.ref_versions, f.is_master, f.cluster.master_node.name)


def check_paths(f: NodeFacts) -> Cell:
    missing = [p for p, ok in f.data.get("paths", {}).items() if not ok]
    return Cell("ok") if not missing else Cell(
        "fail", f"{len(missing)} missing", "missing on this node: " + ", ".join(missing),
        "copy them to the same absolute path on every node, or use a shared filesystem")


def check_gpus(f: NodeFacts) -> Cell:
    gpus, n = f.data.get("gpus"), f.node
    if f.cpu_mode:
        return Cell("warn", "cpu mode", f"cpu mode: {n.slots} CPU rank(s), gloo backend"
                    + (f" ({gpus} GPU(s) present but unused)" if gpus else ""),
                    "fine for tests; set accelerator = \"gpu\" in the cluster file for GPU training")
    if gpus is None:
        return Cell("fail", "none", "no GPU visible (nvidia-smi not found)" + (
            f": {f.data.get('gpu_error')}" if f.data.get("gpu_error") else ""),
                    "install the NVIDIA driver, or set accelerator = \"cpu\" in the cluster file")
    if gpus < n.slots:
        return Cell("fail", f"{gpus}<{n.slots}", f"{gpus} GPU(s) visible, slots = {n.slots}",
                    f"set slots = {gpus} for {n.name} in the cluster file, or fix the driver / CUDA_VISIBLE_DEVICES")
    return Cell("ok", f"{gpus}")


def check_port(f: NodeFacts) -> Cell:
    c, listen, conn = f.cluster, f.listen, f.connect
    if listen is not None and f.is_master and not listen.get("bound") and "errno 99" in str(listen.get("error")):
        return Cell("fail", "bad addr", f"{c.rendezvous_addr} is not an address of the master "
                    f"{c.master_node.name}: {listen.get('error')}",
                    "set master_addr to one of the master's own addresses (or remove it)")
    if listen is not None and f.is_master and not listen.get("bound"):
        return Cell("fail", "busy", f"cannot listen on {c.rendezvous_addr}:{c.master_port}: {listen.get('error')}",
                    "another run (or program) holds the port: stop it, or choose another master_port")
    if not f.connected:
        return Cell("fail", "error", f"port check did not run: {conn.error if conn else 'master unreachable'}")
    if conn.get("port_ok"):
        return Cell("ok")
    return Cell("fail", "blocked", f"cannot connect to {c.rendezvous_addr}:{c.master_port}: {conn.get('port_error')}",
                f"allow TCP {c.master_port} (and the ephemeral ports NCCL/gloo use) from this node to the master; "
                "check master_addr")


def check_nic(f: NodeFacts) -> Cell:
    route = f.data.get("route") or {}
    nics, dev, nic, name = f.data.get("nics") or [], route.get("dev"), f.node.nic, f.node.name
    if nic is not None and nic not in nics:
        return Cell("fail", nic, f"interface {nic!r} (nic in the cluster file) does not exist on {name}; "
                    f"it has: {', '.join(nics)}",
                    f"set nic = \"{dev}\" for {name} (its route to the master) or remove the nic key"
                    if dev else "fix or remove the nic key")
    if not dev:
        return Cell("fail", "no route", f"no route to the master {f.cluster.rendezvous_addr}: {route.get('error')}",
                    "fix the network/address")
    if nic is not None and nic != dev:
        return Cell("warn", nic, f"nic = {nic} but the route to the master goes through {dev}",
                    "fine if that interface reaches the master; otherwise set nic = \"%s\"" % dev)
    return Cell("ok", dev)


def check_shared_fs(f: NodeFacts) -> Cell:
    if f.is_master:
        return Cell("info", "token") if f.token_path else Cell("warn", "no token", f.data.get("token_error", ""))
    if f.connected and f.token_path:
        return Cell("info", "shared") if f.connect.get("token_seen") else Cell(
            "warn", "not shared", "the output directory is not on a filesystem shared with the master",
            "not blocking: the launcher copies the run files to every node; each node keeps its own "
            "checkpoint shards; the exported model is written on the master")
    return SKIP


def check_shm(f: NodeFacts) -> Cell:
    shm = f.data.get("shm")
    if shm is None:
        return Cell("warn", "none", "/dev/shm missing", "mount a tmpfs on /dev/shm")
    if shm < 256 * 1024 ** 2 and not f.cpu_mode:
        return Cell("fail", _gib(shm), f"/dev/shm is only {_gib(shm)}: NCCL needs shared memory",
                    "in Docker: --shm-size=16g (or --ipc=host); else remount /dev/shm larger")
    if shm < GIB:
        return Cell("warn", _gib(shm), f"/dev/shm is only {_gib(shm)}",
                    "larger is safer for NCCL and data loader workers (Docker: --shm-size=16g)")
    return Cell("ok", _gib(shm))


def check_mutual(f: NodeFacts) -> Cell:
    m = (f.connect.get("matrix") if f.connected else None) or {}
    if "peers" not in m:
        return Cell("fail", "error", f"mutual check did not run: {m.get('error', 'no answer')}",
                    "run `clustertune cluster ssh`")
    bad = {p: r.get("error", "") for p, r in m["peers"].items() if not r.get("ok")}
    return Cell("ok") if not bad else Cell(
        "fail", f"{len(bad)} fail", "cannot ssh to: " + "; ".join(f"{p} ({e})" for p, e in bad.items()),
        "run `clustertune cluster ssh` (installs the key, config and known_hosts on every node)")


def check_disk(f: NodeFacts, *, params: int | None, shared_fs: bool | None) -> Cell:
    """Free space under the output directory against what the recipe's checkpoints and export need
    (needs the shared-filesystem answer, so it runs after the other columns)."""
    free = f.data["disk"]["free"]
    if params is None or f.recipe is None:
        return Cell("ok", _gib(free) + " free")
    recipe, cluster, n = f.recipe, f.cluster, f.node
    shared = shared_fs is not False
    need = expected_disk_bytes(
        params, lora=recipe.lora.enabled, keep_last=recipe.checkpoint.keep_last,
        checkpointing=recipe.checkpoint.every_steps > 0, share=1.0 if shared else n.slots / cluster.world_size,
        export_here=shared or f.is_master, cpu=cluster.accelerator == "cpu" or recipe.train.device == "cpu")
    if free < need:
        return Cell("fail", f"{_gib(free)}<{_gib(need)}",
                    f"{_gib(free)} free at {f.data['disk']['path']}, the run needs about {_gib(need)} "
                    f"(checkpoints x{recipe.checkpoint.keep_last + 1} + export)",
                    "free space, lower checkpoint.keep_last, or point run.output_dir at a bigger disk")
    return Cell("ok", f"{_gib(free)}")


def unreachable_row(f: NodeFacts, checks: tuple[str, ...]) -> dict[str, Cell]:
    """A node whose probe did not answer: one failure (ssh, or python for the local node), the rest skipped."""
    res, n = f.probe, f.node
    failure = classify_ssh_error(res.stderr, res.returncode)
    row = {c: SKIP for c in checks}
    row["ssh" if "ssh" in checks else "python"] = Cell(
        "fail", failure.kind if res.returncode == 255 else "error", f"{n.user}@{n.address}:{n.port}: {res.error}",
        failure.fix if res.returncode == 255 else "make python3 available on the node")
    return row


NODE_CHECKS: dict[str, Callable[[NodeFacts], Cell]] = {
    "ssh": check_ssh, "mutual": check_mutual, "pdsh": check_pdsh, "python": check_python,
    "versions": check_versions, "paths": check_paths, "gpus": check_gpus, "port": check_port, "nic": check_nic,
    "shared-fs": check_shared_fs, "shm": check_shm,
}  # disk and bandwidth need every node's answers first (check_disk, bandwidth_cells)


def node_row(f: NodeFacts, checks: tuple[str, ...]) -> dict[str, Cell]:
    """One node's row: every column that has a per-node check; disk and bandwidth are filled later."""
    if not f.probe.ok:
        return unreachable_row(f, checks)
    return {c: NODE_CHECKS[c](f) if c in NODE_CHECKS else SKIP for c in checks}


def _gib(b: float) -> str:
    return f"{b / GIB:.1f}G" if b < 10 * GIB else f"{b / GIB:.0f}G"


# ----------------------------------------------------------------------------- interconnect

@dataclass(frozen=True)
class BandwidthResult:
    """The interconnect test's answer (worker/bandwidth.py), or why there is none."""
    backend: str
    ranks_per_node: int
    data: dict[str, Any] | None = None  # rank 0's result line
    error: str = ""
    advice: str | None = None  # ZeRO++ advice when the link would dominate the planned step
    estimate_note: str = ""

    @property
    def ok(self) -> bool:
        return self.data is not None

    def lines(self, node_names: list[str]) -> list[str]:
        if not self.ok:
            return [f"interconnect ({self.backend}): no measurement: {self.error}"]
        d = self.data
        intra = d.get("intra_allreduce_gbs") or {}
        out = [f"interconnect ({self.backend}, {d['size_bytes'] / 2**20:.0f} MiB, {d['world_size']} ranks on "
               f"{d['nodes']} nodes), bus bandwidth:",
               f"  across all nodes: all-reduce {d['allreduce_gbs']:.2f} GB/s, all-gather {d['allgather_gbs']:.2f} GB/s"]
        if self.ranks_per_node > 1:
            out.append("  inside each node (all-reduce): " + ", ".join(
                f"{name} {intra.get(str(k), 0.0):.2f} GB/s" for k, name in enumerate(node_names)))
        if self.estimate_note:
            out.append("  " + self.estimate_note)
        return out


def bandwidth_env(node: Node, nic: str | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The test's environment on one node, as a run's ranks get it: the launching shell's NCCL_/GLOO_
    variables (shell-inert values only), the node's interface, then the node's own [nodes.env]."""
    env = {k: v for k, v in environ.items() if k.startswith(("NCCL_", "GLOO_")) and VALUE_RE.match(v)}
    if nic:
        env["NCCL_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = nic
    env.update(node.env)
    return env


def bandwidth_command(*, python: str, env: Mapping[str, str], nnodes: int, node_rank: int, nproc: int,
                      master_addr: str, master_port: int, backend: str, size_mb: int, timeout: int) -> str:
    argv = ["env", *(f"{k}={v}" for k, v in env.items()), python, "-m", "clustertune.worker.bandwidth",
            "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc", str(nproc), "--master-addr",
            master_addr, "--master-port", str(master_port), "--backend", backend, "--size-mb", str(size_mb),
            "--timeout", str(timeout)]
    return " ".join(shlex.quote(a) for a in argv)


def comm_share_advice(data: dict[str, Any], recipe: Any, cluster: Cluster) -> tuple[str | None, str]:
    """(ZeRO++ advice or None, a note on the estimate) for the measured bandwidths and the recipe
    (cluster/interconnect.py over clustertune.timing's step estimate)."""
    from clustertune.cluster.interconnect import comm_share, planned_step, zeropp_advice
    from clustertune.gpus import lookup_gpu
    if recipe is None:
        return None, "(give --recipe to estimate the share of a training step spent between nodes)"
    gpu = data.get("device") or ""
    if lookup_gpu(gpu) is None:
        return None, f"(no bf16 peak known for {gpu!r}: the step share is not estimated)"
    from clustertune.shapes import shape_from_model_path
    gpus_per_node = max(n.slots for n in cluster.nodes)
    intra = [v for v in (data.get("intra_allreduce_gbs") or {}).values() if v > 0]
    est = planned_step(recipe, shape_from_model_path(recipe.model.path, recipe.model.num_layers), gpu=gpu, world_size=cluster.world_size,
                       gpus_per_node=gpus_per_node, inter_node_gbs=max(data["allreduce_gbs"], 1e-6),
                       intra_node_gbs=min(intra) if intra else None)
    share = comm_share(est)
    note = (f"planned step (clustertune.timing, one micro-batch of the token budget per rank): compute "
            f"{est.compute_s * 1e3:.0f} ms, communication {est.communication_s * 1e3:.0f} ms of which "
            f"{est.exposed_communication_s * 1e3:.0f} ms not hidden ({share:.0%} of the step)")
    return zeropp_advice(share, recipe.zero, gpus_per_node=gpus_per_node), note


def bandwidth_cells(result: BandwidthResult, cluster: Cluster) -> dict[str, Cell]:
    """Each node's bandwidth cell: its own all-reduce figure; the master's carries a failed test or
    the warning that the link between nodes dominates the step."""
    names = [n.name for n in cluster.ordered_nodes()]
    master = names[0]
    if not result.ok:
        cells = {n: SKIP for n in names}
        cells[master] = Cell("fail", "failed", f"the interconnect test ({result.backend}) failed: {result.error}",
                             "NCCL/gloo connect every node to every other on ephemeral TCP ports (not only "
                             "master_port): open them between the nodes, and check nic / NCCL_SOCKET_IFNAME")
        return cells
    intra = result.data.get("intra_allreduce_gbs") or {}
    cells = {n: Cell("ok", f"{intra.get(str(k), 0.0):.1f}GB/s" if result.ranks_per_node > 1 else "")
             for k, n in enumerate(names)}
    if result.advice:
        cells[master] = Cell("warn", "slow link", f"{result.data['allreduce_gbs']:.2f} GB/s across nodes: "
                             f"{result.advice}", result.advice)
    return cells


def measure_bandwidth(cluster: Cluster, targets: Mapping[str, "SshTarget | LocalTarget"],
                      nics: Mapping[str, str | None], *, python: str, cpu: bool,
                      timeout: int = 60) -> BandwidthResult:
    """Start worker/bandwidth.py on every node at once; rank 0 (the master) reports."""
    backend = "gloo" if cpu else "nccl"
    nodes = cluster.ordered_nodes()
    per_node = max(n.slots for n in nodes)

    def run(item: tuple[int, Node]) -> subprocess.CompletedProcess | str:
        rank, node = item
        cmd = bandwidth_command(python=python, env=bandwidth_env(node, nics.get(node.name), os.environ),
                                nnodes=len(nodes), node_rank=rank, nproc=node.slots,
                                master_addr=cluster.rendezvous_addr, master_port=cluster.master_port,
                                backend=backend, size_mb=8 if cpu else 128, timeout=timeout)
        try:
            return subprocess.run(targets[node.name].argv(cmd), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            return f"{node.name}: no answer within {timeout + 60} s"

    if len({n.slots for n in nodes}) != 1:
        return BandwidthResult(backend, per_node, error="the test needs the same slots on every node")
    answers = parallel(run, list(enumerate(nodes)))
    from clustertune.worker.bandwidth import parse_result as parse_bandwidth  # stdlib only at import
    first = answers[0]
    data = parse_bandwidth(first.stdout) if isinstance(first, subprocess.CompletedProcess) else None
    if data is not None:
        return BandwidthResult(backend, per_node, data)
    errors = []
    for node, ans in zip(nodes, answers, strict=True):
        if isinstance(ans, str):
            errors.append(ans)
        elif ans.returncode != 0:
            tail = [line for line in (ans.stderr or "").splitlines() if line.strip()][-2:]
            errors.append(f"{node.name}: exit {ans.returncode}: {' / '.join(tail)[-300:]}")
    return BandwidthResult(backend, per_node, error="; ".join(errors) or "no result line from the master")


# ------------------------------------------------------------------------------------- running

def _targets(cluster: Cluster, paths: ClusterPaths | None) -> dict[str, SshTarget | LocalTarget]:
    if paths is None:
        return {n.name: LocalTarget(n.name) for n in cluster.nodes}
    return {n.name: paths.target(n) for n in cluster.nodes}


def run_doctor(cluster: Cluster, *, recipe: Any = None, mutual: bool = True, connect_timeout: int = 10,
               need_pdsh: bool = True, local: bool = False, python: str | None = None, workdir: str | None = None,
               home: Path | None = None, bandwidth: bool = False) -> Report:
    """All checks; `local`: the implicit one-node cluster, probed without ssh; `bandwidth`: also the
    interconnect test between the nodes (never for `local`)."""
    python = python or sys.executable
    workdir = workdir or os.getcwd()
    bandwidth = bandwidth and not local and len(cluster.nodes) > 1
    checks = tuple(c for c in CHECKS if (mutual or c != "mutual") and (need_pdsh or c != "pdsh")
                   and (bandwidth or c != "bandwidth")
                   and not (local and c in ("ssh", "mutual", "pdsh", "shared-fs")))
    report = Report(cluster, checks)
    paths = None if local else ClusterPaths.for_cluster(cluster, home)
    master = cluster.master_node
    nodes = cluster.ordered_nodes()

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
    facts = {n.name: NodeFacts(cluster, n, probes[n.name], connects.get(n.name), listen_res, ref, python, recipe,
                               token_path, legacy_hostkey=n.name in legacy) for n in nodes}
    for n in nodes:
        report.rows[n.name] = node_row(facts[n.name], checks)
        report.nic_by_node[n.name] = route_nic(facts[n.name])
        if probes[n.name].ok:
            report.versions[n.name] = probes[n.name].get("versions") or {}
            memory = probes[n.name].get("gpu_memory")
            if memory:
                report.gpu_memory[n.name] = (str(memory[0]), float(memory[1]) / 1024)
    report.shared_fs = _shared_fs(checks, token_path, local, reachable, master, connects)
    if "disk" in checks:
        params = model_parameter_count(recipe.model.path) if recipe is not None else None
        for n in reachable:
            report.rows[n.name]["disk"] = check_disk(facts[n.name], params=params, shared_fs=report.shared_fs)
    if bandwidth:
        if report.ok:
            result = measure_bandwidth(cluster, targets, report.nic_by_node, python=python,
                                       cpu=facts[master.name].cpu_mode)
            if result.ok:
                advice, note = comm_share_advice(result.data, recipe, cluster)
                result = BandwidthResult(result.backend, result.ranks_per_node, result.data, advice=advice,
                                         estimate_note=note)
            report.bandwidth = result
            for name, cell in bandwidth_cells(result, cluster).items():
                report.rows[name]["bandwidth"] = cell
        else:
            report.notes.append("interconnect test skipped: fix the blocking problems first")
    return report


def _shared_fs(checks: tuple[str, ...], token_path: str | None, local: bool, reachable: list[Node], master: Node,
               connects: dict[str, RemoteResult]) -> bool | None:
    """Whether the nodes share the master's filesystem (None: unknown)."""
    if local:
        return True
    if "shared-fs" not in checks or not token_path:
        return None
    others = [connects[n.name].get("token_seen") for n in reachable if n.name != master.name
              and connects.get(n.name) and connects[n.name].ok]
    return bool(others) and all(others) if others else None


def _recipe_paths(recipe: Any, workdir: str) -> list[str]:
    """Recipe paths that exist here and so must exist on every node (built-in names do not)."""
    if recipe is None:
        return []
    out = []
    for p in [recipe.model.path, *recipe.data.train_paths, *recipe.data.eval_files]:
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


