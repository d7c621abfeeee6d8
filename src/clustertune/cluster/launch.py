"""`clustertune launch`: one training run across the nodes of a cluster file.

    clustertune launch RECIPE --cluster cluster.toml [--launcher deepspeed|torchrun|slurm] [--resume]
    clustertune launch RECIPE                         # no cluster file: this machine, same path

deepspeed (default): the doctor's fast checks, then DeepSpeed's own launcher
    python -m deepspeed.launcher.runner --hostfile RUN/launch/hostfile --master_addr A --master_port P
        --launcher pdsh --force_multi --no_ssh_check --no_local_rank --module
        clustertune.cluster.rankexec --env-file RUN/launch/run.env RUN/launch/recipe.toml [--resume]
  with pdsh using the per-cluster ssh config (PDSH_SSH_ARGS_APPEND="-F <ssh_config>").
torchrun: one `ssh NODE 'cd WORKDIR && ... torch.distributed.run --nnodes --node-rank ...'` per node.
slurm: writes RUN/launch/job.sbatch (srun + torchrun) for `sbatch`; nothing runs here.

Environment. DeepSpeed's pdsh runner turns every variable it exports (its prefixes PYTHON*, NCCL*,
UCX*, MV2*, MLFLOW* and each line of .deepspeed_env) into `export K=V;` text on the pdsh command
line and in the remote shell's command. So:
  * the runner gets a minimal environment (never the user's whole environment), and DS_ENV_FILE
    points at this run's fresh env file (so no stray ~/.deepspeed_env is read);
  * the env file holds only allow-listed, non-secret variables whose values a shell cannot
    expand (DeepSpeed wraps other values in double quotes, where $ and ` still expand);
  * secrets go in RUN/launch/secrets.env (0600) and only its path travels, as
    CLUSTERTUNE_SECRETS_FILE; the worker reads it; it is deleted on every node at the end.

Processes. Every process of a run carries CLUSTERTUNE_RUN_ID=<random id> in its environment. A
failed rank, Ctrl-C or SIGTERM stops the run: on every node, exactly the processes of this user
whose environment holds this run's id get SIGTERM, then SIGKILL (never a name-based pkill like
DeepSpeed's own handler, which would hit other runs); then the local launcher process group
(started in its own session) is killed. A final sweep after every run leaves no orphans.

Output: each line is shown as `node1 r0 | text` and saved in RUN/logs/<node>.log (launcher
lines in RUN/logs/launcher.log), with known secret values masked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from clustertune.local import check_data_before_start, free_port, local_gpu_count
from clustertune.cluster.inventory import (Cluster, cluster_to_toml, hostfile_text, load_cluster,
                                          localhost_cluster)
from clustertune.cluster import node_env
from clustertune.cluster.rankexec import EXIT_TAG
from clustertune.errors import UserError
from clustertune.secrets import is_secret_name, secret_env, write_secrets_file
from clustertune.watchdog import STALL_EXIT_CODE, StallMonitor, parse_heartbeat

# ------------------------------------------------------------------------------- environment

# Forwarded to every rank when set in the launching shell (plus recipe run.env_passthrough).
ALLOW_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "CUDA_", "OMP_", "MKL_", "KMP_",
                  "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "DS_", "CLUSTERTUNE_", "WANDB_")
ALLOW_NAMES = frozenset({"PYTHONPATH", "TMPDIR", "TZ"})
# Decided per node by the launcher itself, never copied from the launching shell.
DENY_NAMES = frozenset({"CUDA_VISIBLE_DEVICES", "DS_ENV_FILE", "CLUSTERTUNE_RUN_ID", "CLUSTERTUNE_SECRETS_FILE",
                        "CLUSTERTUNE_NODE_NICS", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        # each node's own checkpoint directory (no shared filesystem), set on that node
                        "CLUSTERTUNE_NODE_LOCAL_DIR"})
# Characters DeepSpeed's add_export leaves unquoted, plus space (quoted by it, and inert inside "...").
SAFE_VALUE_RE = re.compile(r"^[\w@%+=:,./ -]*$")
SAFE_PATH_RE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(UserError):
    """Stops a launch before anything runs; the message is meant for the user as-is."""


@dataclass
class EnvSelection:
    plain: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # human notes, never values


def select_env(environ: Mapping[str, str], passthrough: list[str] | tuple[str, ...] = ()) -> EnvSelection:
    """Split the launching environment into what the ranks get: allow-listed plain variables
    (values checked to be inert in a shell) and secrets (HF_TOKEN, ... and listed *_TOKEN/...)."""
    for name in passthrough:
        if not ENV_NAME_RE.match(name):
            raise LaunchError(f"run.env_passthrough: {name!r} is not a valid environment variable name")
    sel = EnvSelection(secrets=secret_env(environ, passthrough))
    listed = set(passthrough)
    for name, value in sorted(environ.items()):
        if is_secret_name(name):
            if name in listed or name in sel.secrets:
                continue
            if name.startswith(ALLOW_PREFIXES):
                sel.skipped.append(f"{name} (secret-like name, not forwarded: list it in run.env_passthrough)")
            continue
        allowed = name in listed or (name not in DENY_NAMES
                                     and (name in ALLOW_NAMES or name.startswith(ALLOW_PREFIXES)))
        if not allowed:
            continue
        if "\n" in value or not SAFE_VALUE_RE.match(value):
            msg = (f"environment variable {name} has characters a remote shell would interpret "
                   f"(allowed: letters, digits, space and _@%+=:,./-)")
            if name in listed:
                raise LaunchError(msg + "; it is listed in run.env_passthrough, fix its value or remove it")
            sel.skipped.append(f"{name} (not forwarded: {msg})")
            continue
        sel.plain[name] = value
    for name in passthrough:
        if name not in environ:
            sel.skipped.append(f"{name} (listed in run.env_passthrough but not set)")
    return sel


def build_run_env(sel: EnvSelection, *, run_id: str, cpu: bool, nics: list[str | None] | None,
                  secrets_path: str | None, omp_threads: int | None = None) -> dict[str, str]:
    """The per-run env file: allow-listed variables plus what the launcher decides."""
    env = dict(sel.plain)
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
        if omp_threads and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(omp_threads)
    if nics and all(nics):
        if len(set(nics)) == 1:
            env.setdefault("NCCL_SOCKET_IFNAME", nics[0])  # type: ignore[arg-type]
            env.setdefault("GLOO_SOCKET_IFNAME", nics[0])  # type: ignore[arg-type]
        else:  # per node, by node rank; rankexec picks its own
            env["CLUSTERTUNE_NODE_NICS"] = ",".join(nics)  # type: ignore[arg-type]
    env["CLUSTERTUNE_RUN_ID"] = run_id
    if secrets_path:
        env["CLUSTERTUNE_SECRETS_FILE"] = secrets_path
    env.setdefault("PYTHONUNBUFFERED", "1")
    for name, value in env.items():
        if is_secret_name(name):
            raise LaunchError(f"internal: secret-like variable {name} in the env file")
        if not SAFE_VALUE_RE.match(value) or "\n" in value:
            raise LaunchError(f"{name}={value!r} would be interpreted by a remote shell")
    return env


def env_file_text(env: Mapping[str, str]) -> str:
    """DeepSpeed's DS_ENV_FILE format: bare NAME=VALUE lines, no comments or blank lines."""
    return "".join(f"{k}={v}\n" for k, v in env.items())


