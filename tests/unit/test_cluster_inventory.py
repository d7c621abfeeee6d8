"""Cluster file: typed, strict, clear errors naming the file and the key; hostfile; init flags."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from clustertune.cluster.commands import cmd_init
from clustertune.cluster.inventory import (ClusterError, cluster_from_dict, cluster_to_toml, hostfile_text,
                                           load_cluster, parse_node_spec)

REPO = Path(__file__).resolve().parents[2]


def _two(**extra):
    tree = {"name": "c", "nodes": [{"name": "n1", "address": "10.0.0.1", "user": "root", "slots": 8},
                                   {"name": "n2", "address": "10.0.0.2", "user": "root", "slots": 8}]}
    tree.update(extra)
    return tree


def _write(tmp_path, text):
    p = tmp_path / "cluster.toml"
    p.write_text(text)
    return p


def test_load_valid_and_defaults(tmp_path):
    p = _write(tmp_path, """
name = "gpu"
master_port = 29600
[[nodes]]
name = "a"
address = "10.1.0.5"
user = "ubuntu"
port = 2222
slots = 8
nic = "ens5"
[[nodes]]
name = "b"
address = "gpu-b.example.internal"
slots = 4
""")
    c = load_cluster(p)
    assert c.master_node.name == "a" and c.rendezvous_addr == "10.1.0.5" and c.master_port == 29600
    assert c.world_size == 12 and c.nodes[0].ssh_target == "[10.1.0.5]:2222" and c.nodes[1].port == 22
    assert c.accelerator == "gpu"


def test_hostfile_master_first():
    c = cluster_from_dict(_two(master="n2"))
    assert hostfile_text(c) == "n2 slots=8\nn1 slots=8\n"


def test_roundtrip_toml(tmp_path):
    c = cluster_from_dict(_two(master="n2", accelerator="cpu"))
    p = _write(tmp_path, cluster_to_toml(c))
    assert load_cluster(p) == c


@pytest.mark.parametrize("tree, key, words", [
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1"}, {"name": "n1", "address": "10.0.0.2"}]),
     "nodes[1].name", "duplicate node name"),
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1"}, {"name": "n2", "address": "10.0.0.1"}]),
     "nodes[1].address", "duplicate address"),
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1", "slots": 0}]), "nodes[0].slots", "greater than or equal to 1"),
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1", "gpus": 8}]), "nodes[0].gpus", "unknown key"),
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1", "slots": "8"}]), "nodes[0].slots", "valid integer"),
    (_two(hosts=[]), "hosts", "unknown key"),
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1; rm -rf /"}]), "nodes[0].address", "';'"),
    (_two(nodes=[{"name": "n1", "address": "$(reboot)"}]), "nodes[0].address", "$"),
    (_two(nodes=[{"name": "n1", "address": "`id`"}]), "nodes[0].address", "`"),
    (_two(nodes=[{"name": "n1", "address": "root@10.0.0.1"}]), "nodes[0].address", "user@"),
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1:22"}]), "nodes[0].address", "port"),
    (_two(nodes=[{"name": "n*", "address": "10.0.0.1"}]), "nodes[0].name", "not a valid node name"),
    (_two(nodes=[{"name": "n1 x", "address": "10.0.0.1"}]), "nodes[0].name", "not a valid node name"),
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1", "user": "root;id"}]), "nodes[0].user", "not a valid user"),
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1", "nic": "eth0;id"}]), "nodes[0].nic", "interface"),
    (_two(nodes=[{"name": "n1", "address": "10.0.0.1", "port": 70000}]), "nodes[0].port", "less than or equal"),
    (_two(master="n9"), "master", "not one of the nodes"),
    (_two(master_port=80), "master_port", "greater than or equal to 1024"),
    (_two(nodes=[{"name": "n1", "address": "127.0.0.1"}, {"name": "n2", "address": "10.0.0.2"}]),
     "nodes[0].address", "loopback"),
    (_two(nodes=[]), "nodes", "at least 1"),
])
def test_bad_cluster_files(tmp_path, tree, key, words):
    with pytest.raises(ClusterError) as err:
        cluster_from_dict(tree, "cl.toml")
    text = str(err.value)
    assert text.startswith("cl.toml: invalid cluster file")
    assert key in text and words in text, text


def test_load_names_the_file(tmp_path):
    p = _write(tmp_path, "[[nodes]]\nname = 'a'\naddress = '10.0.0.1'\nslots = 0\n")
    with pytest.raises(ClusterError, match=r"cluster.toml: invalid cluster file\n  nodes\[0\].slots"):
        load_cluster(p)
    with pytest.raises(ClusterError, match="not valid TOML"):
        load_cluster(_write(tmp_path, "nodes = [\n"))
    with pytest.raises(ClusterError, match="cluster init"):
        load_cluster(tmp_path / "missing.toml")


def test_ipv6_and_hostnames():
    c = cluster_from_dict({"nodes": [{"name": "a", "address": "fd00::1"}, {"name": "b", "address": "node-b.lan"}]})
    assert c.nodes[0].address == "fd00::1" and c.nodes[0].ssh_target == "fd00::1"


@pytest.mark.parametrize("spec, expect", [
    ("gpu1=root@10.0.0.11:22:8", {"name": "gpu1", "user": "root", "address": "10.0.0.11", "port": 22, "slots": 8}),
    ("gpu1=10.0.0.11", {"name": "gpu1", "user": "me", "address": "10.0.0.11", "port": 22, "slots": 4}),
    ("gpu1=u@10.0.0.11::2:ens5", {"port": 22, "slots": 2, "nic": "ens5"}),
    ("gpu1=u@[fd00::1]:2222:8", {"address": "fd00::1", "port": 2222, "slots": 8}),
])
def test_parse_node_spec(spec, expect):
    got = parse_node_spec(spec, default_user="me", default_slots=4)
    assert expect.items() <= got.items()


def test_parse_node_spec_bad():
    with pytest.raises(ClusterError, match="NAME="):
        parse_node_spec("10.0.0.1")


def _init_args(tmp_path, **kw):
    base = dict(out=str(tmp_path / "c.toml"), name=None, node=[], user=None, slots=1, master=None, master_addr=None,
                master_port=29500, accelerator="gpu", interactive=False, force=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_init_from_flags(tmp_path, capsys):
    a = _init_args(tmp_path, node=["a=root@10.0.0.1:22:8", "b=root@10.0.0.2:2222:8:ens5"], master="b")
    assert cmd_init(a) == 0
    c = load_cluster(a.out)
    assert c.name == "c" and c.master_node.name == "b" and c.nodes[1].nic == "ens5" and c.nodes[1].port == 2222
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ClusterError, match="exists"):
        cmd_init(a)


def test_init_rejects_metacharacters(tmp_path):
    a = _init_args(tmp_path, node=["a=root@10.0.0.1;reboot:22:8"])
    with pytest.raises(ClusterError, match="nodes\\[0\\].address"):
        cmd_init(a)
    assert not Path(a.out).exists()


def test_init_interactive_reprompts_on_bad_answers(tmp_path, capsys):
    answers = iter(["lab", "2",
                    "a", "10.0.0.1;x", "10.0.0.1", "root", "", "0", "8", "",   # bad address, bad slots re-asked
                    "b", "10.0.0.2", "root", "2222", "8", "eth1",
                    "", "", "cpu"])
    a = _init_args(tmp_path, interactive=True)
    assert cmd_init(a, read=lambda prompt: next(answers)) == 0
    c = load_cluster(a.out)
    assert c.name == "lab" and [n.name for n in c.nodes] == ["a", "b"] and c.nodes[0].slots == 8
    assert c.nodes[1].nic == "eth1" and c.nodes[1].port == 2222 and c.accelerator == "cpu"
    err = capsys.readouterr().err
    assert "';'" in err and ">= 1" in err


def test_init_without_flags_or_tty(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(ClusterError, match="--node"):
        cmd_init(_init_args(tmp_path))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("cluster*.toml")), ids=lambda p: p.name)
def test_shipped_cluster_files_load(path):
    c = load_cluster(path)
    assert hostfile_text(c).count("slots=") == len(c.nodes)
