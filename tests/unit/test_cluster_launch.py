"""Launcher construction without processes: env allow-list and secret filtering, the DeepSpeed
runner command and environment, torchrun/slurm text, output routing, the rank wrapper's env."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from clustertune.cluster.inventory import cluster_from_dict, load_cluster
from clustertune.cluster.launch import (EnvSelection, LaunchError, build_run_env, check_safe_path, deepspeed_command,
                                        env_file_text, resolve_recipe, runner_env, select_env, slurm_script,
                                        torchrun_command, torchrun_node_script)
from clustertune.supervisor import OutputRouter
from clustertune.cluster.rankexec import child_env, read_env_file
from clustertune.config import recipe_from_dict

CLUSTER = cluster_from_dict({"name": "lab", "master_port": 29600, "nodes": [
    {"name": "gpu1", "address": "10.0.0.1", "user": "root", "slots": 8},
    {"name": "gpu2", "address": "10.0.0.2", "user": "root", "slots": 8}]})

ENV = {
    "PATH": "/usr/bin", "HOME": "/root", "SSH_AUTH_SOCK": "/tmp/agent", "LS_COLORS": "di=01;34",
    "NCCL_DEBUG": "INFO", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "GLOO_SOCKET_IFNAME": "eth0",
    "HF_HOME": "/data/hf", "HF_TOKEN": "hf_secretvalue", "WANDB_API_KEY": "wandbsecret",
    "AWS_SECRET_ACCESS_KEY": "awssecret", "MY_TOKEN": "mytoken", "PYTHONPATH": "/opt/lib",
    "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "4",
    "PROJECT": "x", "TORCH_EVIL": "$(reboot)", "HF_HUB_TOKEN_PATH": "/x",
}


def test_select_env_allow_list_and_secrets():
    sel = select_env(ENV, ["MY_TOKEN", "PROJECT"])
    assert sel.secrets == {"HF_TOKEN": "hf_secretvalue", "MY_TOKEN": "mytoken", "WANDB_API_KEY": "wandbsecret"}
    assert sel.plain == {"NCCL_DEBUG": "INFO", "NCCL_IB_HCA": "mlx5_0,mlx5_1", "GLOO_SOCKET_IFNAME": "eth0",
                         "HF_HOME": "/data/hf", "PYTHONPATH": "/opt/lib", "TOKENIZERS_PARALLELISM": "false",
                         "OMP_NUM_THREADS": "4", "PROJECT": "x"}
    # not forwarded: the shell's own variables, unlisted cloud secrets, per-node decisions, unsafe values
    for name in ("PATH", "HOME", "SSH_AUTH_SOCK", "LS_COLORS", "AWS_SECRET_ACCESS_KEY", "CUDA_VISIBLE_DEVICES",
                 "TORCH_EVIL"):
        assert name not in sel.plain and name not in sel.secrets
    notes = "\n".join(sel.skipped)
    assert "TORCH_EVIL" in notes and "$(reboot)" not in notes and "HF_HUB_TOKEN_PATH" in notes


def test_select_env_refuses_listed_unsafe_value_and_bad_names():
    with pytest.raises(LaunchError, match="PROJECT.*remote shell"):
        select_env({"PROJECT": "a;b"}, ["PROJECT"])
    with pytest.raises(LaunchError, match="not a valid environment variable name"):
        select_env({}, ["A B"])
    assert "NOT_SET" in "\n".join(select_env({}, ["NOT_SET"]).skipped)


def test_run_env_never_holds_secrets():
    sel = select_env(ENV, ["MY_TOKEN"])
    env = build_run_env(sel, run_id="abc123", cpu=True, nics=["eth0", "eth0"], secrets_path="/run/x/secrets.env")
    text = env_file_text(env)
    for secret in ("hf_secretvalue", "wandbsecret", "mytoken", "awssecret"):
        assert secret not in text
    assert env["CLUSTERTUNE_SECRETS_FILE"] == "/run/x/secrets.env" and env["CLUSTERTUNE_RUN_ID"] == "abc123"
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["GLOO_SOCKET_IFNAME"] == "eth0" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    # DeepSpeed's .deepspeed_env parser: every line NAME=VALUE, no blanks/comments
    assert all("=" in line and not line.startswith("#") for line in text.splitlines())
    with pytest.raises(LaunchError):
        build_run_env(EnvSelection(plain={"HF_TOKEN": "x"}), run_id="r", cpu=False, nics=None, secrets_path=None)


def test_run_env_per_node_interfaces():
    env = build_run_env(EnvSelection(), run_id="r", cpu=False, nics=["eth0", "ens5"], secrets_path=None)
    assert env["CLUSTERTUNE_NODE_NICS"] == "eth0,ens5" and "GLOO_SOCKET_IFNAME" not in env
    env = build_run_env(EnvSelection(), run_id="r", cpu=False, nics=[None, "eth0"], secrets_path=None)
    assert "GLOO_SOCKET_IFNAME" not in env and "CLUSTERTUNE_NODE_NICS" not in env


def test_env_values_stay_literal_in_deepspeed_exports():
    """What DeepSpeed's add_export does with our values, then a real shell: no expansion."""
    from deepspeed.launcher.multinode_runner import MultiNodeRunner
    values = {"A": "plain/path:x", "B": "with space", "C": "a=b,c@d%e+f"}
    env = build_run_env(EnvSelection(plain=values), run_id="r", cpu=False, nics=None, secrets_path=None)

    class R(MultiNodeRunner):
        def backend_exists(self): return True
        def get_cmd(self, e, a): return []

    class Args:
        user_args, user_script = [], "x"
    r = R(Args(), "")
    for k, v in env.items():
        r.add_export(k, v)
    script = "".join(f"export {k}={v}; " for k, v in r.exports.items()) + 'printf "%s|%s|%s" "$A" "$B" "$C"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10).stdout
    assert out == "plain/path:x|with space|a=b,c@d%e+f"


