"""`clustertune launch` (and `clustertune train`): one training run, planned here, then executed by
clustertune.supervisor.

    clustertune launch RECIPE --cluster cluster.toml [--launcher deepspeed|torchrun|slurm] [--resume]
    clustertune launch RECIPE                         # no cluster file: this machine, same path
    clustertune train RECIPE [--nproc N]              # this machine, the `local` launcher

A launch is first a `LaunchPlan`, a value built by `build_launch_plan` without side effects (env
file, secrets, run files, the processes to start, per launcher), then `supervisor.run_plan(plan)`.

deepspeed (default): the doctor's fast checks, then DeepSpeed's own launcher
    python -m deepspeed.launcher.runner --hostfile RUN/launch/hostfile --master_addr A --master_port P
        --launcher pdsh --force_multi --no_ssh_check --no_local_rank --module
        clustertune.cluster.rankexec --env-file RUN/launch/run.env RUN/launch/recipe.toml [--resume]
  with pdsh using the per-cluster ssh config (PDSH_SSH_ARGS_APPEND="-F <ssh_config>").
torchrun: one `ssh NODE 'cd WORKDIR && ... torch.distributed.run --nnodes --node-rank ...'` per node.
slurm: writes RUN/launch/job.sbatch (srun + torchrun) for `sbatch`; nothing runs here.
local (`train`): the supervisor starts `python -m clustertune.cluster.rankexec ...` per rank itself,
  rank 0 with --raw-stderr so its live progress bar reaches the terminal.

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

Output: each line is shown as `node1 r0 | text` (train: `[rank 0] text`) and saved in
RUN/logs/<node>.log and RUN/logs/rank<N>.log (launcher lines in RUN/logs/launcher.log), with known
secret values masked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from clustertune import contract
from clustertune.cluster import node_env
from clustertune.cluster.inventory import (Cluster, cluster_to_toml, hostfile_text, load_cluster,
                                          localhost_cluster)
from clustertune.contract import env_file_text
from clustertune.config import check_zero_topology
from clustertune.errors import UserError
from clustertune.secrets import is_secret_name, secret_env, secrets_file_text
from clustertune.gpus import local_gpu_count
from clustertune.supervisor import RunProcesses, check_data_before_start, free_port, run_plan

# ------------------------------------------------------------------------------- environment

# Forwarded to every rank when set in the launching shell (plus recipe run.env_passthrough).
# The same list for every launch, `clustertune train` on one machine included.
ALLOW_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "PYTORCH_", "CUDA_", "OMP_", "MKL_",
                  "KMP_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "DS_", "CLUSTERTUNE_", "WANDB_")
ALLOW_NAMES = frozenset({"PYTHONPATH", "TMPDIR", "TZ", "XDG_CACHE_HOME"})
# Decided per node by the launcher itself, never copied from the launching shell.
DENY_NAMES = frozenset({"CUDA_VISIBLE_DEVICES", "DS_ENV_FILE", contract.RUN_ID_ENV, contract.SECRETS_FILE_ENV,
                        contract.NODE_NICS_ENV, contract.LOCAL_RANK, contract.RANK, contract.WORLD_SIZE,
                        contract.LOCAL_WORLD_SIZE, contract.MASTER_ADDR, contract.MASTER_PORT,
                        # each node's own checkpoint directory (no shared filesystem), set on that node
                        contract.NODE_LOCAL_DIR_ENV})
# What the processes started here (DeepSpeed's runner, ssh, the ranks of `train`) get from the
# launching session besides the env file: enough to run the same Python, nothing else.
SESSION_NAMES = ("PATH", "LD_LIBRARY_PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM")
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
            env[contract.NODE_NICS_ENV] = ",".join(nics)  # type: ignore[arg-type]
    env[contract.RUN_ID_ENV] = run_id
    if secrets_path:
        env[contract.SECRETS_FILE_ENV] = secrets_path
    env.setdefault("PYTHONUNBUFFERED", "1")
    for name, value in env.items():
        if is_secret_name(name):
            raise LaunchError(f"internal: secret-like variable {name} in the env file")
        if not SAFE_VALUE_RE.match(value) or "\n" in value:
            raise LaunchError(f"{name}={value!r} would be interpreted by a remote shell")
    return env


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
    def command(self) -> Path:
        return self.launch_dir / "command.txt"

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
        "data": recipe.data.with_paths(absolute).model_copy(update={
            **({"cache_dir": os.path.abspath(os.path.join(workdir, recipe.data.cache_dir))}
               if recipe.data.cache_dir else {})}),
    }
    if cpu and recipe.train.device != "cpu":
        updates["train"] = recipe.train.model_copy(update={"device": "cpu"})
    return recipe.model_copy(update=updates)


# ------------------------------------------------------------------------- launcher commands

WORKER_WRAPPER = contract.RANK_WRAPPER_MODULE


def deepspeed_command(*, python: str, hostfile: str, master_addr: str, master_port: int, env_file: str,
                      recipe: str, resume: bool, force_multi: bool) -> list[str]:
    cmd = [python, "-u", "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--master_addr", master_addr,
           "--master_port", str(master_port), "--launcher", "pdsh", "--no_ssh_check", "--no_local_rank",
           "--module"]
    if force_multi:
        cmd.append("--force_multi")
    cmd += [WORKER_WRAPPER, "--env-file", env_file, recipe]
    return cmd + (["--resume"] if resume else [])


def rank_command(*, python: str, env_file: str, recipe: str, resume: bool, raw_stderr: bool) -> list[str]:
    """One rank's wrapper, started by our own supervisor (the `local` launcher)."""
    cmd = [python, "-u", "-m", WORKER_WRAPPER, "--env-file", env_file] + (["--raw-stderr"] if raw_stderr else [])
    return cmd + [recipe] + (["--resume"] if resume else [])


