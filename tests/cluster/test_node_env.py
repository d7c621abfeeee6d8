"""Each node's own variables reach that node's ranks alone, through the real launch path
(DeepSpeed's runner, pdsh, each node's sshd, rankexec): the cluster file's `[nodes.env]` (what
`sandbox up --gpus-per-node` writes: CUDA_VISIBLE_DEVICES and NCCL_HOSTID per node) and the
sandbox's `--env` in every node's shell. A stand-in worker reports what each rank sees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterlib import FAKE_WORKER_DIR, needs_sandbox
from clustertune.cluster.inventory import cluster_to_toml, load_cluster
from clustertune.cluster.sandbox import gpu_node_env

pytestmark = [pytest.mark.cluster, needs_sandbox]

SHOW = "CUDA_VISIBLE_DEVICES,NCCL_HOSTID,NCCL_IB_DISABLE,CT_EVERY_NODE,PATH"


def _reports(run_dir: Path, node: str) -> list[dict]:
    return [json.loads(line.split("FAKE ", 1)[1]) for line in (run_dir / "logs" / f"{node}.log").read_text().splitlines()
            if "FAKE {" in line]


def test_node_env_reaches_only_that_nodes_ranks(make_cluster, tmp_path):
    h = make_cluster(2, node_env={"node1": {"CT_EVERY_NODE": "shell", "PATH": "/ct-sandbox-bin:/usr/bin:/bin"},
                                  "node2": {"CT_EVERY_NODE": "shell", "PATH": "/ct-sandbox-bin:/usr/bin:/bin"}})
    h.setup_ssh()
    cluster = load_cluster(h.sb.cluster_file)
    gpus = {"node1": ["0", "1"], "node2": ["2", "3"]}
    nodes = [n.model_copy(update={"slots": 2, "env": gpu_node_env(h.sb.name, n.name, gpus[n.name])})
             for n in cluster.nodes]
    cfile = tmp_path / "c.toml"
    cfile.write_text(cluster_to_toml(cluster.model_copy(update={"nodes": nodes})))
    assert "[nodes.env]" in cfile.read_text() and load_cluster(cfile).nodes[1].env["CUDA_VISIBLE_DEVICES"] == "2,3"
    (tmp_path / "r.toml").write_text('[run]\nname = "env"\noutput_dir = "runs/env"\n'
                                     '[data]\ntrain_files = ["train.jsonl"]\n[train]\nmax_steps = 1\n')
    env = {"PYTHONPATH": str(FAKE_WORKER_DIR), "CLUSTERTUNE_WORKER_MODULE": "ct_fake_worker",
           "OMP_NUM_THREADS": "1", "CLUSTERTUNE_FAKE_SHOW": SHOW, "NCCL_HOSTID": "the-launching-shell"}
    out = h.clustertune("launch", "r.toml", "--cluster", str(cfile), env=env, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "env"
    seen = {node: [r["shown"] for r in _reports(run, node)] for node in ("node1", "node2")}
    assert [len(v) for v in seen.values()] == [2, 2], seen
    for node, shown in seen.items():
        for s in shown:
            assert s["CUDA_VISIBLE_DEVICES"] == ",".join(gpus[node])  # DeepSpeed's 0,1 mapped onto the node's
            assert s["NCCL_HOSTID"] == f"{h.sb.name}-{node}" and s["NCCL_IB_DISABLE"] == "1"
            assert s["CT_EVERY_NODE"] == "shell"  # the sandbox's per-node shell variable (sshd SetEnv)
            assert s["PATH"].startswith("/ct-sandbox-bin:")
    # the per-node entries travel in the run's one env file, by node rank
    run_env = (run / "launch" / "run.env").read_text()
    assert "CLUSTERTUNE_NODEENV_1_CUDA_VISIBLE_DEVICES=2,3\n" in run_env
