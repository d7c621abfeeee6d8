"""Fixtures of the multi-node tests (helpers in clusterlib.py). The `make_cluster` factory builds
sandboxes and always tears them down, checking that nothing of them remains."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from clusterlib import Harness, ns_exists, pid_alive
from clustertune.cluster.sandbox import Sandbox


@pytest.fixture
def make_cluster(tmp_path, request):
    """Factory: make_cluster(nodes=2, legacy=(), node_env={}) -> Harness with the sandbox up."""
    made: list[Sandbox] = []

    def teardown():
        problems = []
        for sb in made:
            state = sb.state
            if state is None:
                continue
            namespaces, pids = list(state.namespaces), [n.sshd_pid for n in state.nodes if n.sshd_pid]
            problems += sb.down()
            problems += [f"namespace {ns} left" for ns in namespaces if ns_exists(ns)]
            problems += [f"sshd {pid} left" for pid in pids if pid_alive(pid)]
            if Path(state.dir).exists():
                problems.append(f"{state.dir} left")
        assert not problems, problems

    request.addfinalizer(teardown)

    def factory(nodes: int = 2, legacy: tuple[str, ...] = (), node_env: dict | None = None) -> Harness:
        sb = Sandbox(f"t{uuid.uuid4().hex[:8]}", nodes, legacy=legacy, node_env=node_env)
        made.append(sb)
        sb.up()
        return Harness(sb, tmp_path)

    return factory


