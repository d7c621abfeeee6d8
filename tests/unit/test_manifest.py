"""RUN_DIR/manifest.json (clustertune.manifest): versions, git commit, environment, never secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path

from clustertune.manifest import (REDACTED, build_manifest, environment_manifest, source_commit,
                                  write_manifest)

CANARIES = {
    "HF_TOKEN": "hf_canaryTOKEN0123456789",
    "WANDB_API_KEY": "wandb-canary-key-9876543210",
    "MY_PASSWORD": "canary-password-hunter2",
    "NCCL_FOO_TOKEN": "nccl-prefixed-canary-42",  # allow-listed prefix, secret-looking name
    "AWS_SECRET_ACCESS_KEY": "aws-canary-secret-xyz",
}


def test_canary_secrets_never_reach_the_file(tmp_path, monkeypatch):
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    # an allow-listed variable whose value embeds a secret, and one with URL credentials
    monkeypatch.setenv("NCCL_DEBUG_FILE", f"/tmp/{CANARIES['HF_TOKEN']}/nccl.log")
    monkeypatch.setenv("HF_ENDPOINT", "https://alice:urlcanary-pw@hub.example.com/api")
    monkeypatch.setenv("UNRELATED_VAR", "not-recorded")

    path = write_manifest(tmp_path / "run", world_size=16)

    text = path.read_text(encoding="utf-8")
    for name, value in CANARIES.items():
        assert value not in text, name
        assert name not in text, name
    assert "urlcanary-pw" not in text
    manifest = json.loads(text)  # valid JSON
    env = manifest["environment"]
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["NCCL_DEBUG_FILE"] == REDACTED
    assert env["HF_ENDPOINT"] == "https://<redacted>@hub.example.com/api"
    assert "UNRELATED_VAR" not in env
    assert manifest["world_size"] == 16 and manifest["hostname"]


def test_versions_present(tmp_path):
    manifest = json.loads(write_manifest(tmp_path, world_size=1).read_text())
    versions = manifest["versions"]
    for name in ("python", "torch", "deepspeed", "transformers", "peft", "clustertune"):
        assert name in versions, name
    # installed in the test environment
    for name in ("torch", "deepspeed", "transformers", "peft", "clustertune"):
        assert re.match(r"\d+\.\d+", versions[name]), (name, versions[name])
    assert not (tmp_path / "manifest.json.tmp").exists()


def test_git_commit_of_this_checkout_and_absence_tolerated(tmp_path, monkeypatch):
    here = source_commit()
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        assert here is not None and re.fullmatch(r"[0-9a-f]{40}", here["commit"])
        assert isinstance(here["dirty"], bool)
    # a directory outside any checkout, and no git at all: no commit, no exception
    assert source_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))
    assert source_commit() is None


def test_build_manifest_is_pure_given_its_inputs():
    env = {"NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "8", "PYTHONPATH": "/src", "HOME": "/root",
           "HF_TOKEN": "hf_xxxxxxxxxxxx"}
    manifest = build_manifest(world_size=2, environ=env, hostname="node-a", versions={"python": "3.11.9"},
                              git={"commit": "0" * 40, "dirty": False}, extra={"precision": "bf16"})
    assert manifest["environment"] == {"NCCL_DEBUG": "INFO", "OMP_NUM_THREADS": "8", "PYTHONPATH": "/src"}
    assert manifest["hostname"] == "node-a" and manifest["precision"] == "bf16"
    assert manifest["git"]["commit"] == "0" * 40
    json.dumps(manifest)  # serializable as is


def test_short_secret_values_do_not_redact_everything():
    # a secret-named flag set to "1" must not blank every value containing a 1
    env = {"USE_TOKEN": "1", "NCCL_NCHANNELS_PER_NET_PEER": "1", "WORLD_SIZE": "16"}
    assert environment_manifest(env) == {"NCCL_NCHANNELS_PER_NET_PEER": "1", "WORLD_SIZE": "16"}
