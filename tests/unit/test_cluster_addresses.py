"""Cluster-file addresses checked like a careful colleague would (issue 16, item 20): invalid
IPv4/IPv6 literals and addresses no host can have are errors, leading-zero octets are ambiguous,
host names and node names are compared ignoring case, and a node on another network than the
master (a typo like the seed article's 172.168.80.31 beside its private master; here 192.186.80.31 beside 192.168.80.33) is a warning naming both.

    python -m pytest -q tests/unit/test_cluster_addresses.py
"""

from __future__ import annotations

import pytest

from clustertune.cli import main
from clustertune.cluster.inventory import ClusterError, check_address, cluster_from_dict, load_cluster, network_warnings


@pytest.mark.parametrize("address, reason", [
    ("10.0.0.256", "256 is not an IPv4 number"),
    ("172.16.80", "has 3 number(s), an IPv4 address has 4"),
    ("1.2.3.4.5", "has 5 number(s)"),
    ("010.0.0.1", "leading zero in '010' is ambiguous"),
    ("10.0.0.01", "write '10.0.0.1'"),
    ("0.0.0.0", "unspecified (zero) address"),
    ("::", "unspecified (zero) address"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("fd00::1::2", "not an IPv6 address"),
    ("gpu.123", "a host name cannot end in a number"),
])
def test_addresses_no_node_can_have_are_errors(address, reason):
    with pytest.raises(ValueError) as err:
        check_address(address)
    assert reason in str(err.value)


@pytest.mark.parametrize("address, canonical", [("10.0.0.1", "10.0.0.1"), ("FD00::1", "fd00::1"),
                                                ("gpu1.example.com", "gpu1.example.com"), ("node-7", "node-7")])
def test_real_addresses_pass(address, canonical):
    assert check_address(address) == canonical


def nodes(*addresses: str, names: tuple[str, ...] = ()) -> dict:
    names = names or tuple(f"n{i}" for i in range(len(addresses)))
    return {"nodes": [{"name": n, "address": a, "user": "root"} for n, a in zip(names, addresses)]}


def test_host_names_differing_only_in_case_are_one_node_listed_twice():
    with pytest.raises(ClusterError, match=r"nodes\[1\]\.address: duplicate address 'gpu1.example.com'.*"
                                           r"'GPU1.example.com'"):
        cluster_from_dict(nodes("GPU1.example.com", "gpu1.example.com"))
    with pytest.raises(ClusterError, match=r"nodes\[1\]\.name: duplicate node name 'gpu1'.*'GPU1'"):
        cluster_from_dict(nodes("10.0.0.1", "10.0.0.2", names=("GPU1", "gpu1")))


def test_the_seed_articles_typo_is_a_warning_naming_both_addresses():
    cluster = cluster_from_dict(nodes("192.168.80.33", "192.186.80.31"))
    [warning] = network_warnings(cluster)
    assert "192.186.80.31" in warning and "192.168.80.33" in warning
    assert "public" in warning and "private" in warning and "typo" in warning


def test_a_different_private_16_is_a_warning_and_one_network_is_not():
    [warning] = network_warnings(cluster_from_dict(nodes("10.1.0.5", "10.1.0.6", "10.2.0.5")))
    assert "nodes[2]" in warning and "10.2.0.5" in warning and "10.1.0.5" in warning and "/16" in warning
    assert network_warnings(cluster_from_dict(nodes("192.168.1.10", "192.168.1.11"))) == []
    assert network_warnings(cluster_from_dict(nodes("gpu1.example.com", "203.0.113.9"))) == []  # a name: unknown


def test_every_command_that_reads_the_cluster_file_shows_the_warning(tmp_path, capsys):
    path = tmp_path / "cluster.toml"
    path.write_text('[[nodes]]\nname = "m"\naddress = "192.168.80.33"\n'
                    '[[nodes]]\nname = "w"\naddress = "192.186.80.31"\n', encoding="utf-8")
    load_cluster(path)
    assert "warning: " in capsys.readouterr().err
    seen: list[str] = []
    load_cluster(path, warn=seen.append)
    assert len(seen) == 1 and str(path) in seen[0]


@pytest.mark.parametrize("spec, reason", [("a=10.0.0.256", "256 is not an IPv4 number"),
                                          ("a=172.16.80", "has 3 number(s)"),
                                          ("a=0.0.0.0", "unspecified (zero) address")])
def test_cluster_init_refuses_them_in_one_message(tmp_path, monkeypatch, capsys, spec, reason):
    monkeypatch.chdir(tmp_path)
    assert main(["cluster", "init", "--out", "c.toml", "--node", spec, "--node", "b=10.0.0.2"]) == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err and not (tmp_path / "c.toml").exists()


def test_cluster_init_leading_zero_beside_the_plain_address(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["cluster", "init", "--out", "c.toml", "--node", "a=10.0.0.1", "--node", "b=010.0.0.1"]) == 2
    assert "ambiguous" in capsys.readouterr().err


def test_cluster_init_writes_the_file_and_warns_about_the_typo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["cluster", "init", "--out", "c.toml", "--node", "m=192.168.80.33", "--node", "w=192.186.80.31"]) == 0
    err = capsys.readouterr().err
    assert "warning: nodes[1] (w) address 192.186.80.31" in err and "192.168.80.33" in err
    assert (tmp_path / "c.toml").is_file()
