"""`clustertune launch` across namespace nodes with a stand-in worker (no torch, fast): ranks land
on the right nodes, secrets reach them only through the 0600 file, logs per node, a failed rank
or Ctrl-C stops every process of the run on every node and nothing else, torchrun, localhost."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterlib import FAKE_WORKER_DIR, base_env, needs_sandbox, run_pids
from clustertune.cluster.inventory import cluster_to_toml, load_cluster

pytestmark = [pytest.mark.cluster]

HF_TOKEN = "hf_Zq8secretTOKENvalue"
MY_TOKEN = "my-other-secret-4242"
FAKE_ENV = {"PYTHONPATH": str(FAKE_WORKER_DIR), "CLUSTERTUNE_WORKER_MODULE": "ct_fake_worker", "OMP_NUM_THREADS": "1"}
RECIPE = ('[run]\nname = "fake"\noutput_dir = "runs/fake"\nenv_passthrough = ["MY_TOKEN"]\n'
          '[data]\ntrain_files = ["train.jsonl"]\n[train]\nmax_steps = 1\n')


def _reports(run_dir: Path, node: str) -> list[dict]:
    out = []
    for line in (run_dir / "logs" / f"{node}.log").read_text().splitlines():
        if "FAKE {" in line:
            out.append(json.loads(line.split("FAKE ", 1)[1]))
    return out


@needs_sandbox
def test_launch_ranks_secrets_logs(make_cluster, tmp_path):
    h = make_cluster(3)
    h.setup_ssh()
    cluster = load_cluster(h.sb.cluster_file)  # node2 runs two ranks
    nodes = [n.model_copy(update={"slots": 2}) if n.name == "node2" else n for n in cluster.nodes]
    cfile = tmp_path / "c.toml"
    cfile.write_text(cluster_to_toml(cluster.model_copy(update={"nodes": nodes})))
    (tmp_path / "r.toml").write_text(RECIPE)
    env = dict(FAKE_ENV, HF_TOKEN=HF_TOKEN, MY_TOKEN=MY_TOKEN, NCCL_DEBUG="INFO", AWS_SECRET_ACCESS_KEY="awsnope")
    out = h.clustertune("launch", "r.toml", "--cluster", str(cfile), env=env, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "fake"

    by_node = {n: _reports(run, n) for n in ("node1", "node2", "node3")}
    assert [len(by_node[n]) for n in ("node1", "node2", "node3")] == [1, 2, 1]
    ranks = {}
    for node, reports in by_node.items():
        for r in reports:
            ranks[int(r["RANK"])] = node
            assert r["src"] == h.sb.node(node).address  # it really ran inside that node
            assert r["WORLD_SIZE"] == "4" and r["MASTER_ADDR"] == h.sb.node("node1").address
            assert r["GLOO_SOCKET_IFNAME"] == "eth0" and r["DS_ACCELERATOR"] == "cpu" and r["NCCL_DEBUG"] == "INFO"
            assert r["LOCAL_WORLD_SIZE"] == str(len(reports))
            assert r["secrets_loaded"] == 2 and r["secret_on_cmdline"] is False
            assert r["hf_token_sha"] == hashlib.sha256(HF_TOKEN.encode()).hexdigest()[:16]
            assert r["my_token_sha"] == hashlib.sha256(MY_TOKEN.encode()).hexdigest()[:16]
            assert r["recipe"] == str(run / "launch" / "recipe.toml")
    assert ranks == {0: "node1", 1: "node2", 2: "node2", 3: "node3"}
    assert "node2 r2" in out.stdout and "node3 r3" in out.stdout  # streamed with node/rank prefixes

    # secrets: never in logs, the env file, the command, the console; the 0600 file is gone
    texts = [p.read_text() for p in (run / "logs").glob("*.log")] + [
        (run / "launch" / f).read_text() for f in ("run.env", "command.txt", "run.json", "recipe.toml")]
    texts += [out.stdout, out.stderr]
    for secret in (HF_TOKEN, MY_TOKEN, "awsnope"):
        assert not any(secret in t for t in texts), secret
    assert not (run / "launch" / "secrets.env").exists()
    info = json.loads((run / "launch" / "run.json").read_text())
    assert info["secret_names"] == ["HF_TOKEN", "MY_TOKEN"] and "AWS_SECRET_ACCESS_KEY" not in info["env_names"]
    assert run_pids(info["run_id"]) == []
    assert "node2: ranks [1, 2]: 2/2 finished ok" in out.stdout


def _bystander(h, node: str) -> subprocess.Popen:
    """An unrelated process on a node that looks like DeepSpeed's launcher (what `pkill -f` would hit)."""
    return subprocess.Popen(h.sb.exec_argv(node, [sys.executable, "-c", "import time; time.sleep(300)",
                                                  "-u", "-m", "deepspeed.launcher.launch"]),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@needs_sandbox
def test_failed_rank_stops_every_node_and_nothing_else(make_cluster, tmp_path):
    h = make_cluster(2)
    h.setup_ssh()
    (tmp_path / "r.toml").write_text(RECIPE)
    bystander = _bystander(h, "node2")
    try:
        started = time.monotonic()
        out = h.clustertune("launch", "r.toml", "--cluster", str(h.sb.cluster_file),
                            env=dict(FAKE_ENV, CLUSTERTUNE_FAKE_MODE="fail:1"), timeout=180)
        took = time.monotonic() - started
        assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
        assert "rank 1 on node2 exited with code 3" in out.stderr and "stopping run" in out.stderr
        assert took < 120  # generous: the CI box may be busy
        info = json.loads((tmp_path / "runs" / "fake" / "launch" / "run.json").read_text())
        assert run_pids(info["run_id"]) == []  # rank 0 on node1 (sleeping) was stopped too
        assert "clustertune-rank-exit rank=0 node=0 code=-15" in (tmp_path / "runs/fake/logs/node1.log").read_text()
        assert bystander.poll() is None  # and nothing else
    finally:
        bystander.kill()
        bystander.wait(10)


@needs_sandbox
def test_ctrl_c_stops_every_node_and_nothing_else(make_cluster, tmp_path):
    h = make_cluster(2)
    h.setup_ssh()
    (tmp_path / "r.toml").write_text(RECIPE)
    bystander = _bystander(h, "node1")
    run = tmp_path / "runs" / "fake"
    argv = h.sb.exec_argv("node1", [sys.executable, "-m", "clustertune.cli", "launch", "r.toml", "--cluster",
                                    str(h.sb.cluster_file)])
    # `ip netns exec` and `env` exec into python: this PID is the launcher itself. Ctrl-C's default
    # disposition for it even when this suite runs as a background job (which ignores SIGINT, and an
    # ignored SIGINT is inherited: Python then never raises KeyboardInterrupt).
    proc = subprocess.Popen(argv, cwd=tmp_path, env=dict(base_env(), **FAKE_ENV, CLUSTERTUNE_FAKE_MODE="sleep"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(lambda: all((run / "logs" / f"{n}.log").exists() and "FAKE sleeping" in
                              (run / "logs" / f"{n}.log").read_text() for n in ("node1", "node2")), 120,
                  "both ranks to run")
        run_id = json.loads((run / "launch" / "run.json").read_text())["run_id"]
        assert len(run_pids(run_id)) >= 4  # launcher + rank wrapper + worker per node (at least)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
        assert "interrupted" in stderr
        assert run_pids(run_id) == []
        assert bystander.poll() is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        bystander.kill()
        bystander.wait(10)


@needs_sandbox
def test_torchrun_launcher(make_cluster, tmp_path):
    h = make_cluster(2)
    h.setup_ssh()
    (tmp_path / "r.toml").write_text(RECIPE)
    out = h.clustertune("launch", "r.toml", "--cluster", str(h.sb.cluster_file), "--launcher", "torchrun",
                        env=dict(FAKE_ENV, HF_TOKEN=HF_TOKEN), timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "fake"
    r1, r2 = _reports(run, "node1"), _reports(run, "node2")
    assert [r["RANK"] for r in r1] == ["0"] and [r["RANK"] for r in r2] == ["1"]
    assert r2[0]["src"] == h.sb.node("node2").address and r2[0]["GLOO_SOCKET_IFNAME"] == "eth0"
    assert r2[0]["hf_token_sha"] == hashlib.sha256(HF_TOKEN.encode()).hexdigest()[:16]
    assert not r2[0]["secret_on_cmdline"]
    command = (run / "launch" / "command.txt").read_text()
    assert "torch.distributed.run" in command and "--node-rank=1" in command and HF_TOKEN not in command


def test_localhost_launch_without_cluster_file(tmp_path):
    """No cluster file: the same launch path on this machine (loopback only, no ssh, no root).
    The launcher reads the data before any rank starts: first a bad line, then a good file."""
    (tmp_path / "r.toml").write_text(RECIPE)
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    bad = subprocess.run([sys.executable, "-m", "clustertune.cli", "launch", "r.toml"], cwd=tmp_path,
                         env=dict(base_env(), **FAKE_ENV), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "train.jsonl:1: " in bad.stderr, bad.stderr
    assert not (tmp_path / "runs" / "fake" / "launch").exists()
    (tmp_path / "train.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    out = subprocess.run([sys.executable, "-m", "clustertune.cli", "launch", "r.toml"], cwd=tmp_path,
                         env=dict(base_env(), **FAKE_ENV, HF_TOKEN=HF_TOKEN), capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reports = _reports(tmp_path / "runs" / "fake", "localhost")
    assert sorted(r["RANK"] for r in reports) == ["0", "1"]
    assert all(r["secrets_loaded"] == 1 and not r["secret_on_cmdline"] for r in reports)
    assert "localhost r1" in out.stdout


def _pids_with_arg(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@needs_sandbox
def test_cluster_stop_after_the_launcher_died(make_cluster, tmp_path):
    """A launcher killed with SIGKILL cannot clean up; `clustertune cluster stop RUN_DIR` does."""
    h = make_cluster(2)
    h.setup_ssh()
    (tmp_path / "r.toml").write_text(RECIPE)
    run = tmp_path / "runs" / "fake"
    argv = h.sb.exec_argv("node1", [sys.executable, "-m", "clustertune.cli", "launch", "r.toml", "--cluster",
                                    str(h.sb.cluster_file), "--skip-doctor"])
    proc = subprocess.Popen(argv, cwd=tmp_path, env=dict(base_env(), **FAKE_ENV, CLUSTERTUNE_FAKE_MODE="sleep"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: all((run / "logs" / f"{n}.log").exists() and "FAKE sleeping" in
                              (run / "logs" / f"{n}.log").read_text() for n in ("node1", "node2")), 120,
                  "both ranks to run")
        run_id = json.loads((run / "launch" / "run.json").read_text())["run_id"]
        proc.kill()
        proc.wait(10)
        time.sleep(1)
        assert len(run_pids(run_id)) >= 4  # the run outlives its launcher...
        out = h.clustertune("cluster", "stop", str(run), "--cluster", str(h.sb.cluster_file), timeout=60)
        assert out.returncode == 0, out.stderr
        assert "stopped" in out.stdout
        assert run_pids(run_id) == []  # ...until `cluster stop`
        # the orphaned DeepSpeed runner and pdsh end by themselves once the remote side is gone
        hostfile = str(run / "launch" / "hostfile")
        _wait_for(lambda: not _pids_with_arg(hostfile), 30, "the orphaned runner to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in _pids_with_arg(str(run / "launch" / "hostfile")):  # only left if the test failed midway
            os.kill(pid, signal.SIGKILL)