def check_safe_path(path: str, what: str) -> str:
    if not SAFE_PATH_RE.match(path):
        raise LaunchError(f"{what} {path!r} contains characters that a remote shell would interpret (spaces, "
                          "quotes, $, ;, ...); the launcher puts it on each node's command line, so use a path "
                          "made of letters, digits and _@%+=:,./-")
    return path


# -------------------------------------------------------------------------------- run files

@dataclass(frozen=True)
class RunFiles:
    run_dir: Path

    @property
    def launch_dir(self) -> Path:
        return self.run_dir / "launch"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def recipe(self) -> Path:
        return self.launch_dir / "recipe.toml"

    @property
    def env(self) -> Path:
        return self.launch_dir / "run.env"

    @property
    def secrets(self) -> Path:
        return self.launch_dir / "secrets.env"

    @property
    def hostfile(self) -> Path:
        return self.launch_dir / "hostfile"

    @property
    def sbatch(self) -> Path:
        return self.launch_dir / "job.sbatch"

    @property
    def info(self) -> Path:
        return self.launch_dir / "run.json"


def resolve_recipe(recipe: Any, workdir: str, *, cpu: bool) -> Any:
    """The recipe every rank reads: paths made absolute (relative ones meant the launch
    directory), output_dir absolute, and train.device = cpu on a CPU cluster."""
    def absolute(p: str) -> str:
        full = os.path.abspath(os.path.join(workdir, os.path.expanduser(p)))
        return full if os.path.exists(full) else p

    updates: dict[str, Any] = {
        "run": recipe.run.model_copy(
            update={"output_dir": os.path.abspath(os.path.join(workdir, recipe.run.output_dir))}),
        "model": recipe.model.model_copy(update={"path": absolute(recipe.model.path),
                                                 **({"tokenizer": absolute(recipe.model.tokenizer)}
                                                    if recipe.model.tokenizer else {})}),
        "data": recipe.data.model_copy(update={
            "train_files": [absolute(p) for p in recipe.data.train_files],
            "eval_files": [absolute(p) for p in recipe.data.eval_files],
            **({"cache_dir": os.path.abspath(os.path.join(workdir, recipe.data.cache_dir))}
               if recipe.data.cache_dir else {})}),
    }
    if cpu and recipe.train.device != "cpu":
        updates["train"] = recipe.train.model_copy(update={"device": "cpu"})
    return recipe.model_copy(update=updates)


