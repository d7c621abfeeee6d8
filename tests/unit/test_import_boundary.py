"""The folder boundary: the launcher side (everything under clustertune/ except worker/) imports
no torch, transformers or deepspeed at module level, so `clustertune` runs, and fails fast, where
they are not installed or slow to import; the worker side is one command, `python -m
clustertune.worker`."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import clustertune

FORBIDDEN = ("torch", "transformers", "deepspeed")
SRC = Path(clustertune.__file__).parent.parent

# Imports each module in turn in a fresh interpreter and names the first one after whose import
# a forbidden package is in sys.modules (that module, or one it imports, pulls it in).
PROBE = """
import importlib, json, sys
forbidden = {forbidden!r}
for name in {modules!r}:
    importlib.import_module(name)
    loaded = sorted(m for m in forbidden if m in sys.modules)
    if loaded:
        print(json.dumps({{"module": name, "loaded": loaded}}))
        break
else:
    print(json.dumps(None))
"""


def launcher_modules() -> list[str]:
    """Every module under src/clustertune but worker/, found on disk (nothing imported here)."""
    names = []

    def walk(path: list[str], prefix: str) -> None:
        names.append(prefix)
        for info in pkgutil.iter_modules(path):
            name = f"{prefix}.{info.name}"
            if name == "clustertune.worker":
                continue
            if info.ispkg:
                walk([os.path.join(path[0], info.name)], name)
            else:
                names.append(name)

    walk(list(clustertune.__path__), "clustertune")
    return sorted(names)


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(SRC)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)


def test_the_module_list_covers_the_launcher_side():
    names = launcher_modules()
    for expected in ("clustertune.cli", "clustertune.config", "clustertune.plan", "clustertune.batch_math",
                     "clustertune.contract", "clustertune.errors", "clustertune.cluster.launch",
                     "clustertune.data.prepare"):
        assert expected in names
    assert not any(n.startswith("clustertune.worker") for n in names)


def test_launcher_side_modules_import_no_torch_transformers_or_deepspeed():
    names = launcher_modules()
    proc = _python("-c", PROBE.format(forbidden=FORBIDDEN, modules=names))
    assert proc.returncode == 0, proc.stderr[-3000:]
    culprit = json.loads(proc.stdout.strip().splitlines()[-1])
    assert culprit is None, (f"importing {culprit['module']} (launcher side) loads {culprit['loaded']}: import "
                             "them inside the function that needs them, or move the code under clustertune/worker/")


def test_the_probe_catches_a_module_that_imports_torch():
    """The check can fail: a worker module, which imports torch at module level, is caught."""
    proc = _python("-c", PROBE.format(forbidden=FORBIDDEN, modules=["clustertune.config", "clustertune.worker.step"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    culprit = json.loads(proc.stdout.strip().splitlines()[-1])
    assert culprit is not None and culprit["module"] == "clustertune.worker.step" and "torch" in culprit["loaded"]


def test_worker_entry_point_help():
    proc = _python("-m", "clustertune.worker", "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: python -m clustertune.worker" in proc.stdout and "--resume" in proc.stdout
