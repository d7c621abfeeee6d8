"""Per-node variables of the cluster file (`[nodes.env]`): validation, the round trip through the
run's one env file, and what each node's ranks end up with (clustertune.cluster.node_env)."""

from __future__ import annotations

import tomllib

import pytest

from clustertune.cluster import node_env
from clustertune.cluster.inventory import ClusterError, cluster_from_dict, cluster_to_toml
from clustertune.cluster.sandbox import SandboxError, assign_gpus, gpu_node_env


def _cluster(env2: dict) -> dict:
    return {"name": "c", "nodes": [{"name": "n1", "address": "10.0.0.1", "slots": 2},
                                   {"name": "n2", "address": "10.0.0.2", "slots": 2, "env": env2}]}


def test_cluster_file_round_trip_keeps_each_nodes_env():
    cluster = cluster_from_dict(_cluster({"CUDA_VISIBLE_DEVICES": "2,3", "NCCL_HOSTID": "n2"}))
    again = cluster_from_dict(tomllib.loads(cluster_to_toml(cluster)))
    assert again == cluster
    assert again.nodes[0].env == {} and again.nodes[1].env["CUDA_VISIBLE_DEVICES"] == "2,3"


@pytest.mark.parametrize("env, words", [
    ({"RANK": "1"}, ["RANK", "launcher"]),
    ({"CLUSTERTUNE_RUN_ID": "x"}, ["CLUSTERTUNE_RUN_ID"]),
    ({"HF_TOKEN": "hf_abc"}, ["HF_TOKEN", "secret"]),
    ({"NCCL_HOSTID": "a;rm -rf /"}, ["NCCL_HOSTID", "shell"]),
    ({"1BAD": "x"}, ["1BAD"]),
])
def test_cluster_file_rejects_bad_node_env(env, words):
    with pytest.raises(ClusterError) as err:
        cluster_from_dict(_cluster(env), "cluster.toml")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "nodes" in str(err.value)  # names where


def test_each_node_keeps_only_its_own_entries():
    run_env = {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_HOSTID": "launching-shell",
               **node_env.encode([{"NCCL_HOSTID": "n1"}, {"NCCL_HOSTID": "n2", "NCCL_IB_DISABLE": "1"}])}
    assert all(node_env.NAME_RE.match(k) for k in run_env)  # plain env-file names
    node1 = node_env.apply({**run_env, "GROUP_RANK": "0"}, "0")
    node2 = node_env.apply({**run_env, "GROUP_RANK": "1"}, "1")
    assert node1["NCCL_HOSTID"] == "n1" and "NCCL_IB_DISABLE" not in node1
    assert node2["NCCL_HOSTID"] == "n2" and node2["NCCL_IB_DISABLE"] == "1"
    assert not any(k.startswith(node_env.PREFIX) for k in {**node1, **node2})
    assert node_env.apply(run_env, None)["NCCL_HOSTID"] == "launching-shell"


def test_visible_devices_compose_with_deepspeeds_indices():
    entries = node_env.encode([{}, {"CUDA_VISIBLE_DEVICES": "2,3"}])
    # DeepSpeed's per-node launcher: LOCAL_SIZE set, CUDA_VISIBLE_DEVICES = indices of the node's slots
    assert node_env.apply({**entries, "LOCAL_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, "1")[
        "CUDA_VISIBLE_DEVICES"] == "2,3"
    assert node_env.apply({**entries, "LOCAL_SIZE": "1", "CUDA_VISIBLE_DEVICES": "1"}, "1")[
        "CUDA_VISIBLE_DEVICES"] == "3"
    # torchrun sets none: the node's own list
    assert node_env.apply({**entries, "CUDA_VISIBLE_DEVICES": "2,3"}, "1")["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert node_env.compose_visible_devices("2,3", "5") == "2,3"


def test_sandbox_gives_each_node_its_own_gpus_and_host_id():
    assert assign_gpus(["0", "1", "2", "3"], 2, 2) == [["0", "1"], ["2", "3"]]
    assert assign_gpus(["0", "1"], 2, 1) == [["0"], ["1"]]
    with pytest.raises(SandboxError, match="needs 4 GPUs; this machine has 2"):
        assign_gpus(["0", "1"], 2, 2)
    a, b = gpu_node_env("sb", "node1", ["0", "1"]), gpu_node_env("sb", "node2", ["2", "3"])
    assert a["NCCL_HOSTID"] != b["NCCL_HOSTID"] and b["CUDA_VISIBLE_DEVICES"] == "2,3"
    node_env.check_node_env(b)  # a valid [nodes.env]
