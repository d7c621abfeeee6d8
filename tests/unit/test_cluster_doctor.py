"""Doctor verdicts from synthetic probe answers (no ssh), disk arithmetic, table rendering, and
the stdlib-only remote snippets run locally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from clustertune.cluster import remote_snippets
from clustertune.cluster.doctor import (CHECKS, BandwidthResult, NodeFacts, Report, bandwidth_cells, bandwidth_command,
                                       bandwidth_env, check_disk, comm_share_advice, expected_disk_bytes,
                                       model_parameter_count, node_row, route_nic, versions_cell)
from clustertune.cluster.inventory import cluster_from_dict
from clustertune.cluster.remote import RemoteResult
from clustertune.config import recipe_from_dict

GIB = 1024 ** 3
CLUSTER = cluster_from_dict({"name": "lab", "accelerator": "gpu", "nodes": [
    {"name": "gpu1", "address": "10.0.0.1", "slots": 8},
    {"name": "gpu2", "address": "10.0.0.2", "slots": 8, "nic": "eth9"}]})
VERSIONS = {"python_version": "3.11.7", "torch": "2.5.1", "deepspeed": "0.16.2", "transformers": "4.57.0",
            "clustertune": "0.1.0"}


def _probe(**over):
    d = {"python_exists": True, "versions": dict(VERSIONS), "paths": {"/work": True}, "pdsh": "/usr/bin/pdsh",
         "gpus": 8, "route": {"dev": "eth0", "src": "10.0.0.2"}, "nics": ["eth0", "lo"],
         "disk": {"path": "/work", "free": 500 * GIB}, "shm": 64 * GIB}
    d.update(over)
    return RemoteResult(True, d, 0, "")


def _conn(**over):
    d = {"port_ok": True, "port_error": None, "token_seen": True, "matrix": {"peers": {"gpu1": {"ok": True},
                                                                                     "gpu2": {"ok": True}}}}
    d.update(over)
    return RemoteResult(True, d, 0, "")


def facts(node="gpu2", probe=None, conn=None, listen=None, recipe=None, cluster=CLUSTER) -> NodeFacts:
    return NodeFacts(cluster, cluster.node(node), probe or _probe(), conn or _conn(), listen or {"bound": True},
                     VERSIONS, "/venv/bin/python", recipe, "/work/.tok")


def row(node="gpu2", **kw):
    f = facts(node, **kw)
    return node_row(f, CHECKS), f


def test_all_green_master_row():
    r, f = row("gpu1", probe=_probe(route={"dev": "eth0"}))
    assert {k: c.verdict for k, c in r.items() if c.verdict not in ("ok", "info", "skip")} == {}
    assert route_nic(f) == "eth0"
    assert r["disk"].verdict == r["bandwidth"].verdict == "skip"  # filled once every node answered


def test_wrong_interface_name_is_blocking_with_fix():
    r, f = row("gpu2")
    assert r["nic"].verdict == "fail" and "eth9" in r["nic"].detail and 'nic = "eth0"' in r["nic"].fix
    assert route_nic(f) is None


def test_version_mismatch_names_both_versions():
    cell = versions_cell(dict(VERSIONS, torch="2.0.0"), VERSIONS, False, "gpu1")
    assert cell.verdict == "fail" and "torch 2.0.0 (master gpu1: 2.5.1)" in cell.detail
    assert "torch==2.5.1" in cell.fix
    assert versions_cell(dict(VERSIONS, deepspeed=None), VERSIONS, False, "gpu1").verdict == "fail"
    assert versions_cell(VERSIONS, VERSIONS, False, "gpu1").verdict == "ok"


def test_unreachable_node_only_ssh_fails_rest_skipped():
    res = RemoteResult(False, {}, 255, "ssh: connect to host 10.0.0.2 port 22: No route to host", "no route to host")
    r, _ = row("gpu2", probe=res)
    assert r["ssh"].verdict == "fail" and r["ssh"].short == "unreachable" and "address" in r["ssh"].fix
    assert all(c.verdict == "skip" for k, c in r.items() if k != "ssh")


def test_port_gpu_shm_disk_cells():
    r, _ = row("gpu1", conn=_conn(port_ok=False, port_error="Connection refused"), listen={"bound": False,
                                                                                          "error": "Address in use"})
    assert r["port"].verdict == "fail" and "another run" in r["port"].fix
    r, _ = row("gpu2", conn=_conn(port_ok=False, port_error="No route to host"))
    assert r["port"].verdict == "fail" and "allow TCP 29500" in r["port"].fix
    r, _ = row("gpu2", probe=_probe(gpus=4))
    assert r["gpus"].verdict == "fail" and r["gpus"].short == "4<8"
    r, _ = row("gpu2", probe=_probe(gpus=None))
    assert r["gpus"].verdict == "fail" and "nvidia-smi" in r["gpus"].detail
    cpu = cluster_from_dict({"accelerator": "cpu", "nodes": [{"name": "gpu1", "address": "10.0.0.1"}]})
    r, _ = row("gpu1", probe=_probe(gpus=None), cluster=cpu)
    assert r["gpus"].verdict == "warn" and r["gpus"].short == "cpu mode"
    r, _ = row("gpu2", probe=_probe(shm=64 * 1024 ** 2))
    assert r["shm"].verdict == "fail" and "--shm-size" in r["shm"].fix
    r, _ = row("gpu2", probe=_probe(paths={"/work": True, "/data/x.jsonl": False}))
    assert r["paths"].verdict == "fail" and "/data/x.jsonl" in r["paths"].detail
    r, _ = row("gpu2", probe=_probe(python_exists=False, versions=None))
    assert r["python"].verdict == "fail" and r["versions"].verdict == "skip"
    r, _ = row("gpu2", conn=_conn(token_seen=False))
    assert r["shared-fs"].verdict == "warn"
    r, _ = row("gpu2", conn=_conn(matrix={"peers": {"gpu1": {"ok": False, "error": "Permission denied"}}}))
    assert r["mutual"].verdict == "fail" and "gpu1" in r["mutual"].detail


def test_report_render_and_exit_status():
    report = Report(CLUSTER, CHECKS)
    for name in ("gpu1", "gpu2"):
        report.rows[name], _ = row(name)
    text = report.render()
    assert "blocking problems (1)" in text and "gpu2 / nic" in text and "fix:" in text
    assert not report.ok and text.rstrip().endswith("doctor: FAILED (1 blocking problem(s))")
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["node", "ssh", "mutual"] and lines[4].startswith("verdict")


def test_expected_disk_bytes():
    p = 1_000_000_000
    full = expected_disk_bytes(p, lora=False, keep_last=2, checkpointing=True, share=1.0, export_here=True, cpu=False)
    assert full == p * 14 * 3 + p * 2
    half = expected_disk_bytes(p, lora=False, keep_last=2, checkpointing=True, share=0.5, export_here=False, cpu=False)
    assert half == p * 14 * 3 // 2
    lora = expected_disk_bytes(p, lora=True, keep_last=1, checkpointing=False, share=1, export_here=True, cpu=True)
    assert lora == 4 * p


def test_model_parameter_count(tmp_path):
    assert model_parameter_count("tiny") > 0
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2000)
    assert model_parameter_count(str(tmp_path)) == 1000
    assert model_parameter_count(str(tmp_path / "nope")) is None


def test_disk_failure_with_recipe(tmp_path):
    recipe = recipe_from_dict({"model": {"path": "tiny"}, "data": {"train_files": ["train.jsonl"]},
                               "checkpoint": {"every_steps": 10, "keep_last": 2}, "train": {"max_steps": 5}})
    params = model_parameter_count("tiny")
    full = facts("gpu1", probe=_probe(disk={"path": "/w", "free": 10}), recipe=recipe)
    roomy = facts("gpu2", probe=_probe(disk={"path": "/w", "free": 500 * GIB}), recipe=recipe)
    assert check_disk(full, params=params, shared_fs=True).verdict == "fail"
    assert check_disk(roomy, params=params, shared_fs=True).verdict == "ok"
    assert check_disk(full, params=None, shared_fs=True).short.endswith("free")


# ------------------------------------------------------------------- interconnect

SANDBOX = cluster_from_dict({"name": "sb", "accelerator": "gpu", "nodes": [
    {"name": "node1", "address": "10.0.0.1", "slots": 2, "env": {"CUDA_VISIBLE_DEVICES": "0,1", "NCCL_HOSTID": "a"}},
    {"name": "node2", "address": "10.0.0.2", "slots": 2, "env": {"CUDA_VISIBLE_DEVICES": "2,3", "NCCL_HOSTID": "b"}}]})
MEASURED = {"backend": "nccl", "world_size": 4, "nodes": 2, "size_bytes": 128 * 2**20, "allreduce_gbs": 2.7,
            "allgather_gbs": 2.5, "intra_allreduce_gbs": {"0": 140.0, "1": 139.0}, "device": "NVIDIA H100 80GB HBM3"}


def test_bandwidth_env_is_what_the_ranks_of_that_node_get():
    env = bandwidth_env(SANDBOX.node("node2"), "eth0", {"NCCL_NVLS_ENABLE": "0", "NCCL_DEBUG": "x;y", "HOME": "/r",
                                                        "NCCL_HOSTID": "launching-shell"})
    assert env == {"NCCL_NVLS_ENABLE": "0", "NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0",
                   "NCCL_HOSTID": "b", "CUDA_VISIBLE_DEVICES": "2,3"}  # unsafe NCCL_DEBUG value dropped
    cmd = bandwidth_command(python="/venv/bin/python", env=env, nnodes=2, node_rank=1, nproc=2,
                            master_addr="10.0.0.1", master_port=29500, backend="nccl", size_mb=128, timeout=60)
    assert cmd.startswith("env NCCL_NVLS_ENABLE=0 ") and "CUDA_VISIBLE_DEVICES=2,3 /venv/bin/python -m " in cmd
    assert "clustertune.worker.bandwidth --nnodes 2 --node-rank 1 --nproc 2" in cmd


def test_bandwidth_cells_and_render():
    ok = BandwidthResult("nccl", 2, MEASURED)
    cells = bandwidth_cells(ok, SANDBOX)
    assert cells["node1"].verdict == cells["node2"].verdict == "ok" and cells["node2"].short == "139.0GB/s"
    report = Report(SANDBOX, CHECKS)
    report.rows = {"node1": {"bandwidth": cells["node1"]}, "node2": {"bandwidth": cells["node2"]}}
    report.bandwidth = ok
    text = report.render()
    assert "across all nodes: all-reduce 2.70 GB/s, all-gather 2.50 GB/s" in text
    assert "inside each node (all-reduce): node1 140.00 GB/s, node2 139.00 GB/s" in text
    failed = bandwidth_cells(BandwidthResult("nccl", 2, error="node2: exit 1: ncclSystemError"), SANDBOX)
    assert failed["node1"].verdict == "fail" and "ncclSystemError" in failed["node1"].detail
    assert "ephemeral TCP ports" in failed["node1"].fix and failed["node2"].verdict == "skip"


def test_slow_link_warns_with_the_zeropp_keys():
    recipe = recipe_from_dict({"model": {"path": "qwen2.5-7b"}, "data": {"train_files": ["t.jsonl"], "packing": True,
                                                                         "max_length": 4096},
                               "train": {"max_steps": 5, "micro_batch_tokens": 4096}, "zero": {"stage": 3}})
    advice, note = comm_share_advice(MEASURED, recipe, SANDBOX)
    assert advice and "zero.hpz_partition_size = 2" in advice and "quantized_weights" in advice
    assert "clustertune.timing" in note and "not hidden" in note
    cells = bandwidth_cells(BandwidthResult("nccl", 2, MEASURED, advice=advice), SANDBOX)
    assert cells["node1"].verdict == "warn" and "hpz_partition_size" in cells["node1"].fix
    fast = dict(MEASURED, allreduce_gbs=400.0)
    assert comm_share_advice(fast, recipe, SANDBOX)[0] is None
    assert comm_share_advice(dict(MEASURED, device="cpu"), recipe, SANDBOX)[0] is None
    assert comm_share_advice(MEASURED, None, SANDBOX)[0] is None


def test_bus_bandwidth_follows_nccl_tests():
    from clustertune.worker.bandwidth import bus_bandwidth_gbs
    assert bus_bandwidth_gbs("allreduce", 10**9, 1.0, 2) == 1.0  # 2(n-1)/n = 1
    assert bus_bandwidth_gbs("allgather", 10**9, 1.0, 4) == 0.75  # (n-1)/n
    assert bus_bandwidth_gbs("allreduce", 10**9, 1.0, 1) == 0.0


# ------------------------------------------------------------------- snippets, locally

def test_probe_snippet_locally(tmp_path):
    out = remote_snippets.probe({"python": sys.executable, "paths": [str(tmp_path), str(tmp_path / "nope")],
                                 "master_addr": "127.0.0.1", "output_dir": str(tmp_path / "runs" / "x"),
                                 "write_token": ".tok"})
    assert out["python_exists"] and out["versions"]["torch"] and out["versions"]["clustertune"]
    assert out["paths"] == {str(tmp_path): True, str(tmp_path / "nope"): False}
    assert out["route"]["dev"] == "lo" and out["disk"]["path"] == str(tmp_path)
    assert (tmp_path / ".tok").exists() and out["token_path"] == str(tmp_path / ".tok")



def test_probe_counts_only_the_visible_gpus(tmp_path, monkeypatch):
    """A node restricted to some GPUs (sandbox --gpus-per-node) reports those, not the machine's."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100 (UUID: x$i)\"; done\n")
    (fake / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    args = {"python": sys.executable, "paths": [], "master_addr": "127.0.0.1", "output_dir": str(tmp_path)}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert remote_snippets.probe(args)["gpus"] == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert remote_snippets.probe(args)["gpus"] == 2


def test_stage_and_install_write_private_files(tmp_path, monkeypatch):
    target = tmp_path / "run" / "launch" / "secrets.env"
    out = remote_snippets.stage({"files": [{"path": str(target), "content": "A_TOKEN=x\n", "mode": 0o600}]})
    assert out["written"] == [str(target)] and (target.stat().st_mode & 0o777) == 0o600
    assert remote_snippets.stage({"files": [{"path": str(target), "content": "A_TOKEN=x\n", "mode": 0o600}]})[
        "written"] == []
    remote_snippets.stage({"files": [], "remove": [str(target)]})
    assert not target.exists()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    res = remote_snippets.install({"cluster": "c", "authorized_key": "ssh-ed25519 AAAAkey clustertune-c",
                                   "files": [{"name": "id_ed25519", "content": "PRIVATE", "mode": 0o600},
                                             {"name": "ssh_config", "content": "F @CLUSTER_DIR@/k", "mode": 0o644,
                                              "template": True}]})
    d = tmp_path / "home" / ".clustertune" / "clusters" / "c"
    assert res["authorized"] == "added" and (d / "ssh_config").read_text() == f"F {d}/k"
    assert (d / "id_ed25519").stat().st_mode & 0o777 == 0o600 and d.stat().st_mode & 0o777 == 0o700
    again = remote_snippets.install({"cluster": "c", "authorized_key": "ssh-ed25519 AAAAkey clustertune-c",
                                     "files": []})
    assert again["authorized"] == "present"
    assert (tmp_path / "home" / ".ssh" / "authorized_keys").read_text().count("AAAAkey") == 1


def test_kill_run_stops_exactly_the_run(tmp_path):
    """Processes of one run id are stopped; a process of another run id is left alone."""
    def start(run_id):
        env = dict(os.environ, CLUSTERTUNE_RUN_ID=run_id)
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    mine, mine2, other = start("run-a"), start("run-a"), start("run-b")
    try:
        time.sleep(0.3)
        out = remote_snippets.kill_run({"run_id": "run-a", "grace": 5})
        assert sorted(out["terminated"]) == sorted([mine.pid, mine2.pid])
        assert mine.wait(5) == -signal.SIGTERM and mine2.wait(5) == -signal.SIGTERM
        assert other.poll() is None
        assert remote_snippets.list_run({"run_id": "run-a"})["pids"] == []
    finally:
        for p in (mine, mine2, other):
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_listen_and_connect_locally():
    import threading
    port = _free_port()
    result = {}
    t = threading.Thread(target=lambda: result.update(remote_snippets.listen(
        {"addr": "127.0.0.1", "port": port, "nonce": "n1", "expect": ["a"], "timeout": 10})))
    t.start()
    for _ in range(50):
        out = remote_snippets.connect({"addr": "127.0.0.1", "port": port, "nonce": "n1", "name": "a", "timeout": 1})
        if out["port_ok"]:
            break
        time.sleep(0.1)
    t.join(15)
    assert out["port_ok"] and result == {"bound": True, "seen": ["a"]}
    closed = remote_snippets.connect({"addr": "127.0.0.1", "port": port, "nonce": "n1", "name": "a", "timeout": 1})
    assert not closed["port_ok"] and closed["port_error"]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_listen_reports_busy_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        out = remote_snippets.listen({"addr": "127.0.0.1", "port": s.getsockname()[1], "nonce": "x", "expect": [],
                                      "timeout": 1})
        assert out["bound"] is False and "in use" in out["error"]
    finally:
        s.close()