def runner_env(environ: Mapping[str, str], run_env: Mapping[str, str], *, env_file: str,
               ssh_config: str | None) -> dict[str, str]:
    """Minimal environment for DeepSpeed's runner: what it needs, never the user's secrets.
    DS_ENV_FILE makes it export exactly this run's env file to the nodes.

    CLUSTERTUNE_RUN_ID is left out on purpose: the processes that carry it are the ones a stop
    sends SIGTERM to, and the runner must never get SIGTERM (its handler runs `pkill -f` on every
    node); it and its pdsh/ssh children are SIGKILLed as a process group instead."""
    env = {k: environ[k] for k in SESSION_NAMES if k in environ}
    env.update({k: v for k, v in run_env.items() if k != contract.RUN_ID_ENV})
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
    return f"cd {shlex.quote(workdir)} && {contract.RUN_ID_ENV}={shlex.quote(run_id)} exec {_sh(command)}"


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
        f"export {contract.RUN_ID_ENV}={shlex.quote(run_id)}",
        'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "# one torchrun per node; --kill-on-bad-exit stops every node when one rank fails",
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 --label \\",
        "    " + trun,
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the launch plan

@dataclass(frozen=True)
class LaunchProcess:
    """One process the supervisor starts on this machine: a launcher (DeepSpeed's runner, one
    ssh per node for torchrun) or, with the `local` launcher, one rank."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    # The node whose output this stream carries; None: DeepSpeed's runner over pdsh, whose lines
    # carry the node as pdsh's `node: ` prefix.
    node: str | None
    rank: int | None = None  # set when the process is one rank
    raw_stderr: bool = False  # its stderr (the progress bar) goes to the terminal as it comes


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch writes and starts, decided before anything runs (a pure value).
    `clustertune.supervisor.run_plan` executes it."""

    run_id: str
    launcher: str
    cluster: Cluster
    local: bool  # one machine, no ssh
    files: RunFiles
    workdir: str
    ssh_config: Path | None
    recipe_text: str
    run_env: dict[str, str]  # the env file: allow-listed, non-secret, shell-inert values
    secrets: dict[str, str]  # go to the 0600 secrets file only
    notes: tuple[str, ...]  # for the user: variables not forwarded, and why (never values)
    info: dict[str, Any]  # run.json (the start time is added when it runs)
    processes: tuple[LaunchProcess, ...]
    command_text: str  # command.txt: what was started, for the user to read
    sbatch_text: str | None = None  # slurm: the job script, and nothing is started here
    console: str = "node"  # "node": `node1 r0 | text` on stdout; "rank": `[rank 0] text` on stderr (train)
    stall_timeout_s: float = 0.0

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.cluster.ordered_nodes()]

    @property
    def env_file_text(self) -> str:
        return env_file_text(self.run_env)

    def run_files(self) -> list[tuple[Path, str]]:
        """(path, text) of RUN/launch/*, written here; the secrets file is written apart (0600)."""
        files = self.files
        out = [(files.recipe, self.recipe_text), (files.env, self.env_file_text),
               (files.hostfile, hostfile_text(self.cluster)),
               (files.launch_dir / "cluster.toml", cluster_to_toml(self.cluster))]  # the run describes its cluster
        if self.command_text:
            out.append((files.command, self.command_text))
        if self.sbatch_text is not None:
            out.append((files.sbatch, self.sbatch_text))
        return out

    def staged_files(self) -> list[tuple[Path, str, int]]:
        """What every node needs in its copy of RUN/launch (no shared filesystem is assumed)."""
        out = [(self.files.recipe, self.recipe_text, 0o644), (self.files.env, self.env_file_text, 0o644)]
        if self.secrets:
            out.append((self.files.secrets, secrets_file_text(self.secrets), 0o600))
        return out


