"""RUN_DIR/manifest.json: what a run ran with, so the run directory describes itself -- package
versions, the git commit of the clustertune source, host, world size, and the environment
variables that change how training behaves (NCCL_*, CUDA_VISIBLE_DEVICES, MASTER_ADDR, ...).

    from clustertune.manifest import write_manifest
    write_manifest(run_dir, world_size=8)   # rank 0, from train.write_run_files

No secrets, ever: a variable is recorded only if its name is on the allow-list below AND
clustertune.secrets.is_secret_name() does not flag it (so NCCL_FOO_TOKEN or WANDB_API_KEY never
appear, allow-listed prefix or not); a value that contains the value of any secret-named variable
of the environment, or credentials in a URL, is replaced by a marker. Standard library only: the
worker calls it, but it never imports torch itself (it reads torch's build only if already loaded).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clustertune.secrets import is_secret_name

MANIFEST_NAME = "manifest.json"

# Recorded when installed (absent ones are left out; the first six are always listed, null if missing).
PACKAGES = ("torch", "deepspeed", "transformers", "peft", "clustertune", "liger-kernel",
            "accelerate", "safetensors", "tokenizers", "triton", "flash-attn", "numpy", "pydantic")
CORE_PACKAGES = PACKAGES[:5]

# Variables that change how a run behaves (communication, devices, threads, caches, launch).
ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "CUDA_", "CUBLAS_", "CUDNN_",
                "OMP_", "MKL_", "KMP_", "DS_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_",
                "CLUSTERTUNE_", "WANDB_", "SLURM_JOB_", "SLURM_NNODES", "SLURM_NTASKS", "SLURM_PROCID")
ENV_NAMES = frozenset({"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                       "NODE_RANK", "GROUP_RANK", "CROSS_RANK", "CROSS_SIZE", "PYTHONPATH", "PYTHONHASHSEED",
                       "LD_LIBRARY_PATH", "TMPDIR", "TZ"})
REDACTED = "<redacted: contains a secret's value>"
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@")
_MIN_SECRET_LEN = 6  # shorter secret values ("1", "true") would redact unrelated values
GIT_TIMEOUT_S = 5.0


def environment_manifest(environ: Mapping[str, str]) -> dict[str, str]:
    """Allow-listed, non-secret variables and their values, sorted by name."""
    secret_values = [v for k, v in environ.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN]
    out = {}
    for name in sorted(environ):
        if is_secret_name(name) or not (name in ENV_NAMES or name.startswith(ENV_PREFIXES)):
            continue
        value = environ[name]
        if any(secret in value for secret in secret_values):
            value = REDACTED
        else:
            value = _URL_CREDENTIALS.sub(r"\g<scheme><redacted>@", value)
        out[name] = value
    return out


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in CORE_PACKAGES:
                versions[name] = None
    return versions


def torch_build() -> dict[str, Any] | None:
    """CUDA / NCCL / device facts of the torch already imported by the worker (None if not)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    info: dict[str, Any] = {"cuda": getattr(torch.version, "cuda", None)}
    try:
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
            info["device_count"] = torch.cuda.device_count()
            info["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
            info["cudnn"] = torch.backends.cudnn.version()
    except Exception as err:  # a broken driver must not stop the run from describing itself
        info["error"] = f"{type(err).__name__}: {err}"
    return info


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                             check=True, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def source_commit(package_dir: Path | None = None) -> dict[str, Any] | None:
    """Commit of the git checkout clustertune is imported from; None for an installed wheel (or no
    git). The package's own __init__.py must be tracked in that checkout: a venv that lives
    inside some other repository must not report that repository's commit."""
    package_dir = package_dir or Path(__file__).resolve().parent
    if _git(["ls-files", "--error-unmatch", "__init__.py"], package_dir) is None:
        return None
    commit = _git(["rev-parse", "HEAD"], package_dir)
    if not commit:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", "."], package_dir)
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def build_manifest(*, world_size: int, environ: Mapping[str, str] | None = None, hostname: str | None = None,
                   versions: dict[str, str | None] | None = None, git: dict[str, Any] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest as a dict. Everything it would look up can be passed in (tests, other callers)."""
    environ = os.environ if environ is None else environ
    manifest: dict[str, Any] = {
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": hostname or socket.gethostname(),
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "world_size": world_size,
        "versions": package_versions() if versions is None else versions,
        "torch_build": torch_build(),
        "git": source_commit() if git is None else git,
        "environment": environment_manifest(environ),
    }
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(run_dir: Path, *, world_size: int, **kwargs: Any) -> Path:
    """Write RUN_DIR/manifest.json (atomically: a crash leaves no half-written file)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(build_manifest(world_size=world_size, **kwargs), indent=2, default=str) + "\n",
                   encoding="utf-8")
    tmp.replace(path)
    return path
