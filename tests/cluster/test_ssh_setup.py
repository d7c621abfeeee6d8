"""`clustertune cluster init` + `cluster ssh` from no passwordless access to a verified mutual
matrix; the legacy ssh-rsa server; a changed host key refused."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from clusterlib import needs_sandbox

pytestmark = [pytest.mark.cluster, needs_sandbox]


def _batch_ssh(h, src: str, dst_addr: str, key: Path | None = None):
    """A plain BatchMode ssh from one node to another (no cluster config)."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={h.tmp / 'probe_known_hosts'}"]
    if key is not None:
        argv += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    return h.run(src, argv + [f"root@{dst_addr}", "true"], timeout=30)


def test_init_then_ssh_from_nothing_to_mutual(make_cluster):
    h = make_cluster(2)
    n1, n2 = h.sb.nodes
    root_keys = Path("/root/.ssh/authorized_keys")
    before = root_keys.read_bytes() if root_keys.exists() else None

    # cluster init, as a user would type it on the master
    cfile = h.tmp / "cluster.toml"
    out = h.clustertune("cluster", "init", "--out", str(cfile), "--name", h.sb.name, "--accelerator", "cpu",
                        "--node", f"node1=root@{n1.address}:22:1", "--node", f"node2=root@{n2.address}:22:1")
    assert out.returncode == 0, out.stderr

    # no passwordless access yet: the harness only holds the one-time bootstrap key
    assert _batch_ssh(h, "node1", n2.address).returncode == 255
    out = h.clustertune("cluster", "ssh", "--cluster", str(cfile), "--check")
    assert out.returncode == 1

    out = h.clustertune("cluster", "ssh", "--cluster", str(cfile), "--identity", h.sb.state.bootstrap_key)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "created the cluster key" in out.stdout
    assert len(re.findall(r"new host key for node\d .*: ED25519 SHA256:\S+", out.stdout)) == 2
    assert "mutual passwordless ssh: OK (2 nodes, 4 ordered pairs)" in out.stdout

    h.sb.revoke_bootstrap()  # the user's password is not needed any more
    out = h.clustertune("cluster", "ssh", "--cluster", str(cfile), "--check")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[1:] if line.startswith("node")}
    assert rows == {"node1": ["ok", "ok"], "node2": ["ok", "ok"]}

    # every node holds its own copy: key 0600 in a 0700 directory, config pointing at its own home
    for node in ("node1", "node2"):
        d = h.cluster_dir(node)
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        assert stat.S_IMODE((d / "id_ed25519").stat().st_mode) == 0o600
        cfg = (d / "ssh_config").read_text()
        assert f'IdentityFile "{d}/id_ed25519"' in cfg and "StrictHostKeyChecking accept-new" in cfg
        assert (d / "id_ed25519.pub").read_text().split()[1] in (h.home(node) / ".ssh/authorized_keys").read_text()
    # node2 -> node1 with the node's own files, the way DeepSpeed/pdsh on any node would
    back = h.run("node2", ["ssh", "-F", str(h.cluster_dir("node2") / "ssh_config"), "node1", "echo", "$HOME"])
    assert back.returncode == 0 and back.stdout.strip() == str(h.home("node1"))
    # the real machine's own ssh files were not touched
    assert (root_keys.read_bytes() if root_keys.exists() else None) == before

    # idempotent: a second run changes nothing and still verifies
    again = h.clustertune("cluster", "ssh", "--cluster", str(cfile))
    assert again.returncode == 0 and "cluster key present" in again.stdout and "new host key" not in again.stdout


