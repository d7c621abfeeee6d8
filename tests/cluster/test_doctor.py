"""`clustertune cluster doctor` on real namespace nodes: all green, and the failures a user meets
(a node down, a wrong interface name, a node with another torch) caught before training."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from clusterlib import needs_sandbox

pytestmark = [pytest.mark.cluster, needs_sandbox]


def _table(stdout: str) -> dict[str, dict[str, str]]:
    lines = stdout.splitlines()
    head = lines[1].split()
    rows = {}
    for line in lines[2:]:
        if not line.strip():
            break
        cells = [c for c in line.split("  ") if c.strip()]
        rows[cells[0].strip()] = dict(zip(head[1:], (c.strip() for c in cells[1:]), strict=False))
    return rows


def test_doctor_all_green(make_cluster, tmp_path):
    h = make_cluster(2)
    h.setup_ssh()
    recipe = tmp_path / "r.toml"
    recipe.write_text('[run]\noutput_dir = "runs/x"\n[data]\ntrain_files = ["train.jsonl"]\n[train]\nmax_steps = 2\n'
                      '[checkpoint]\nevery_steps = 1\n')
    started = time.monotonic()
    out = h.clustertune("cluster", "doctor", "--cluster", str(h.sb.cluster_file), "--recipe", str(recipe))
    took = time.monotonic() - started
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _table(out.stdout)
    assert set(rows) == {"node1", "node2", "verdict"}
    for node in ("node1", "node2"):
        r = rows[node]
        assert r["ssh"] == r["mutual"] == r["python"] == r["paths"] == r["port"] == "ok"
        assert r["versions"].startswith("ok torch ") and r["nic"] == "ok eth0" and r["gpus"] == "WARN cpu mode"
        assert r["disk"].startswith("ok ") and r["shm"].startswith("ok ")
    assert rows["node1"]["pdsh"] == "ok" and rows["node2"]["shared-fs"] == "shared"
    assert "NCCL_SOCKET_IFNAME=GLOO_SOCKET_IFNAME=eth0" in out.stdout and "doctor: OK" in out.stdout
    # the interconnect test ran over gloo between the namespaces, one rank per node
    assert rows["node1"]["bandwidth"] == rows["node2"]["bandwidth"] == "ok"
    m = re.search(r"across all nodes: all-reduce ([\d.]+) GB/s, all-gather ([\d.]+) GB/s", out.stdout)
    assert m and float(m[1]) > 0 and float(m[2]) > 0, out.stdout
    assert "interconnect (gloo, 8 MiB, 2 ranks on 2 nodes)" in out.stdout
    assert took < 45, f"doctor took {took:.1f} s"


def test_doctor_catches_node_down_wrong_nic_other_torch(make_cluster, tmp_path):
    shim = tmp_path / "oldtorch"
    (shim / "torch-2.0.0.dist-info").mkdir(parents=True)
    (shim / "torch-2.0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.0.0\n")
    # node4 has another torch on its python path, as a node installed by hand would
    h = make_cluster(4, node_env={"node4": {"PYTHONPATH": str(shim)}})
    h.setup_ssh()
    bad = tmp_path / "bad.toml"
    bad.write_text(h.sb.cluster_file.read_text().replace(
        f'address = "{h.sb.node("node2").address}"', f'address = "{h.sb.node("node2").address}"\nnic = "eth9"'))
    node3 = h.sb.node("node3")
    subprocess.run(["ip", "-n", node3.ns, "link", "set", "eth0", "down"], check=True, timeout=10)  # node3 is down

    out = h.clustertune("cluster", "doctor", "--cluster", str(bad), "--timeout", "3", timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    rows = _table(out.stdout)
    assert rows["node1"]["ssh"] == "ok" and rows["node1"]["versions"].startswith("ok")
    assert rows["node2"]["nic"] == "FAIL eth9"
    assert rows["node3"]["ssh"].startswith("FAIL") and rows["node3"]["python"] == "-"
    assert rows["node4"]["versions"] == "FAIL differs" and rows["node4"]["nic"] == "ok eth0"
    text = out.stdout
    assert "interface 'eth9' (nic in the cluster file) does not exist on node2" in text
    assert 'set nic = "eth0" for node2' in text
    assert "node3 / ssh" in text and ("no route" in text or "timed out" in text)
    assert "torch 2.0.0 (master node1:" in text and "torch==" in text
    assert "doctor: FAILED (" in text and rows["verdict"]["ssh"] == "FAIL"

    # `launch` runs the same checks first and starts nothing
    recipe = tmp_path / "r.toml"
    recipe.write_text('[run]\noutput_dir = "runs/x"\n[data]\ntrain_files = ["train.jsonl"]\n[train]\nmax_steps = 2\n')
    out = h.clustertune("launch", str(recipe), "--cluster", str(bad), timeout=180)
    assert out.returncode == 2 and "pre-flight checks failed; nothing was started" in out.stderr
    assert not (tmp_path / "runs" / "x" / "launch").exists()
