"""Secrets (HF_TOKEN, WANDB_API_KEY, anything *_TOKEN / *_KEY / *_SECRET / *_PASSWORD) travel to the
workers through one file that only its owner can read, never through a command line, an
environment file that a launcher copies onto a command line, or a log.

The launcher writes the file with `write_secrets_file` (0600 from the first byte on) and passes
only its path in CLUSTERTUNE_SECRETS_FILE; each worker calls `load_secrets_file` at start-up.

    from clustertune.secrets import load_secrets_file
    load_secrets_file(os.environ[contract.SECRETS_FILE_ENV])

Imported by the launcher side and the worker: standard library only, never torch.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from clustertune.errors import UserError

# Environment variable names (matched case-insensitively, fnmatch style) that are treated as
# secrets. A false positive is harmless: such a variable still reaches the workers, through the
# secrets file instead of the plain environment. TOKENIZERS_PARALLELISM is deliberately not a
# match (it is not `*_TOKEN*` with an underscore boundary).
SECRET_PATTERNS: tuple[str, ...] = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY",
    "TOKEN", "*_TOKEN", "*_TOKEN_*",
    "KEY", "*_KEY", "*_KEY_*", "*APIKEY*",
    "SECRET", "*_SECRET", "*_SECRET_*",
    "PASSWORD", "*_PASSWORD", "*_PASSWORD_*", "*PASSWD*", "*_PASS",
    "*CREDENTIAL*",
)

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SecretsFileError(UserError):
    """A secrets file that must not be used (unsafe permissions, bad format). Never holds values."""


def is_secret_name(name: str) -> bool:
    """True if an environment variable of this name must be handled as a secret."""
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, pattern) for pattern in SECRET_PATTERNS)


def secret_env(env: Mapping[str, str], extra_names: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The secrets to forward from `env`: the well-known ones (HF_TOKEN, WANDB_API_KEY, ...) plus
    any secret-named variable listed in `extra_names` (the recipe's run.env_passthrough). Other
    secret-looking variables of the launching shell (cloud keys, ...) stay on the launching host."""
    wanted = {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY"}
    wanted |= {name for name in extra_names if is_secret_name(name)}
    return {name: env[name] for name in sorted(wanted) if name in env}


def secrets_file_text(env: Mapping[str, str]) -> str:
    """The file's content: NAME=VALUE lines (what read_secrets_file parses)."""
    lines = []
    for name, value in env.items():
        if not _NAME_RE.match(name):
            raise SecretsFileError(f"secret variable name {name!r} is not a valid environment name")
        if "\n" in value or "\r" in value or "\0" in value:
            raise SecretsFileError(f"secret {name} contains a newline or NUL byte, which the secrets "
                                   "file format cannot hold")
        lines.append(f"{name}={value}\n")
    return "".join(lines)


def write_secrets_file(path: str | os.PathLike[str], env: Mapping[str, str]) -> None:
    """Write KEY=VALUE lines to a new file that is 0600 from the moment it exists.

    O_CREAT|O_EXCL|O_NOFOLLOW with mode 0600: the file is never world-readable, not even between
    create and chmod, and an existing file or symlink at `path` is an error rather than
    something written through. Remove a previous run's file first.
    """
    text = secrets_file_text(env)
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only have removed bits; make it exactly 0600
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fd = -1
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        if fd != -1:
            os.close(fd)


def check_secrets_file_mode(st: os.stat_result, path: str | os.PathLike[str]) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SecretsFileError(f"secrets file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise SecretsFileError(
            f"secrets file {path} is readable or writable by group/others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); refusing to use it. Fix: chmod 600 {path}")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise SecretsFileError(f"secrets file {path} is owned by uid {st.st_uid}, not by this user "
                               f"(uid {os.geteuid()}); refusing to use it")


def read_secrets_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a secrets file after checking it is private (0600-style, owned by us)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretsFileError(f"secrets file {path} does not exist") from None
    except OSError as err:
        raise SecretsFileError(f"cannot open secrets file {path}: {err.strerror}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as handle:
        check_secrets_file_mode(os.fstat(handle.fileno()), path)
        text = handle.read()
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not _NAME_RE.match(name):
            # The line itself may hold a secret: report its number only.
            raise SecretsFileError(f"secrets file {path}, line {lineno}: expected NAME=VALUE")
        values[name] = value
    return values


def load_secrets_file(path: str | os.PathLike[str]) -> int:
    """Read a secrets file into os.environ; return how many variables were set. Refuses a file
    that group or others can access. Never prints or logs a value."""
    values = read_secrets_file(path)
    os.environ.update(values)
    return len(values)