def test_deepspeed_command():
    cmd = deepspeed_command(python="/venv/bin/python", hostfile="/r/launch/hostfile", master_addr="10.0.0.1",
                            master_port=29600, env_file="/r/launch/run.env", recipe="/r/launch/recipe.toml",
                            resume=True, force_multi=True)
    assert cmd[:4] == ["/venv/bin/python", "-u", "-m", "deepspeed.launcher.runner"]
    i = cmd.index("clustertune.cluster.rankexec")
    assert cmd[i:] == ["clustertune.cluster.rankexec", "--env-file", "/r/launch/run.env", "/r/launch/recipe.toml",
                       "--resume"]
    flags = cmd[4:i]
    for flag in ("--no_ssh_check", "--no_local_rank", "--module", "--force_multi"):
        assert flag in flags
    assert flags[flags.index("--launcher") + 1] == "pdsh" and flags[flags.index("--master_port") + 1] == "29600"
    # the flags are real: DeepSpeed's own parser accepts them
    from deepspeed.launcher.runner import parse_args
    parsed = parse_args(cmd[4:])
    assert parsed.user_script == "clustertune.cluster.rankexec" and parsed.module and parsed.no_local_rank
    assert parsed.user_args == ["--env-file", "/r/launch/run.env", "/r/launch/recipe.toml", "--resume"]


def test_runner_env_is_minimal():
    run = build_run_env(select_env(ENV), run_id="r1", cpu=True, nics=None, secrets_path="/s")
    env = runner_env(ENV, run, env_file="/r/run.env", ssh_config="/home/me/.clustertune/clusters/lab/ssh_config")
    assert env["DS_ENV_FILE"] == "/r/run.env" and env["PDSH_RCMD_TYPE"] == "ssh"
    assert env["PDSH_SSH_ARGS_APPEND"] == "-F /home/me/.clustertune/clusters/lab/ssh_config"
    assert "CLUSTERTUNE_RUN_ID" not in env  # the runner must never get the stop signal (its handler pkills by name)
    for name in ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "SSH_AUTH_SOCK", "LS_COLORS"):
        assert name not in env
    with pytest.raises(LaunchError, match="remote shell"):
        runner_env(ENV, run, env_file="/r", ssh_config="/home/my dir/ssh_config")


@pytest.mark.parametrize("path", ["/a b", "/a;b", "/a$b", "/a'b", "/a`b`", "/a\nb"])
def test_unsafe_paths_rejected(path):
    with pytest.raises(LaunchError):
        check_safe_path(path, "x")