def test_legacy_ssh_rsa_node_three_nodes(make_cluster):
    h = make_cluster(3, legacy=("node3",))
    n3 = h.sb.node("node3")
    # what the user saw in the article: plain modern ssh cannot even negotiate
    plain = _batch_ssh(h, "node1", n3.address, key=Path(h.sb.state.bootstrap_key))
    assert "no matching host key type found. Their offer: ssh-rsa" in plain.stderr

    out = h.setup_ssh()
    assert "mutual passwordless ssh: OK (3 nodes, 9 ordered pairs)" in out.stdout
    warning = out.stderr
    assert "WARNING: node3" in warning and "ssh-rsa" in warning and "SHA-1" in warning
    assert "ed25519 host key" in warning and "node3 ONLY" in warning
    assert "RSA SHA256:" in out.stdout  # its fingerprint was shown like the others

    cfg = (h.cluster_dir("node1") / "ssh_config").read_text()
    blocks = {b.split("\n", 1)[0]: b for b in re.split(r"^Host ", cfg, flags=re.M)[1:]}
    assert "HostKeyAlgorithms +ssh-rsa" in blocks["node3"]
    assert "HostKeyAlgorithms" not in blocks["node1"] + blocks["node2"]
    assert "StrictHostKeyChecking accept-new" in blocks["node3"]

    check = h.clustertune("cluster", "ssh", "--cluster", str(h.sb.cluster_file), "--check")
    assert check.returncode == 0
    assert [line.split()[1:] for line in check.stdout.splitlines()[1:4]] == [["ok", "ok", "ok"]] * 3
    # the doctor keeps reminding: a warning, not a failure
    doc = h.clustertune("cluster", "doctor", "--cluster", str(h.sb.cluster_file), "--fast")
    assert doc.returncode == 0 and "node3 / ssh: node3 offers only the legacy SHA-1 'ssh-rsa'" in doc.stdout


def test_ssh_setup_through_the_users_agent(make_cluster, tmp_path):
    """No --identity: the user's existing access is their ssh agent (here holding the bootstrap key)."""
    h = make_cluster(2)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        env = {"SSH_AUTH_SOCK": str(sock)}
        added = subprocess.run(["ssh-add", h.sb.state.bootstrap_key], env=dict(os.environ, **env),
                               capture_output=True, text=True, timeout=30)
        assert added.returncode == 0, added.stderr
        out = h.clustertune("cluster", "ssh", "--cluster", str(h.sb.cluster_file), env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "using your ssh agent / default keys" in out.stdout
    finally:
        agent.terminate()
        agent.wait(10)
    h.sb.revoke_bootstrap()
    assert h.clustertune("cluster", "ssh", "--cluster", str(h.sb.cluster_file), "--check").returncode == 0


def test_changed_host_key_is_refused(make_cluster):
    h = make_cluster(2)
    h.setup_ssh()
    known = (h.cluster_dir("node1") / "known_hosts").read_text()
    old_fp = _fingerprint_of(h.sb.node("node2").etc / "ssh_host_ed25519_key.pub")

    h.sb.rotate_host_key("node2")  # the server was reinstalled, or someone sits in the middle
    new_fp = _fingerprint_of(h.sb.node("node2").etc / "ssh_host_ed25519_key.pub")
    assert old_fp != new_fp

    out = h.clustertune("cluster", "ssh", "--cluster", str(h.sb.cluster_file))
    assert out.returncode == 1
    assert "node2" in out.stderr and "HOST KEY CHANGED" in out.stderr
    assert old_fp in out.stderr and new_fp in out.stderr and "ssh-keygen -R" in out.stderr
    assert (h.cluster_dir("node1") / "known_hosts").read_text() == known  # nothing was accepted

    # ssh through the cluster config refuses too (host-key checking is on), and the doctor says why
    ssh = h.run("node1", ["ssh", "-F", str(h.cluster_dir("node1") / "ssh_config"), "node2", "true"], timeout=30)
    assert ssh.returncode == 255 and "REMOTE HOST IDENTIFICATION HAS CHANGED" in ssh.stderr
    doc = h.clustertune("cluster", "doctor", "--cluster", str(h.sb.cluster_file), "--fast")
    assert doc.returncode == 1 and "hostkey-changed" in doc.stdout


def test_unreachable_node_stops_ssh_setup_before_installing(make_cluster, tmp_path):
    h = make_cluster(2)
    cfile = tmp_path / "c.toml"
    text = h.sb.cluster_file.read_text() + (
        f'\n[[nodes]]\nname = "node9"\naddress = "{h.sb.state.subnet}.99"\nuser = "root"\nport = 22\nslots = 1\n')
    cfile.write_text(text)
    out = h.clustertune("cluster", "ssh", "--cluster", str(cfile), "--identity", h.sb.state.bootstrap_key,
                        timeout=120)
    assert out.returncode == 1 and "node9" in out.stderr and "no host key" in out.stderr
    # nothing was installed anywhere
    assert not (h.home("node2") / ".clustertune").exists()
    assert (h.home("node2") / ".ssh" / "authorized_keys").read_text().count("ssh-ed25519") == 1  # bootstrap only


def _fingerprint_of(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, timeout=10).stdout.split()[1]
