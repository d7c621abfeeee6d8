"""ssh config rendering (incl. the legacy host), known_hosts logic, error classification."""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess

import pytest

from clustertune.cluster.inventory import cluster_from_dict
from clustertune.cluster.remote import classify_ssh_error, parse_result, program
from clustertune.cluster.ssh import (HostKey, format_matrix, matrix_ok, merge_host_keys, parse_known_hosts,
                                     render_known_hosts, render_ssh_config)

CLUSTER = cluster_from_dict({"name": "lab", "nodes": [
    {"name": "gpu1", "address": "10.0.0.1", "user": "root", "slots": 8},
    {"name": "gpu2", "address": "10.0.0.2", "user": "ubuntu", "port": 2222, "slots": 8}]})


def _blocks(text: str) -> dict[str, str]:
    parts = re.split(r"^Host ", text, flags=re.M)[1:]
    return {p.split("\n", 1)[0]: p for p in parts}


def test_ssh_config_one_entry_per_node():
    text = render_ssh_config(CLUSTER, "/home/me/.clustertune/clusters/lab")
    blocks = _blocks(text)
    assert list(blocks) == ["gpu1", "gpu2"]
    b = blocks["gpu2"]
    for line in ["HostName 10.0.0.2", "Port 2222", "User ubuntu",
                 'IdentityFile "/home/me/.clustertune/clusters/lab/id_ed25519"', "IdentitiesOnly yes",
                 'UserKnownHostsFile "/home/me/.clustertune/clusters/lab/known_hosts"',
                 "StrictHostKeyChecking accept-new", "BatchMode yes", "ConnectTimeout 10"]:
        assert f"    {line}\n" in b, line
    assert "HostKeyAlgorithms" not in text


def test_ssh_config_never_disables_host_key_checking():
    text = render_ssh_config(CLUSTER, "/x", legacy={"gpu2"})
    assert "StrictHostKeyChecking no" not in text and "/dev/null" not in text
    assert "StrictHostKeyChecking accept-new" in text


def test_legacy_host_only_gets_ssh_rsa():
    blocks = _blocks(render_ssh_config(CLUSTER, "/x", legacy={"gpu2"}))
    assert "HostKeyAlgorithms +ssh-rsa" in blocks["gpu2"]
    assert "HostKeyAlgorithms" not in blocks["gpu1"]
    assert "SHA-1" in blocks["gpu2"] and "ed25519" in blocks["gpu2"]


def test_ssh_config_is_accepted_by_ssh(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text(render_ssh_config(CLUSTER, str(tmp_path), legacy={"gpu2"}))
    out = subprocess.run(["ssh", "-G", "-F", str(cfg), "gpu2"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    opts = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert opts["hostname"] == "10.0.0.2" and opts["port"] == "2222" and opts["user"] == "ubuntu"
    assert opts["stricthostkeychecking"] == "accept-new" and opts["batchmode"] == "yes"
    assert "ssh-rsa" in opts["hostkeyalgorithms"].split(",")
    g1 = subprocess.run(["ssh", "-G", "-F", str(cfg), "gpu1"], capture_output=True, text=True, timeout=10).stdout
    assert "ssh-rsa," not in g1.split("hostkeyalgorithms ")[1].split("\n")[0] + ","


def _key(host="10.0.0.1", kind="ssh-ed25519", seed=b"a"):
    return HostKey(host, kind, base64.b64encode(hashlib.sha256(seed).digest()).decode())


def test_fingerprint_matches_ssh_keygen(tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True, timeout=30)
    kind, blob = (tmp_path / "k.pub").read_text().split()[:2]
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True,
                         timeout=30).stdout
    assert HostKey("h", kind, blob).fingerprint == out.split()[1]
    assert HostKey("h", kind, blob).label.startswith("ED25519 SHA256:")


def test_known_hosts_parse_and_render():
    text = ("# comment\n10.0.0.1 ssh-ed25519 AAAA\n[10.0.0.2]:2222,alias ssh-rsa BBBB\n"
            "|1|hashed= ssh-ed25519 CCCC\n@cert-authority * ssh-ed25519 DDDD\n")
    keys = parse_known_hosts(text)
    assert [(k.host, k.keytype) for k in keys] == [("10.0.0.1", "ssh-ed25519"), ("[10.0.0.2]:2222", "ssh-rsa"),
                                                  ("alias", "ssh-rsa")]
    assert parse_known_hosts(render_known_hosts(keys)) == sorted(keys, key=lambda k: (k.host, k.keytype))


def test_merge_accept_new_and_changed():
    old = [_key(seed=b"a"), _key(kind="ssh-rsa", seed=b"r")]
    merged = merge_host_keys(old, [_key(seed=b"a"), _key(kind="ecdsa-sha2-nistp256", seed=b"e")])
    assert len(merged.known) == 1 and len(merged.new) == 1 and not merged.changed
    merged = merge_host_keys(old, [_key(seed=b"b")])
    assert merged.changed == [(old[0], _key(seed=b"b"))]
    assert merged.changed[0][0].fingerprint != merged.changed[0][1].fingerprint


@pytest.mark.parametrize("stderr, kind", [
    ("Unable to negotiate with 10.0.0.2 port 22: no matching host key type found. Their offer: ssh-rsa",
     "legacy-hostkey"),
    ("@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key verification failed.",
     "hostkey-changed"),
    ("root@10.0.0.2: Permission denied (publickey).", "auth"),
    ("ssh: connect to host 10.0.0.2 port 22: Connection refused", "refused"),
    ("ssh: connect to host 10.0.0.2 port 22: Connection timed out", "timeout"),
    ("ssh: connect to host 10.0.0.2 port 22: No route to host", "unreachable"),
    ("ssh: Could not resolve hostname gpu9: Name or service not known", "dns"),
    ("something odd", "other"),
])
def test_classify_ssh_error(stderr, kind):
    failure = classify_ssh_error(stderr)
    assert failure.kind == kind and failure.fix
    if kind == "legacy-hostkey":
        assert failure.offer == ("ssh-rsa",)


def test_program_carries_data_as_a_literal_only():
    evil = "'; import os; os.system('id'); '\"\n$(reboot)"
    code = program("probe", {"python": evil})
    tail = code.rsplit("\n_main(", 1)[1]
    assert tail.count("\n") == 1  # one call, one literal: no injected statement lines
    compiled = compile(code, "p", "exec")
    assert compiled is not None
    import ast
    call = ast.parse("_main(" + tail).body[0].value
    import json
    assert isinstance(call.args[0], ast.Constant)
    assert json.loads(call.args[0].value)["args"]["python"] == evil


def test_parse_result_ignores_banner_noise():
    out = "Welcome to Ubuntu\n@@CLUSTERTUNE-RESULT@@{\"a\": 1}\n"
    assert parse_result(out) == {"a": 1}
    assert parse_result("no marker") is None


def test_matrix_format():
    res = {"a": {"a": {"ok": True}, "b": {"ok": False, "error": "Permission denied"}},
           "b": {"a": {"ok": True}, "b": {"ok": True}}}
    text = format_matrix(["a", "b"], res)
    assert "FAIL" in text and "a -> b: Permission denied" in text and not matrix_ok(res)