def test_torchrun_per_node_command():
    cmd = torchrun_command(python="/venv/bin/python", nnodes=2, nproc=8, node_rank=1, master_addr="10.0.0.1",
                           master_port=29600, rdzv_id="run1", env_file="/r/run.env", recipe="/r/recipe.toml",
                           resume=False)
    assert cmd[:4] == ["/venv/bin/python", "-u", "-m", "torch.distributed.run"]
    for part in ("--nnodes=2", "--nproc-per-node=8", "--node-rank=1", "--master-addr=10.0.0.1",
                 "--master-port=29600", "--rdzv-backend=static", "--max-restarts=0"):
        assert part in cmd
    assert cmd[-5:] == ["-m", "clustertune.cluster.rankexec", "--env-file", "/r/run.env", "/r/recipe.toml"]
    script = torchrun_node_script(workdir="/work dir", run_id="run1", command=cmd)
    assert script.startswith("cd '/work dir' && CLUSTERTUNE_RUN_ID=run1 exec /venv/bin/python -u -m "
                             "torch.distributed.run")
    assert shlex.split(script)[5:] == cmd
    from torch.distributed.run import get_args_parser
    parsed = get_args_parser().parse_args(cmd[4:])
    assert parsed.nnodes == "2" and parsed.node_rank == 1 and parsed.module
    assert parsed.training_script == "clustertune.cluster.rankexec"


def test_slurm_script_text():
    text = slurm_script(cluster=CLUSTER, python="/venv/bin/python", workdir="/work", run_name="sft 32b", run_id="r1",
                        env_file="/r/launch/run.env", recipe="/r/launch/recipe.toml", resume=True, logs_dir="/r/logs")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ("#SBATCH --job-name=sft_32b", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --output=/r/logs/slurm-%j.out", "set -euo pipefail",
                 "cd /work", "export CLUSTERTUNE_RUN_ID=r1"):
        assert line in lines, line
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    srun = text[text.index("srun "):]
    for part in ("--kill-on-bad-exit=1", '--nnodes="$SLURM_NNODES"', "--nproc-per-node=8", "--rdzv-backend=c10d",
                 '--rdzv-endpoint="$MASTER_ADDR:29600"', '--rdzv-id="$SLURM_JOB_ID"',
                 "-m clustertune.cluster.rankexec --env-file /r/launch/run.env /r/launch/recipe.toml --resume"):
        assert part in srun, part
    assert subprocess.run(["bash", "-n"], input=text, text=True, timeout=10).returncode == 0
    uneven = cluster_from_dict({"nodes": [{"name": "a", "address": "10.0.0.1", "slots": 8},
                                          {"name": "b", "address": "10.0.0.2", "slots": 4}]})
    with pytest.raises(LaunchError, match="same slots"):
        slurm_script(cluster=uneven, python="p", workdir="/w", run_name="r", run_id="i", env_file="e", recipe="r",
                     resume=False, logs_dir="/l")


def test_output_router_prefixes_masks_and_detects_failure(tmp_path):
    shown = []
    router = OutputRouter(["gpu1", "gpu2"], tmp_path, ["hf_secretvalue"], echo=shown.append)
    router.feed("[2025] [INFO] [runner.py] cmd = pdsh ...\n")
    router.feed("gpu1: [rank 0] step 1 loss 2.0 token hf_secretvalue\n")
    router.feed("gpu1: [2025-11-25 15:07:42,669] [INFO] [launch.py:152:main] WORLD INFO DICT\n")
    router.feed("gpu1: [rank 0] train:  10%\rtrain:  50%\rtrain: 100% loss 1.0\r\n")
    router.feed("gpu2: [rank 9] clustertune-rank-exit rank=9 node=1 code=0 seconds=3.0\n")
    assert router.failure is None
    router.feed("gpu2: [rank 8] clustertune-rank-exit rank=8 node=1 code=1 seconds=3.0\n")
    router.feed("pdsh@master: gpu2: ssh exited with exit code 1\n")
    router.close()
    assert router.failure == "rank 8 on gpu2 exited with code 1" and router.event.is_set()
    assert router.rank_exit == {9: 0, 8: 1} and router.rank_node[0] == "gpu1"
    g1 = (tmp_path / "gpu1.log").read_text()
    assert g1 == ("[rank 0] step 1 loss 2.0 token ***\n[2025-11-25 15:07:42,669] [INFO] [launch.py:152:main] "
                  "WORLD INFO DICT\n[rank 0] train: 100% loss 1.0\n")
    assert not any("WORLD INFO" in s for s in shown)  # DeepSpeed's INFO lines: log only
    assert "hf_secretvalue" not in "".join(shown) and any(s.startswith("gpu1 r0") for s in shown)
    # exit tags: in the logs (node and rank), not on the console (the run's summary says it)
    assert not any("clustertune-rank-exit" in s for s in shown)
    assert "clustertune-rank-exit rank=8" in (tmp_path / "gpu2.log").read_text()
    assert (tmp_path / "rank8.log").read_text() == "clustertune-rank-exit rank=8 node=1 code=1 seconds=3.0\n"
    assert "runner.py" in (tmp_path / "launcher.log").read_text()