# ------------------------------------------------------------------------- launcher commands

WORKER_WRAPPER = "clustertune.cluster.rankexec"


def deepspeed_command(*, python: str, hostfile: str, master_addr: str, master_port: int, env_file: str,
                      recipe: str, resume: bool, force_multi: bool) -> list[str]:
    cmd = [python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--master_addr", master_addr,
           "--master_port", str(master_port), "--launcher", "pdsh", "--no_ssh_check", "--no_local_rank",
           "--module"]
    if force_multi:
        cmd.append("--force_multi")
    cmd += [WORKER_WRAPPER, "--env-file", env_file, recipe]
    return cmd + (["--resume"] if resume else [])


def runner_env(environ: Mapping[str, str], run_env: Mapping[str, str], *, env_file: str,
               ssh_config: str | None) -> dict[str, str]:
    """Minimal environment for DeepSpeed's runner: what it needs, never the user's secrets.
    DS_ENV_FILE makes it export exactly this run's env file to the nodes.

    CLUSTERTUNE_RUN_ID is left out on purpose: the processes that carry it are the ones a stop
    sends SIGTERM to, and the runner must never get SIGTERM (its handler runs `pkill -f` on every
    node); it and its pdsh/ssh children are SIGKILLed as a process group instead."""
    env = {k: environ[k] for k in ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM") if k in environ}
    env.update({k: v for k, v in run_env.items() if k != "CLUSTERTUNE_RUN_ID"})
    env["DS_ENV_FILE"] = env_file
    if ssh_config is not None:
        env["PDSH_RCMD_TYPE"] = "ssh"
        env["PDSH_SSH_ARGS_APPEND"] = f"-F {check_safe_path(ssh_config, 'the cluster ssh config path')}"
    for name in env:
        assert not is_secret_name(name), name
    return env


def _sh(parts: list[str]) -> str:
    return " ".join(shlex.quote(p) for p in parts)


def torchrun_command(*, python: str, nnodes: int, nproc: int, node_rank: int | str, master_addr: str,
                     master_port: int | str, rdzv_id: str, env_file: str, recipe: str, resume: bool,
                     static: bool = True) -> list[str]:
    cmd = [python, "-u", "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}"]
    if static:
        cmd += [f"--node-rank={node_rank}", "--rdzv-backend=static", f"--master-addr={master_addr}",
                f"--master-port={master_port}"]
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{master_port}", f"--rdzv-id={rdzv_id}"]
    cmd += ["--max-restarts=0", "-m", WORKER_WRAPPER, "--env-file", env_file, recipe]
    return cmd + (["--resume"] if resume else [])


def torchrun_node_script(*, workdir: str, run_id: str, command: list[str]) -> str:
    """The remote shell text for one node: every piece quoted; no value of the environment file
    appears here (rankexec reads it), only the run id that marks the run's processes."""
    return f"cd {shlex.quote(workdir)} && CLUSTERTUNE_RUN_ID={shlex.quote(run_id)} exec {_sh(command)}"


def slurm_script(*, cluster: Cluster, python: str, workdir: str, run_name: str, run_id: str, env_file: str,
                 recipe: str, resume: bool, logs_dir: str) -> str:
    slots = {n.slots for n in cluster.nodes}
    if len(slots) != 1:
        raise LaunchError("--launcher slurm needs the same slots on every node (Slurm allocates N nodes alike); "
                          f"the cluster file has {sorted(slots)}")
    nproc = slots.pop()
    job = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)[:64] or "clustertune"
    # Shell variables that srun's batch shell expands are left in double quotes; the rest is quoted.
    trun = (_sh([python, "-u", "-m", "torch.distributed.run"]) + ' --nnodes="$SLURM_NNODES"'
            + f" --nproc-per-node={nproc} --rdzv-backend=c10d"
            + f' --rdzv-endpoint="$MASTER_ADDR:{cluster.master_port}" --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 '
            + _sh(["-m", WORKER_WRAPPER, "--env-file", env_file, recipe] + (["--resume"] if resume else [])))
    lines = [
        "#!/bin/bash",
        f"# Generated by `clustertune launch --launcher slurm` (run id {run_id}). Submit with: sbatch THIS_FILE",
        "# The run directory must be on a filesystem shared by the nodes (recipe, env and secrets files).",
        f"#SBATCH --job-name={job}",
        f"#SBATCH --nodes={len(cluster.nodes)}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if cluster.accelerator == "gpu":
        lines.append(f"#SBATCH --gpus-per-node={nproc}")
    lines += [
        f"#SBATCH --output={logs_dir}/slurm-%j.out",
        "set -euo pipefail",
        f"cd {shlex.quote(workdir)}",
        f"export CLUSTERTUNE_RUN_ID={shlex.quote(run_id)}",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "# one torchrun per node; --kill-on-bad-exit stops every node when one rank fails",
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --label \\",
        "    " + trun,
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ output routing

_PDSH_LINE = re.compile(r"^(?P<node>[A-Za-z0-9][A-Za-z0-9_.-]*): (?P<rest>.*)$")
_PDSH_EXIT = re.compile(r"^pdsh@[^:]*: (?P<node>[^:]+): ssh exited with exit code (?P<code>\d+)")
_RANK = re.compile(r"^\[rank (?P<rank>\d+)\] (?P<rest>.*)$")
_DS_INFO = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[INFO\] ")
_EXIT = re.compile(EXIT_TAG + r" rank=(?P<rank>\d+) node=\S+ code=(?P<code>-?\d+)")


class OutputRouter:
    """Prefixes, saves per node, masks secrets, and notices failures in the merged stream."""

    def __init__(self, node_names: list[str], logs_dir: Path, secret_values: list[str], *,
                 default_node: str | None = None, echo: Callable[[str], None] | None = None,
                 monitor: StallMonitor | None = None):
        self.nodes = set(node_names)
        self.monitor = monitor  # heartbeats (clustertune.watchdog) go here, not to the logs
        self.stopping = False  # set once the run is being stopped: later exits are consequences
        self.default_node = default_node
        self.logs_dir = logs_dir
        logs_dir.mkdir(parents=True, exist_ok=True)
        self.files = {n: open(logs_dir / f"{n}.log", "a", encoding="utf-8") for n in node_names}
        self.files["launcher"] = open(logs_dir / "launcher.log", "a", encoding="utf-8")
        self.secrets = sorted((s for s in secret_values if len(s) >= 4), key=len, reverse=True)
        self.echo = echo or (lambda s: print(s, flush=True))
        self.width = max([len(n) for n in node_names] + [8])
        self.rank_exit: dict[int, int] = {}
        self.rank_node: dict[int, str] = {}
        self.failure: str | None = None
        self.failed_code: int | None = None
        self.failure_is_signal = False
        self.event = threading.Event()
        self.lock = threading.Lock()

    def mask(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def feed(self, line: str, node: str | None = None) -> None:
        line = self.mask(line.rstrip("\r\n"))
        m = _PDSH_EXIT.match(line)
        if m and m["node"] in self.nodes and int(m["code"]) != 0:
            self._fail(f"node {m['node']}: launcher exited with code {m['code']}", int(m["code"]))
        if node is None:
            m = _PDSH_LINE.match(line)
            if m and m["node"] in self.nodes:
                node, line = m["node"], m["rest"]
            else:
                node = self.default_node
        rank = None
        body = line
        m = _RANK.match(line)
        if m and node is not None:
            rank, body = int(m["rank"]), m["rest"]
            self.rank_node[rank] = node
            beat = parse_heartbeat(body)
            if beat is not None:
                if self.monitor is not None:
                    self.monitor.record(beat[0], node, beat[1], beat[2])
                return
            e = _EXIT.search(body)
            if e:
                code = int(e["code"])
                self.rank_exit[rank] = code
                if self.monitor is not None:
                    self.monitor.exited(rank)
                if code < 0:
                    try:
                        how = f"was killed by {signal.Signals(-code).name}"
                    except ValueError:
                        how = f"was killed by signal {-code}"
                    self._fail(f"rank {rank} on {node} {how} (exit code {code})", code, signal_death=True)
                elif code != 0:
                    self._fail(f"rank {rank} on {node} exited with code {code}", code)
        if "\r" in body:  # progress bars redraw with \r: keep the latest state only
            body = next((seg for seg in reversed(body.split("\r")) if seg.strip()), "")
        label = node if node is not None else "launcher"
        tag = f"{label} r{rank}" if rank is not None else label
        with self.lock:
            handle = self.files.get(label, self.files["launcher"])
            handle.write((f"[rank {rank}] {body}" if rank is not None else body) + "\n")
            handle.flush()
            if rank is not None or not _DS_INFO.match(body):  # DeepSpeed's INFO chatter: logs only
                self.echo(f"{tag.ljust(self.width + 4)} | {body}")

    def _fail(self, why: str, code: int, signal_death: bool = False) -> None:
        # The first failure names the cause; a rank killed by a signal (before we stop the run)
        # outranks a peer that merely exited with an error because that rank vanished.
        upgrade = signal_death and not self.failure_is_signal and not self.stopping
        if self.failure is None or upgrade:
            self.failure, self.failed_code, self.failure_is_signal = why, code, signal_death
        self.event.set()

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def _pump(stream, router: OutputRouter, node: str | None) -> None:
    for raw in iter(stream.readline, b""):
        router.feed(raw.decode("utf-8", "replace"), node)
    stream.close()


# ----------------------------------------------------------------------------------- the run

@dataclass
class Launch:
    cluster: Cluster
    local: bool  # the implicit localhost cluster: no ssh at all
    files: RunFiles
    run_id: str
    workdir: str
    python: str
    ssh_config: Path | None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def targets(self):
        from clustertune.cluster.remote import LocalTarget, SshTarget
        if self.local or self.ssh_config is None:
            return {n.name: LocalTarget(n.name) for n in self.cluster.nodes}
        return {n.name: SshTarget(self.ssh_config, n.name) for n in self.cluster.nodes}

    def on_every_node(self, command: str, args: dict, timeout: float = 60) -> dict:
        from clustertune.cluster.remote import parallel, run_snippet
        targets = self.targets()
        if self.local:
            targets = dict(list(targets.items())[:1])
        names = list(targets)
        answers = parallel(lambda n: run_snippet(targets[n], command, args, timeout=timeout), names)
        return dict(zip(names, answers, strict=True))

    def stop(self, why: str) -> None:
        """Stop every process of this run on every node, and nothing else. A second Ctrl-C while
        this runs (bounded: TERM, 5 s grace, KILL) is ignored, so the cleanup is not cut short."""
        print(f"clustertune: stopping run {self.run_id} on every node: {why}", file=sys.stderr, flush=True)
        main = threading.current_thread() is threading.main_thread()
        saved = [(sig, signal.signal(sig, signal.SIG_IGN)) for sig in (signal.SIGINT, signal.SIGTERM)] if main else []
        try:
            results = self.on_every_node("kill_run", {"run_id": self.run_id, "grace": 5}, timeout=40)
            for name, res in results.items():
                if not res.ok:
                    print(f"clustertune: could not stop processes on {name}: {res.error}", file=sys.stderr,
                          flush=True)
            self.kill_local()
        finally:
            for sig, handler in saved:
                signal.signal(sig, handler)

    def kill_local(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # never SIGINT/SIGTERM: DeepSpeed's handler pkills by name
                except ProcessLookupError:
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def sweep(self) -> int:
        """After the run: nothing of it may survive on any node. Returns how many were left."""
        results = self.on_every_node("kill_run", {"run_id": self.run_id, "grace": 3}, timeout=40)
        left = sum(len(r.get("terminated", [])) for r in results.values() if r.ok)
        if left:
            print(f"clustertune: stopped {left} leftover process(es) of run {self.run_id}", file=sys.stderr)
        return left


def stop_run(cluster: Cluster, run_dir: Path) -> int:
    """`clustertune cluster stop RUN_DIR`: stop the run recorded in RUN_DIR/launch/run.json on
    every node of the cluster (the processes carrying its run id), e.g. after the launcher died."""
    from clustertune.cluster.ssh import ClusterPaths
    files = RunFiles(run_dir)
    try:
        info = json.loads(files.info.read_text())
    except (OSError, ValueError) as err:
        raise LaunchError(f"{files.info}: cannot read the run's id ({err})") from None
    local = info.get("cluster") == "localhost"
    launch = Launch(cluster, local, files, info["run_id"], os.getcwd(), sys.executable,
                    None if local else ClusterPaths.for_cluster(cluster).ssh_config)
    results = launch.on_every_node("kill_run", {"run_id": info["run_id"], "grace": 5}, timeout=40)
    code = 0
    for name, res in results.items():
        if res.ok:
            print(f"{name}: stopped {len(res.get('terminated', []))} process(es) of run {info['run_id']}")
        else:
            print(f"{name}: could not stop: {res.error}", file=sys.stderr)
            code = 1
    return code


def _supervise(launch: Launch, router: OutputRouter, pumps: list[threading.Thread], expected_ranks: int) -> int:
    interrupted = False
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, _frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        while any(p.poll() is None for p in launch.procs):
            if router.event.wait(0.2):
                break
            stuck = router.monitor.check() if router.monitor is not None else None
            if stuck:
                router._fail(stuck, STALL_EXIT_CODE)
                break
            bad = [p.returncode for p in launch.procs if p.poll() not in (None, 0)]
            if bad:
                router._fail(f"a launcher process exited with code {bad[0]}", bad[0])
                break
        if router.failure:
            # A peer's error exit often arrives just before the exit of the rank that died
            # (SIGKILL, OOM kill): give that a moment, so the report names the first to die.
            settle = time.monotonic() + 2
            while (not router.failure_is_signal and router.failed_code != STALL_EXIT_CODE
                   and time.monotonic() < settle):
                time.sleep(0.1)
            router.stopping = True
            launch.stop(router.failure)
    except KeyboardInterrupt:
        interrupted = True
        launch.stop("interrupted (Ctrl-C / SIGTERM)")
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    for t in pumps:
        t.join(timeout=10)
    launch.kill_local()
    launch.sweep()
    if interrupted:
        return 130
    if router.failure:
        print(f"clustertune: run failed: {router.failure}", file=sys.stderr)
        code = router.failed_code or 1
        return code if 0 < code < 256 else 1
    codes = [p.returncode for p in launch.procs]
    if any(codes):
        return next(c for c in codes if c) if all(0 < c < 256 for c in codes if c) else 1
    missing = sorted(set(range(expected_ranks)) - set(router.rank_exit))
    if missing:
        print(f"clustertune: rank(s) {missing} never reported their exit; treating the run as failed",
              file=sys.stderr)
        return 1
    return 0


def _stage(launch: Launch, files: list[tuple[Path, str, int]], remove: list[str] = ()) -> None:
    if launch.local:
        return
    payload = {"files": [{"path": str(p), "content": c, "mode": m} for p, c, m in files], "remove": list(remove)}
    results = launch.on_every_node("stage", payload, timeout=60)
    bad = {n: r.error for n, r in results.items() if not r.ok}
    if bad:
        raise LaunchError("could not copy the run files to: " + "; ".join(f"{n}: {e}" for n, e in bad.items()))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cmd_launch(args: argparse.Namespace) -> int:
    from clustertune.config import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    launcher = args.launcher
    workdir = os.getcwd()
    python = sys.executable
    if args.cluster:
        cluster = load_cluster(args.cluster)
        local = False
    else:
        gpus = local_gpu_count() if recipe.train.device != "cpu" else 0
        cluster = localhost_cluster(gpus or 2, "gpu" if gpus else "cpu", master_port=free_port())
        local = True
    return _launch(recipe, cluster, local=local, launcher=launcher, resume=args.resume,
                   skip_doctor=args.skip_doctor, workdir=workdir, python=python)


def _launch(recipe: Any, cluster: Cluster, *, local: bool, launcher: str, resume: bool, skip_doctor: bool,
            workdir: str, python: str) -> int:
    from clustertune.cluster.ssh import ClusterPaths
    cpu = cluster.accelerator == "cpu" or recipe.train.device == "cpu"
    recipe = resolve_recipe(recipe, workdir, cpu=cpu)
    files = RunFiles(Path(recipe.run.output_dir))
    run_id = uuid.uuid4().hex[:16]
    ssh_config = None if local else ClusterPaths.for_cluster(cluster).ssh_config
    if launcher != "slurm":
        for path, what in ((python, "the Python interpreter"), (workdir, "the working directory"),
                           (str(files.run_dir), "run.output_dir")):
            check_safe_path(path, what)
    if ssh_config is not None and launcher != "slurm" and not ssh_config.exists():
        raise LaunchError(f"no ssh config for cluster {cluster.name!r} ({ssh_config}): run "
                          f"`clustertune cluster ssh --cluster ...` first")

    data_files = [*recipe.data.train_files, *recipe.data.eval_files]
    if local or all(Path(f).is_file() for f in data_files):
        check_data_before_start(recipe)
    else:
        print("note: the data files are not all on this machine; the doctor checks they exist on every node "
              "and the workers validate them", file=sys.stderr)

    sel = select_env(os.environ, recipe.run.env_passthrough)
    for note in sel.skipped:
        print(f"note: {note}", file=sys.stderr)

    nics: list[str | None] | None = [n.nic for n in cluster.ordered_nodes()]
    omp = None
    if launcher != "slurm" and not skip_doctor:
        from clustertune.cluster.doctor import run_doctor
        report = run_doctor(cluster, recipe=recipe, mutual=False, need_pdsh=launcher == "deepspeed" and not local,
                            local=local, python=python, workdir=workdir)
        print(report.render(), flush=True)
        if not report.ok:
            print("error: pre-flight checks failed; nothing was started (fix the problems above, or "
                  "--skip-doctor to launch anyway)", file=sys.stderr)
            return 2
        nics = [report.nic_by_node.get(n.name) for n in cluster.ordered_nodes()]
    if local:
        nics = None  # one machine: gloo/NCCL find loopback themselves
    if cpu:
        omp = max(1, (os.cpu_count() or 2) // max(n.slots for n in cluster.nodes)) if local else None

    files.launch_dir.mkdir(parents=True, exist_ok=True)
    files.logs_dir.mkdir(parents=True, exist_ok=True)
    for stale in files.logs_dir.glob("*.log"):
        stale.unlink()
    files.secrets.unlink(missing_ok=True)
    secrets_path = None
    if sel.secrets:
        write_secrets_file(files.secrets, sel.secrets)
        secrets_path = str(files.secrets)
    run_env = build_run_env(sel, run_id=run_id, cpu=cpu, nics=nics, secrets_path=secrets_path, omp_threads=omp)
    run_env.update(node_env.encode([n.env for n in cluster.ordered_nodes()]))  # each node's [nodes.env]
    from clustertune.config import recipe_to_toml
    _write(files.recipe, recipe_to_toml(recipe))
    _write(files.env, env_file_text(run_env))
    _write(files.hostfile, hostfile_text(cluster))
    _write(files.launch_dir / "cluster.toml", cluster_to_toml(cluster))  # the run describes its cluster
    info = {"run_id": run_id, "launcher": launcher, "cluster": cluster.name,
            "nodes": [n.name for n in cluster.ordered_nodes()],
            "world_size": cluster.world_size, "master": f"{cluster.rendezvous_addr}:{cluster.master_port}",
            "started": time.time(), "env_names": sorted(run_env), "secret_names": sorted(sel.secrets)}
    _write(files.info, json.dumps(info, indent=2) + "\n")

    if launcher == "slurm":
        script = slurm_script(cluster=cluster, python=python, workdir=workdir, run_name=recipe.run.name,
                              run_id=run_id, env_file=str(files.env), recipe=str(files.recipe), resume=resume,
                              logs_dir=str(files.logs_dir))
        _write(files.sbatch, script)
        print(f"wrote {files.sbatch}\nsubmit it with: sbatch {files.sbatch}")
        if sel.secrets:
            print(f"note: {files.secrets} (0600) holds {', '.join(sorted(sel.secrets))} for the job; delete it "
                  "once the job has started")
        return 0

    launch = Launch(cluster, local, files, run_id, workdir, python, ssh_config)
    secret_files = [(files.secrets, files.secrets.read_text(), 0o600)] if sel.secrets else []
    _stage(launch, [(files.recipe, files.recipe.read_text(), 0o644), (files.env, files.env.read_text(), 0o644),
                    *secret_files])
    names = [n.name for n in cluster.ordered_nodes()]
    router = OutputRouter(names, files.logs_dir, list(sel.secrets.values()),
                          default_node=names[0] if local else None,
                          monitor=StallMonitor(recipe.run.stall_timeout_s))
    print(f"clustertune: run {run_id}: {cluster.world_size} rank(s) on {len(names)} node(s) "
          f"({', '.join(names)}), master {cluster.rendezvous_addr}:{cluster.master_port}, launcher {launcher}; "
          f"logs in {files.logs_dir}", flush=True)
    pumps: list[threading.Thread] = []
    try:
        if launcher == "deepspeed":
            cmd = deepspeed_command(python=python, hostfile=str(files.hostfile), master_addr=cluster.rendezvous_addr,
                                    master_port=cluster.master_port, env_file=str(files.env),
                                    recipe=str(files.recipe), resume=resume, force_multi=not local)
            env = runner_env(os.environ, run_env, env_file=str(files.env),
                             ssh_config=None if local else str(ssh_config))
            (files.launch_dir / "command.txt").write_text(_sh(cmd) + "\n")
            proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            launch.procs.append(proc)
            pumps.append(threading.Thread(target=_pump, args=(proc.stdout, router, None), daemon=True))
        else:  # torchrun: one ssh (or local shell) per node
            ordered = cluster.ordered_nodes()
            scripts = []
            for rank, node in enumerate(ordered):
                cmd = torchrun_command(python=python, nnodes=len(ordered), nproc=node.slots, node_rank=rank,
                                       master_addr=cluster.rendezvous_addr, master_port=cluster.master_port,
                                       rdzv_id=run_id, env_file=str(files.env), recipe=str(files.recipe),
                                       resume=resume)
                script = torchrun_node_script(workdir=workdir, run_id=run_id, command=cmd)
                scripts.append(f"# {node.name}\n{script}\n")
                argv = ["sh", "-c", script] if local else ["ssh", "-F", str(ssh_config), node.name, script]
                proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        env=runner_env(os.environ, run_env, env_file=str(files.env), ssh_config=None))
                launch.procs.append(proc)
                pumps.append(threading.Thread(target=_pump, args=(proc.stdout, router, node.name), daemon=True))
            (files.launch_dir / "command.txt").write_text("".join(scripts))
        for t in pumps:
            t.start()
        code = _supervise(launch, router, pumps, cluster.world_size)
    finally:
        router.close()
        if sel.secrets:
            files.secrets.unlink(missing_ok=True)
            try:
                _stage(launch, [], remove=[str(files.secrets)])
            except LaunchError as err:
                print(f"warning: {err}", file=sys.stderr)
    for name in names:
        ranks = sorted(r for r, n in router.rank_node.items() if n == name)
        ok = [r for r in ranks if router.rank_exit.get(r) == 0]
        print(f"  {name}: ranks {ranks or '-'}: {len(ok)}/{len(ranks)} finished ok; "
              f"log {files.logs_dir / (name + '.log')}")
    print(f"clustertune: run {run_id} {'finished' if code == 0 else f'FAILED (exit code {code})'}", flush=True)
    return code
