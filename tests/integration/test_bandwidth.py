"""The doctor's interconnect test worker (python -m clustertune.worker.bandwidth) as the doctor
starts it, one process per "node", here two on loopback over gloo, bounded in time: rank 0 reports
all-reduce and all-gather bus bandwidth (the namespace version: tests/cluster/test_doctor.py)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bandwidth_worker_two_local_nodes_over_gloo(tmp_path):
    from clustertune.worker.bandwidth import parse_result
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    argv = [sys.executable, "-m", "clustertune.worker.bandwidth", "--nnodes", "2", "--nproc", "1", "--master-addr",
            "127.0.0.1", "--master-port", port, "--backend", "gloo", "--size-mb", "1", "--iters", "2",
            "--timeout", "30"]
    procs = [subprocess.Popen(argv[:3] + ["--node-rank", str(k)] + argv[3:], stdout=subprocess.PIPE, text=True,
                              cwd=tmp_path) for k in (0, 1)]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    data = parse_result(outs[0])
    assert data["world_size"] == 2 and data["nodes"] == 2 and data["allreduce_gbs"] > 0 and data["allgather_gbs"] > 0
    assert parse_result(outs[1]) is None  # only rank 0 reports