def test_resolve_recipe_makes_paths_absolute(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    r = recipe_from_dict({"run": {"output_dir": "runs/x"}, "model": {"path": "model"},
                          "data": {"train_files": ["data.jsonl", "demo"]}, "train": {"max_steps": 2}})
    out = resolve_recipe(r, str(tmp_path), cpu=True)
    assert out.run.output_dir == str(tmp_path / "runs/x") and out.model.path == str(tmp_path / "model")
    assert out.data.train_files == [str(tmp_path / "data.jsonl"), "demo"] and out.train.device == "cpu"
    assert resolve_recipe(recipe_from_dict({"data": {"train_files": ["train.jsonl"]}, "train": {"max_steps": 1}}), str(tmp_path), cpu=False).model.path == "tiny"


def test_rankexec_env(tmp_path):
    f = tmp_path / "run.env"
    f.write_text("A=1\nCLUSTERTUNE_NODE_NICS=eth0,ens5\nB=x y\n")
    file_env = read_env_file(str(f))
    assert file_env == {"A": "1", "CLUSTERTUNE_NODE_NICS": "eth0,ens5", "B": "x y"}
    env = child_env({"LOCAL_SIZE": "8", "CROSS_RANK": "1", "RANK": "9"}, file_env)
    assert env["LOCAL_WORLD_SIZE"] == "8"
    assert env["GLOO_SOCKET_IFNAME"] == "ens5" and env["NCCL_SOCKET_IFNAME"] == "ens5"
    env = child_env({"LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}, file_env)  # torchrun names
    assert env["LOCAL_WORLD_SIZE"] == "2" and env["GLOO_SOCKET_IFNAME"] == "eth0"


def test_launcher_side_never_imports_torch():
    code = ("import sys; import clustertune.cluster.launch, clustertune.cluster.doctor, clustertune.cluster.ssh, "
            "clustertune.cluster.sandbox, clustertune.cluster.commands, clustertune.cluster.rankexec, "
            "clustertune.secrets; bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_insecure_ssh_options_in_sources():
    src = Path(__file__).resolve().parents[2] / "src" / "clustertune"
    for path in list((src / "cluster").glob("*.py")) + [src / "secrets.py"]:
        text = path.read_text()
        assert "StrictHostKeyChecking=no" not in text and "StrictHostKeyChecking no" not in text, path
        assert "UserKnownHostsFile=/dev/null" not in text and "UserKnownHostsFile /dev/null" not in text, path
        assert ".".join(["172", "16", "80", ""]) not in text, path  # the article's hosts: never contacted


def test_cmd_launch_slurm_writes_job_and_private_secrets(tmp_path, monkeypatch, capsys):
    """`--launcher slurm` writes the run files and the sbatch script; nothing runs here."""
    import argparse
    import json
    import stat

    from clustertune.cluster.launch import cmd_launch
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_slurmsecret")
    (tmp_path / "r.toml").write_text('[run]\nname = "sft"\noutput_dir = "runs/sft"\n[data]\ntrain_files = ["train.jsonl"]\n[train]\nmax_steps = 2\nmicro_batch_size = 1\n')
    args = argparse.Namespace(recipe="r.toml", overrides=["train.lr=1e-4"], launcher="slurm", resume=False,
                              cluster=str(repo / "configs" / "cluster-example.toml"), skip_doctor=False)
    assert cmd_launch(args) == 0
    launch = tmp_path / "runs" / "sft" / "launch"
    script = (launch / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert str(launch / "recipe.toml") in script and "hf_slurmsecret" not in script
    assert "lr = 0.0001" in (launch / "recipe.toml").read_text()
    assert load_cluster(launch / "cluster.toml").world_size == 16  # the run directory describes its cluster
    assert stat.S_IMODE((launch / "secrets.env").stat().st_mode) == 0o600
    env_text = (launch / "run.env").read_text()
    assert f"CLUSTERTUNE_SECRETS_FILE={launch / 'secrets.env'}" in env_text and "hf_slurmsecret" not in env_text
    assert json.loads((launch / "run.json").read_text())["secret_names"] == ["HF_TOKEN"]
    assert "sbatch" in capsys.readouterr().out


def test_rankexec_prefixes_lines_and_reports_exit(tmp_path):
    """Two ranks sharing one pipe (as on a node): every line intact and prefixed, exit codes kept."""
    import os
    import sys
    (tmp_path / "chatty_worker.py").write_text(
        "import os, sys\n"
        "for i in range(300):\n"
        "    print(f'line {i} ' + 'x' * 200)\n"
        "sys.stdout.write('no newline at the end')\n"
        "sys.exit(int(os.environ['RANK']) + 3)\n")
    env_file = tmp_path / "run.env"
    env_file.write_text("CLUSTERTUNE_WORKER_MODULE=chatty_worker\n")
    base = dict(os.environ, PYTHONPATH=str(tmp_path), CROSS_RANK="0")
    read_fd, write_fd = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-m", "clustertune.cluster.rankexec", "--env-file", str(env_file),
                               "recipe.toml"], env=dict(base, RANK=str(r)), stdout=write_fd, stderr=subprocess.STDOUT)
             for r in (0, 1)]
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        text = pipe.read().decode()
    codes = [p.wait(60) for p in procs]
    assert codes == [3, 4]
    lines = text.splitlines()
    assert len(lines) == 2 * 302
    for line in lines:
        assert re.match(r"^\[rank [01]\] (line \d+ x{200}|no newline at the end|clustertune-rank-exit .*)$", line), line
    assert "[rank 1] clustertune-rank-exit rank=1 node=0 code=4" in text


# ------------------------------------------------------------------- the launch plan (pure)

def _plan(launcher: str, *, cluster=CLUSTER, local: bool = False, environ=None, resume: bool = False, **kw):
    from clustertune.cluster.launch import build_launch_plan
    recipe = recipe_from_dict({"run": {"name": "sft", "output_dir": "/runs/sft", "env_passthrough": ["MY_TOKEN"]},
                               "data": {"train_files": ["/data/train.jsonl"]}, "train": {"max_steps": 2}})
    return build_launch_plan(recipe, cluster, launcher=launcher, local=local, resume=resume, run_id="rid0",
                             environ=ENV if environ is None else environ, nics=["eth0", "eth0"], workdir="/work",
                             python="/venv/bin/python", ssh_config=None if local else Path("/home/me/ssh_config"),
                             cpu_count=8, **kw)


def test_plan_deepspeed_one_runner_over_pdsh():
    plan = _plan("deepspeed", resume=True)
    (proc,) = plan.processes
    assert proc.argv[:4] == ("/venv/bin/python", "-u", "-m", "deepspeed.launcher.runner") and "--force_multi" in proc.argv
    assert proc.argv[-4:] == ("--env-file", "/runs/sft/launch/run.env", "/runs/sft/launch/recipe.toml", "--resume")
    assert proc.node is None  # its lines carry pdsh's `node: ` prefix
    assert proc.env["PDSH_SSH_ARGS_APPEND"] == "-F /home/me/ssh_config" and "CLUSTERTUNE_RUN_ID" not in proc.env
    assert plan.command_text == shlex.join(proc.argv) + "\n"
    # the env file: allow-listed, no secret values; the secrets only in what goes to the 0600 file
    assert plan.run_env["CLUSTERTUNE_SECRETS_FILE"] == "/runs/sft/launch/secrets.env"
    assert plan.run_env["GLOO_SOCKET_IFNAME"] == "eth0" and plan.run_env["CLUSTERTUNE_RUN_ID"] == "rid0"
    assert plan.secrets == {"HF_TOKEN": "hf_secretvalue", "MY_TOKEN": "mytoken", "WANDB_API_KEY": "wandbsecret"}
    files = {p.name: (text, mode) for p, text, mode in plan.staged_files()}
    assert files["secrets.env"][1] == 0o600 and "HF_TOKEN=hf_secretvalue\n" in files["secrets.env"][0]
    written = "".join(text for _p, text in plan.run_files())
    assert not any(s in written for s in ("hf_secretvalue", "mytoken", "wandbsecret", "awssecret"))
    assert {p.name for p, _t in plan.run_files()} == {"recipe.toml", "run.env", "hostfile", "cluster.toml",
                                                           "command.txt"}
    assert plan.info["secret_names"] == ["HF_TOKEN", "MY_TOKEN", "WANDB_API_KEY"] and plan.console == "node"
    assert any("TORCH_EVIL" in n for n in plan.notes)


def test_plan_deepspeed_on_this_machine_needs_no_ssh():
    from clustertune.cluster.inventory import localhost_cluster
    plan = _plan("deepspeed", cluster=localhost_cluster(2, "cpu", master_port=4000), local=True)
    (proc,) = plan.processes
    assert "--force_multi" not in proc.argv and proc.node == "localhost" and "PDSH_RCMD_TYPE" not in proc.env
    assert "NCCL_SOCKET_IFNAME" not in plan.run_env  # loopback: the nodes' interfaces are not used
    assert plan.run_env["OMP_NUM_THREADS"] == "4" and plan.run_env["DS_ACCELERATOR"] == "cpu"


def test_plan_torchrun_one_ssh_per_node():
    plan = _plan("torchrun")
    assert [p.node for p in plan.processes] == ["gpu1", "gpu2"]
    second = plan.processes[1]
    assert second.argv[:4] == ("ssh", "-F", "/home/me/ssh_config", "gpu2")
    script = second.argv[4]
    assert "--node-rank=1" in script and "CLUSTERTUNE_RUN_ID=rid0 exec" in script and "hf_secretvalue" not in script
    assert plan.command_text.startswith("# gpu1\n") and "# gpu2\n" in plan.command_text


def test_plan_slurm_starts_nothing():
    plan = _plan("slurm")
    assert plan.processes == () and "#SBATCH --nodes=2" in plan.sbatch_text
    assert "job.sbatch" in {p.name for p, _t in plan.run_files()}


def test_plan_local_one_wrapper_per_rank_rank0_keeps_its_stderr():
    from clustertune.cluster.inventory import localhost_cluster
    from clustertune.cluster.launch import build_launch_plan
    environ = dict(ENV, CUDA_VISIBLE_DEVICES="2,3")
    plan = _plan("local", cluster=localhost_cluster(2, "gpu", master_port=4000), local=True, environ=environ)
    r0, r1 = plan.processes
    assert (r0.rank, r1.rank) == (0, 1) and r0.raw_stderr and not r1.raw_stderr and plan.console == "rank"
    assert r0.argv == ("/venv/bin/python", "-u", "-m", "clustertune.cluster.rankexec", "--env-file",
                       "/runs/sft/launch/run.env", "--raw-stderr", "/runs/sft/launch/recipe.toml")
    assert "--raw-stderr" not in r1.argv
    assert r1.env["RANK"] == "1" and r1.env["WORLD_SIZE"] == "2" and r1.env["MASTER_PORT"] == "4000"
    assert r1.env["CLUSTERTUNE_RUN_ID"] == "rid0" and r1.env["CUDA_VISIBLE_DEVICES"] == "2,3"
    # the same allow-list as every launch: nothing of the shell beyond it, no secret in any env
    for proc in plan.processes:
        # PYTHONPATH: the wrapper imports clustertune before it reads the env file (a checkout
        # used through PYTHONPATH, as on the GPU machines, failed to start without it)
        assert proc.env["PYTHONPATH"] == "/opt/lib"
        assert set(proc.env) - {"PATH", "HOME", "CUDA_VISIBLE_DEVICES", "GROUP_RANK", "PYTHONPATH"} <= {
            "CLUSTERTUNE_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT"}
    assert "HF_TOKEN" not in plan.run_env and plan.secrets["HF_TOKEN"] == "hf_secretvalue"
    # no shell between the supervisor and train's ranks: a path with a space is fine there
    spaced = build_launch_plan(recipe_from_dict({"run": {"output_dir": "/my runs/x"},
                                                 "data": {"train_files": ["t.jsonl"]}}),
                               localhost_cluster(1, "cpu", master_port=4000), launcher="local", local=True,
                               resume=False, run_id="r", environ={}, nics=None, workdir="/my work",
                               python="/my venv/bin/python", ssh_config=None, cpu_count=2)
    assert spaced.processes[0].argv[0] == "/my venv/bin/python"
    with pytest.raises(LaunchError, match="remote shell"):  # the same path through ssh: refused
        build_launch_plan(recipe_from_dict({"run": {"output_dir": "/my runs/x"}, "data": {"train_files": ["t.jsonl"]}}),
                          CLUSTER, launcher="torchrun", local=False, resume=False, run_id="r", environ={}, nics=None,
                          workdir="/w", python="/p", ssh_config=Path("/s"), cpu_count=2)
    with pytest.raises(ValueError, match="local launcher"):
        _plan("local")  # a cluster file's nodes are never started by the one-machine launcher
