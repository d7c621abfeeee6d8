"""Secrets file: private from the first byte, refused when readable by others, names matched."""

from __future__ import annotations

import os
import stat

import pytest

from clustertune.secrets import (SecretsFileError, is_secret_name, load_secrets_file, read_secrets_file,
                                 secret_env, write_secrets_file)


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
                                  "DB_PASSWORD", "my_api_key", "OPENAI_API_KEY", "SECRET", "MYSQL_PASS",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "HF_TOKEN_RO"])
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
                                  "PYTHONPATH", "HF_HOME", "MONKEY", "KEYBOARD", "CUDA_VISIBLE_DEVICES",
                                  "DS_ACCELERATOR", "PATH"])
def test_not_secret_names(name):
    assert not is_secret_name(name)


def test_secret_env_selects_known_and_listed():
    env = {"HF_TOKEN": "h", "WANDB_API_KEY": "w", "AWS_SECRET_ACCESS_KEY": "a", "MY_TOKEN": "m", "X": "x"}
    assert secret_env(env, ["MY_TOKEN", "X"]) == {"HF_TOKEN": "h", "MY_TOKEN": "m", "WANDB_API_KEY": "w"}


def test_write_then_load_roundtrip(tmp_path, monkeypatch):
    path = tmp_path / "secrets.env"
    old = os.umask(0)  # even with a permissive umask the file is created 0600
    try:
        write_secrets_file(path, {"HF_TOKEN": "hf_abc=def", "WANDB_API_KEY": "w a n"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for name in ("HF_TOKEN", "WANDB_API_KEY"):  # recorded, so the values loaded below are undone
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    assert load_secrets_file(path) == 2
    assert os.environ["HF_TOKEN"] == "hf_abc=def"
    assert os.environ["WANDB_API_KEY"] == "w a n"


def test_write_refuses_existing_file_and_symlink(tmp_path):
    path = tmp_path / "s"
    path.write_text("old")
    with pytest.raises(FileExistsError):
        write_secrets_file(path, {"A_TOKEN": "x"})
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        write_secrets_file(link, {"A_TOKEN": "x"})
    assert not (tmp_path / "target").exists()


def test_write_rejects_newline_without_echoing_value(tmp_path):
    with pytest.raises(SecretsFileError) as err:
        write_secrets_file(tmp_path / "s", {"A_TOKEN": "sup3r\nsecret"})
    assert "sup3r" not in str(err.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_readable_by_others(tmp_path, mode):
    path = tmp_path / "s"
    write_secrets_file(path, {"A_TOKEN": "value-xyz"})
    path.chmod(mode)
    with pytest.raises(SecretsFileError) as err:
        load_secrets_file(path)
    assert "chmod 600" in str(err.value)
    assert "value-xyz" not in str(err.value)


def test_load_bad_line_reports_number_not_content(tmp_path):
    path = tmp_path / "s"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"A_TOKEN=ok\n\n# comment\nhunter2-no-equals\n")
    os.close(fd)
    with pytest.raises(SecretsFileError) as err:
        read_secrets_file(path)
    assert "line 4" in str(err.value) and "hunter2" not in str(err.value)


def test_load_missing_file(tmp_path):
    with pytest.raises(SecretsFileError, match="does not exist"):
        load_secrets_file(tmp_path / "nope")
