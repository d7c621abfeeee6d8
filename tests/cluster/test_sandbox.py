"""The sandbox itself: real namespaces, eth0 per node, one sshd per node, and nothing left after down."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from clustertune.cluster.sandbox import ROOT, Sandbox

from clusterlib import needs_sandbox, ns_exists, pid_alive

pytestmark = [pytest.mark.cluster, needs_sandbox]


def test_sandbox_up_down_leaves_nothing():
    sb = Sandbox(f"t{uuid.uuid4().hex[:8]}", 3, legacy=("node3",))
    try:
        sb.up()
        st = sb.state
        assert [n.address for n in st.nodes] == [f"{st.subnet}.11", f"{st.subnet}.12", f"{st.subnet}.13"]
        for node in st.nodes:
            assert ns_exists(node.ns) and pid_alive(node.sshd_pid)
            addr = subprocess.run(["ip", "-n", node.ns, "-o", "-4", "addr", "show", "dev", "eth0"],
                                  capture_output=True, text=True, timeout=10).stdout
            assert f"{node.address}/24" in addr
            links = subprocess.run(["ip", "-n", node.ns, "-o", "link"], capture_output=True, text=True,
                                   timeout=10).stdout
            assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) == ["eth0", "lo"]
        # node1 reaches node3's sshd over the bridge; the legacy node offers only ssh-rsa
        scan = subprocess.run(["ip", "netns", "exec", st.nodes[0].ns, "ssh-keyscan", "-T", "5", st.nodes[2].address],
                              capture_output=True, text=True, timeout=30).stdout
        assert {line.split()[1] for line in scan.splitlines() if line and not line.startswith("#")} == {"ssh-rsa"}
        # the host namespace has no route into the sandbox: nothing was added outside it
        host = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
        assert st.subnet not in host
        pids, namespaces, state_dir = [n.sshd_pid for n in st.nodes], list(st.namespaces), Path(st.dir)
    finally:
        problems = sb.down()
    assert problems == []
    assert not any(ns_exists(ns) for ns in namespaces)
    assert not any(pid_alive(pid) for pid in pids)
    assert not state_dir.exists()


def test_sandbox_cli_up_down():
    name = f"t{uuid.uuid4().hex[:8]}"
    cli = [sys.executable, "-m", "clustertune.cli", "sandbox"]
    try:
        up = subprocess.run(cli + ["up", "--name", name, "--nodes", "2"], capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stderr
        state = json.loads((ROOT / name / "state.json").read_text())
        assert "cluster file:" in up.stdout and (ROOT / name / "cluster.toml").exists()
        listed = subprocess.run(cli + ["list"], capture_output=True, text=True, timeout=30).stdout.split()
        assert name in listed
        show = "echo $HOME; ip -o -4 addr show eth0"
        ex = subprocess.run(cli + ["exec", "node2", "--name", name, "--", "sh", "-c", show],
                            capture_output=True, text=True, timeout=30)
        assert ex.returncode == 0 and ex.stdout.splitlines()[0].endswith("/node2/home")
        assert state["nodes"][1]["address"] in ex.stdout
    finally:
        down = subprocess.run(cli + ["down", "--name", name], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not (ROOT / name).exists()
    assert not any(ns_exists(n["ns"]) for n in state["nodes"]) and not ns_exists(state["switch_ns"])
    assert not any(pid_alive(n["sshd_pid"]) for n in state["nodes"])


def test_sandbox_refuses_bad_names():
    from clustertune.cluster.sandbox import SandboxError
    with pytest.raises(SandboxError):
        Sandbox("bad name;x")
    with pytest.raises(SandboxError, match="unknown sandbox node"):
        Sandbox("ok", 2, legacy=("node7",))


def test_sandbox_gpu_nodes_cli(tmp_path):
    """--gpus-per-node on a machine with too few GPUs is one error naming the arithmetic and leaves
    nothing; with enough (CUDA_VISIBLE_DEVICES stands in for nvidia-smi here) each node gets its
    own GPUs in its shell and in the cluster file, with its own NCCL host id, and --sshd/--env apply."""
    import os
    from clustertune.cluster.inventory import load_cluster
    from clustertune.cluster.sandbox import find_sshd
    cli = [sys.executable, "-m", "clustertune.cli", "sandbox"]
    name = f"t{uuid.uuid4().hex[:8]}"
    few = subprocess.run(cli + ["up", "--name", name, "--gpus-per-node", "2"], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, CUDA_VISIBLE_DEVICES="0,1"))
    assert few.returncode == 1 and "needs 4 GPUs; this machine has 2 (0,1)" in few.stderr, few.stderr
    assert not (ROOT / name).exists()
    try:
        up = subprocess.run(cli + ["up", "--name", name, "--gpus-per-node", "2", "--sshd", find_sshd(),
                                   "--env", "CT_SHELL=yes"],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, CUDA_VISIBLE_DEVICES="4,5,6,7"))
        assert up.returncode == 0, up.stderr
        assert "GPUs 6,7" in up.stdout
        cluster = load_cluster(ROOT / name / "cluster.toml")
        assert cluster.accelerator == "gpu" and [n.slots for n in cluster.nodes] == [2, 2]
        assert [n.env["CUDA_VISIBLE_DEVICES"] for n in cluster.nodes] == ["4,5", "6,7"]
        assert len({n.env["NCCL_HOSTID"] for n in cluster.nodes}) == 2 and all(n.nic == "eth0" for n in cluster.nodes)
        ex = subprocess.run(cli + ["exec", "node2", "--name", name, "--", "sh", "-c",
                                   "echo $CUDA_VISIBLE_DEVICES $CT_SHELL"], capture_output=True, text=True, timeout=30)
        assert ex.stdout.split() == ["6,7", "yes"], ex.stdout + ex.stderr
    finally:
        down = subprocess.run(cli + ["down", "--name", name], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
