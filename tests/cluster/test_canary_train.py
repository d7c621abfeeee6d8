"""Secret canary on a real 2-node run (namespace nodes, DeepSpeed launcher over pdsh/ssh, the real
worker, tiny Qwen2, ZeRO-3, checkpoints): canary values in HF_TOKEN and WANDB_API_KEY.

While the run lives, /proc/*/cmdline of every process is polled (the namespace nodes share this
machine's process table, so that is every node); afterwards every file of the run directory
(logs, manifest.json, metrics, TensorBoard events, checkpoints, the exported model, launch files),
the nodes' home directories and the console are searched as bytes. The canaries may appear only
in the 0600 secrets file, which must be gone after the run.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clusterlib import base_env, needs_sandbox, run_pids
from tinytask import make_task, tiny_recipe

pytestmark = [pytest.mark.cluster, needs_sandbox]

CANARIES = {"HF_TOKEN": "hf_CANARYq7Zt3xN9vK2mLwP5", "WANDB_API_KEY": "wbCANARY0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5"}


def _poll_cmdlines(stop: threading.Event, hits: list[str], seen: dict[str, int]) -> None:
    needles = [v.encode() for v in CANARIES.values()]
    while not stop.is_set():
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"clustertune" in cmd or b"deepspeed" in cmd or b"pdsh" in cmd:
                seen["run_processes"] = seen.get("run_processes", 0) + 1
            if any(n in cmd for n in needles):
                hits.append(f"pid {entry}: {cmd[:200]!r}")
        stop.wait(0.05)


def test_canaries_only_in_the_0600_secrets_file(make_cluster, tmp_path):
    h = make_cluster(2)
    h.setup_ssh()
    tokenizer, _ = make_task(tmp_path)
    recipe = tmp_path / "canary.toml"
    recipe.write_text(tiny_recipe("canary", tokenizer, steps=4, stage=3, train={"schedule": "cosine"},
                                   checkpoint={"every_steps": 2}))
    env = dict(base_env(), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="eth0", **CANARIES,
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   os.path.expanduser("~/.cache/torch_extensions")))
    run = tmp_path / "runs" / "canary"
    secrets_file = run / "launch" / "secrets.env"
    stop, hits, seen = threading.Event(), [], {}
    modes: list[int] = []
    poller = threading.Thread(target=_poll_cmdlines, args=(stop, hits, seen), daemon=True)
    poller.start()
    argv = [sys.executable, "-m", "clustertune.cli", "launch", str(recipe), "--cluster", str(h.sb.cluster_file),
            "--skip-doctor"]
    proc = subprocess.Popen(h.sb.exec_argv("node1", argv), env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        watcher = threading.Thread(target=lambda: modes.extend(_watch_mode(secrets_file, proc, deadline)),
                                   daemon=True)
        watcher.start()
        stdout, stderr = proc.communicate(timeout=240)
        watcher.join(5)
    finally:
        stop.set()
        poller.join(5)
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(10)
    assert proc.returncode == 0, stdout[-4000:] + stderr[-3000:]
    assert seen.get("run_processes", 0) > 0  # the poller did see the run
    assert hits == [], hits
    assert modes and all(stat.S_IMODE(m) == 0o600 for m in modes), [oct(m) for m in modes]
    assert not secrets_file.exists()
    info = json.loads((run / "launch" / "run.json").read_text())
    assert info["secret_names"] == sorted(CANARIES)
    assert run_pids(info["run_id"]) == []

    files = [p for p in list(tmp_path.rglob("*")) + list(h.sb.dir.rglob("*")) if p.is_file()]
    names = {p.name for p in run.rglob("*")}
    assert {"manifest.json", "metrics.jsonl", "COMPLETE.json"} <= names, sorted(names)[:80]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:  # TensorBoard's event files are searched too
        assert any(p.name.startswith("events.out.tfevents") for p in run.rglob("*")), sorted(names)
    leaks = []
    for p in files:
        data = p.read_bytes()
        leaks += [f"{p}: {name}" for name, value in CANARIES.items() if value.encode() in data]
    for name, value in CANARIES.items():
        if value in stdout + stderr:
            leaks.append(f"console: {name}")
    assert leaks == [], leaks
    assert len(files) > 20


def _watch_mode(path: Path, proc: subprocess.Popen, deadline: float) -> list[int]:
    modes = []
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            modes.append(path.stat().st_mode)
        except OSError:
            pass
        time.sleep(0.1)
    return modes