LAUNCHERS = ("deepspeed", "torchrun", "slurm", "local")  # local: `clustertune train`, our supervisor starts each rank


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def build_launch_plan(recipe: Any, cluster: Cluster, *, launcher: str, local: bool, resume: bool, run_id: str,
                      environ: Mapping[str, str], nics: list[str | None] | None, workdir: str, python: str,
                      ssh_config: Path | None, cpu_count: int) -> LaunchPlan:
    """The launch of a resolved recipe (see resolve_recipe) on `cluster`, as a value: the env file
    (allow-listed from `environ`), the secrets, the run files, the processes to start. Starts
    nothing and writes nothing; LaunchError when a launch with these inputs cannot work."""
    if launcher not in LAUNCHERS:  # the CLI offers only these: a bug, not a user error
        raise ValueError(f"unknown launcher {launcher!r} (one of {', '.join(LAUNCHERS)})")
    if launcher == "local" and (not local or len(cluster.nodes) != 1):
        raise ValueError("the local launcher starts ranks on this machine only")
    cpu = cluster.accelerator == "cpu" or recipe.train.device == "cpu"
    # ZeRO++'s secondary partition must be one node's GPUs (RecipeError otherwise)
    check_zero_topology(recipe.zero, world_size=cluster.world_size, gpus_per_node=max(n.slots for n in cluster.nodes))
    files = RunFiles(Path(recipe.run.output_dir))
    if launcher in ("deepspeed", "torchrun"):  # their paths pass through a (remote) shell; local's do not
        for path, what in ((python, "the Python interpreter"), (workdir, "the working directory"),
                           (str(files.run_dir), "run.output_dir")):
            check_safe_path(path, what)
    sel = select_env(environ, recipe.run.env_passthrough)
    # One machine: gloo/NCCL find loopback themselves. Two ranks on a small CPU box: split the cores.
    omp = max(1, cpu_count // max(n.slots for n in cluster.nodes)) if cpu and local else None
    run_env = build_run_env(sel, run_id=run_id, cpu=cpu, nics=None if local else nics,
                            secrets_path=str(files.secrets) if sel.secrets else None, omp_threads=omp)
    run_env.update(node_env.encode([n.env for n in cluster.ordered_nodes()]))  # each node's [nodes.env]
    from clustertune.config import recipe_to_toml
    info = {"run_id": run_id, "launcher": launcher, "cluster": cluster.name,
            "nodes": [n.name for n in cluster.ordered_nodes()],
            "world_size": cluster.world_size, "master": f"{cluster.rendezvous_addr}:{cluster.master_port}",
            "env_names": sorted(run_env), "secret_names": sorted(sel.secrets)}
    plan = LaunchPlan(run_id=run_id, launcher=launcher, cluster=cluster, local=local, files=files, workdir=workdir,
                      ssh_config=ssh_config, recipe_text=recipe_to_toml(recipe), run_env=run_env,
                      secrets=sel.secrets, notes=tuple(sel.skipped), info=info, processes=(), command_text="",
                      console="rank" if launcher == "local" else "node",
                      stall_timeout_s=recipe.run.stall_timeout_s)
    how = _LAUNCHER_PLANS[launcher]
    return how(plan, environ=environ, python=python, resume=resume,
               run_name=recipe.run.name)


def _plan_deepspeed(plan: LaunchPlan, *, environ: Mapping[str, str], python: str, resume: bool,
                    **_: Any) -> LaunchPlan:
    """DeepSpeed's runner: pdsh to every node (one machine: its local launch), rankexec per rank."""
    files, cluster = plan.files, plan.cluster
    cmd = deepspeed_command(python=python, hostfile=str(files.hostfile), master_addr=cluster.rendezvous_addr,
                            master_port=cluster.master_port, env_file=str(files.env), recipe=str(files.recipe),
                            resume=resume, force_multi=not plan.local)
    env = runner_env(environ, plan.run_env, env_file=str(files.env),
                     ssh_config=None if plan.local else str(plan.ssh_config))
    proc = LaunchProcess(tuple(cmd), env, node=plan.node_names[0] if plan.local else None)
    return replace(plan, processes=(proc,), command_text=_sh(cmd) + "\n")


def _plan_torchrun(plan: LaunchPlan, *, environ: Mapping[str, str], python: str, resume: bool,
                   **_: Any) -> LaunchPlan:
    """One torchrun per node: through ssh (one machine: a local shell), static rendezvous."""
    files, cluster = plan.files, plan.cluster
    ordered = cluster.ordered_nodes()
    env = runner_env(environ, plan.run_env, env_file=str(files.env), ssh_config=None)
    procs, scripts = [], []
    for node_rank, node in enumerate(ordered):
        cmd = torchrun_command(python=python, nnodes=len(ordered), nproc=node.slots, node_rank=node_rank,
                               master_addr=cluster.rendezvous_addr, master_port=cluster.master_port,
                               rdzv_id=plan.run_id, env_file=str(files.env), recipe=str(files.recipe), resume=resume)
        script = torchrun_node_script(workdir=plan.workdir, run_id=plan.run_id, command=cmd)
        scripts.append(f"# {node.name}\n{script}\n")
        argv = ["sh", "-c", script] if plan.local else ["ssh", "-F", str(plan.ssh_config), node.name, script]
        procs.append(LaunchProcess(tuple(argv), env, node=node.name))
    return replace(plan, processes=tuple(procs), command_text="".join(scripts))


def _plan_slurm(plan: LaunchPlan, *, python: str, resume: bool, run_name: str, **_: Any) -> LaunchPlan:
    """A job script for `sbatch`; nothing starts here."""
    files = plan.files
    script = slurm_script(cluster=plan.cluster, python=python, workdir=plan.workdir, run_name=run_name,
                          run_id=plan.run_id, env_file=str(files.env), recipe=str(files.recipe), resume=resume,
                          logs_dir=str(files.logs_dir))
    return replace(plan, sbatch_text=script)


def _plan_local(plan: LaunchPlan, *, environ: Mapping[str, str], python: str, resume: bool,
                **_: Any) -> LaunchPlan:
    """`clustertune train`: the supervisor starts each rank's wrapper itself, so rank 0's stderr
    (the live progress bar) can reach the terminal as it is drawn."""
    node = plan.cluster.nodes[0]
    world = node.slots
    base = {k: environ[k] for k in SESSION_NAMES if k in environ}
    # The wrapper must import clustertune before it reads the env file: a checkout used through
    # PYTHONPATH (not pip-installed) is found only with it (it broke `train` on the GPU machine).
    if "PYTHONPATH" in environ:
        base["PYTHONPATH"] = environ["PYTHONPATH"]
    if "CUDA_VISIBLE_DEVICES" in environ:  # on one machine the user's choice of GPUs is the decision
        base["CUDA_VISIBLE_DEVICES"] = environ["CUDA_VISIBLE_DEVICES"]
    procs = []
    for rank in range(world):
        env = dict(base)
        env.update({contract.RUN_ID_ENV: plan.run_id, contract.RANK: str(rank), contract.LOCAL_RANK: str(rank),
                    contract.WORLD_SIZE: str(world), contract.LOCAL_WORLD_SIZE: str(world), contract.GROUP_RANK: "0",
                    contract.MASTER_ADDR: plan.cluster.rendezvous_addr,
                    contract.MASTER_PORT: str(plan.cluster.master_port)})
        argv = rank_command(python=python, env_file=str(plan.files.env), recipe=str(plan.files.recipe),
                            resume=resume, raw_stderr=rank == 0)
        procs.append(LaunchProcess(tuple(argv), env, node=node.name, rank=rank, raw_stderr=rank == 0))
    text = "".join(f"RANK={p.rank} {_sh(list(p.argv))}\n" for p in procs)
    return replace(plan, processes=tuple(procs), command_text=text)


_LAUNCHER_PLANS: dict[str, Callable[..., LaunchPlan]] = {
    "deepspeed": _plan_deepspeed, "torchrun": _plan_torchrun, "slurm": _plan_slurm, "local": _plan_local}


# ----------------------------------------------------------------------------------- commands

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
    run = RunProcesses(cluster, local, info["run_id"], None if local else ClusterPaths.for_cluster(cluster).ssh_config)
    results = run.on_every_node("kill_run", {"run_id": info["run_id"], "grace": 5}, timeout=40)
    code = 0
    for name, res in results.items():
        if res.ok:
            print(f"{name}: stopped {len(res.get('terminated', []))} process(es) of run {info['run_id']}")
        else:
            print(f"{name}: could not stop: {res.error}", file=sys.stderr)
            code = 1
    return code


def cmd_launch(args: argparse.Namespace) -> int:
    from clustertune.config import load_recipe
    from clustertune.preflight import check_before_workers, model_on_this_machine, note_cpu_with_gpus
    recipe = load_recipe(args.recipe, args.overrides)
    if args.cluster:
        cluster, local = load_cluster(args.cluster), False
    else:
        gpus = local_gpu_count() if recipe.train.device != "cpu" else 0
        cluster, local = localhost_cluster(gpus or 2, "gpu" if gpus else "cpu", master_port=free_port()), True
        if recipe.train.device == "cpu":
            note_cpu_with_gpus(on_gpu=False, visible_gpus=local_gpu_count(), device="cpu")
    # Model files and batch arithmetic for this cluster's world size, before the doctor or any rank.
    check_before_workers(recipe, world_size=cluster.world_size,
                         world_source=f"{args.cluster}: {len(cluster.nodes)} node(s)" if args.cluster
                         else f"this machine: {cluster.world_size} {cluster.accelerator} rank(s)",
                         model_here=local or model_on_this_machine(recipe.model))
    return launch(recipe, cluster, local=local, launcher=args.launcher, resume=args.resume,
                  skip_doctor=args.skip_doctor)


def launch(recipe: Any, cluster: Cluster, *, local: bool, launcher: str, resume: bool, skip_doctor: bool) -> int:
    """Check what can be checked here (data, then the doctor), build the plan, run it."""
    from clustertune.cluster.ssh import ClusterPaths
    workdir = os.getcwd()
    cpu = cluster.accelerator == "cpu" or recipe.train.device == "cpu"
    recipe = resolve_recipe(recipe, workdir, cpu=cpu)
    ssh_config = None if local else ClusterPaths.for_cluster(cluster).ssh_config
    if ssh_config is not None and launcher != "slurm" and not ssh_config.exists():
        raise LaunchError(f"no ssh config for cluster {cluster.name!r} ({ssh_config}): run "
                          f"`clustertune cluster ssh --cluster ...` first")
    data_files = [*recipe.data.train_paths, *recipe.data.eval_files]
    if local or all(Path(f).exists() for f in data_files):  # a file, or a saved-dataset directory
        check_data_before_start(recipe)
    else:
        print("note: the data files are not all on this machine; the doctor checks they exist on every node "
              "and the workers validate them", file=sys.stderr)
    nics: list[str | None] | None = [n.nic for n in cluster.ordered_nodes()]
    report = None
    if launcher in ("deepspeed", "torchrun") and not skip_doctor:
        from clustertune.cluster.doctor import run_doctor
        report = run_doctor(cluster, recipe=recipe, mutual=False, need_pdsh=launcher == "deepspeed" and not local,
                            local=local, python=sys.executable, workdir=workdir)
        print(report.render(), flush=True)
        if not report.ok:
            print("error: pre-flight checks failed; nothing was started (fix the problems above, or "
                  "--skip-doctor to launch anyway)", file=sys.stderr)
            return 2
        nics = [report.nic_by_node.get(n.name) for n in cluster.ordered_nodes()]
    gpu, unknown = smallest_gpu_memory(report, local=local)
    recipe = resolve_auto_keys(recipe, cpu=cpu, nodes=len(cluster.nodes),
                               gpus_per_node=max(n.slots for n in cluster.nodes), gpu=gpu, unknown=unknown,
                               resume=resume)
    plan = build_launch_plan(recipe, cluster, launcher=launcher, local=local, resume=resume, run_id=new_run_id(),
                             environ=os.environ, nics=nics, workdir=workdir, python=sys.executable,
                             ssh_config=ssh_config, cpu_count=os.cpu_count() or 2)
    return run_plan_with_notes(plan)


def launch_here(recipe: Any, *, nproc: int, on_gpu: bool, resume: bool) -> int:
    """`clustertune train` and the demo: `nproc` ranks on this machine, started by the supervisor
    itself (no doctor: nothing remote to check), rank 0's progress bar on the terminal."""
    check_data_before_start(recipe)
    workdir = os.getcwd()
    recipe = resolve_recipe(recipe, workdir, cpu=not on_gpu)
    gpu, unknown = smallest_gpu_memory(None, local=True) if on_gpu else (None, "")
    recipe = resolve_auto_keys(recipe, cpu=not on_gpu, nodes=1, gpus_per_node=nproc, gpu=gpu, unknown=unknown,
                               resume=resume)
    cluster = localhost_cluster(nproc, "gpu" if on_gpu else "cpu", master_port=free_port())
    plan = build_launch_plan(recipe, cluster, launcher="local", local=True, resume=resume, run_id=new_run_id(),
                             environ=os.environ, nics=None, workdir=workdir, python=sys.executable, ssh_config=None,
                             cpu_count=os.cpu_count() or 2)
    return run_plan_with_notes(plan)


def resolve_auto_keys(recipe: Any, *, cpu: bool, nodes: int, gpus_per_node: int, gpu: tuple[float, str] | None,
                      unknown: str, resume: bool) -> Any:
    """The recipe the ranks get, with its "auto" keys (zero.stage, train.micro_batch_tokens, ...) resolved
    once here (clustertune.auto) and said in one line; `gpu`: (GiB, where from) of the smallest GPU,
    None (`unknown` says why); --resume: the values of the run's first launch (RUN/launch/recipe.toml)."""
    from clustertune.auto import launched_recipe, resolve_auto
    started = launched_recipe(RunFiles(Path(recipe.run.output_dir)).run_dir) if resume else None
    resolved = resolve_auto(recipe, on_gpu=not cpu, gpu_mem_gib=gpu[0] if gpu else None,
                            gpu_source=gpu[1] if gpu else unknown, nodes=nodes, gpus_per_node=gpus_per_node,
                            started_with=started)
    if resolved.note:
        print(resolved.note, file=sys.stderr)
    return resolved.recipe


def smallest_gpu_memory(report: Any, *, local: bool) -> tuple[tuple[float, str] | None, str]:
    """((GiB, where from), "") of the GPU memory to plan for: the smallest GPU the doctor's nvidia-smi
    found on the nodes (`report`, None when it did not run), else on this machine only its first GPU
    (plan_cli.local_gpu_memory, what `plan` uses); (None, why) when nothing says."""
    if report is not None and report.gpu_memory:
        node, (name, gib) = min(report.gpu_memory.items(), key=lambda item: item[1][1])
        return (gib, f"{name}, {gib:.1f} GiB on {node}: the smallest GPU of the nodes (doctor)"), ""
    if local:
        from clustertune.plan_cli import local_gpu_memory
        found = local_gpu_memory()
        return ((found[0], found[1]), "") if found else (None, "nvidia-smi gave no GPU memory on this machine")
    if report is None:
        return None, "the doctor, which reads every node's GPUs, did not run (--skip-doctor or --launcher slurm)"
    return None, "nvidia-smi on the nodes gave no GPU memory"


def run_plan_with_notes(plan: LaunchPlan) -> int:
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    return run_plan(plan)  # a StageError (a node unreachable) is a UserError: cli.main reports it
