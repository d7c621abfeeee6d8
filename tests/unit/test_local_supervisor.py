"""The one supervisor (clustertune.supervisor) as `clustertune train` uses it on one machine:
heartbeats feed the stall monitor and stay out of logs; a silent rank is reported by number and
every process is stopped; the environment of the ranks is the allow-listed one of every launch
(a secret reaches a rank only through the 0600 file); rank 0's stderr (the progress bar) reaches
the terminal as drawn. The `train` runs use a stand-in worker (no torch, fast)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from clustertune.cluster.inventory import localhost_cluster
from clustertune.supervisor import OutputRouter, RunProcesses, _Started, _supervise
from clustertune.watchdog import STALL_EXIT_CODE, StallMonitor

REPO = Path(__file__).resolve().parents[2]
FAKE_WORKER_DIR = REPO / "tests" / "cluster" / "fakeworker"
HF_TOKEN = "hf_trainSECRETvalue42"
RECIPE = ('[run]\nname = "fake"\noutput_dir = "runs/fake"\nenv_passthrough = ["MY_TOKEN"]\n'
          '[data]\ntrain_files = ["train.jsonl"]\n[train]\nmax_steps = 1\n')
RECORD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'


def test_heartbeats_are_recorded_not_logged(tmp_path):
    monitor = StallMonitor(timeout=60)
    shown: list[str] = []
    router = OutputRouter(["localhost"], tmp_path, [], echo=shown.append, monitor=monitor, console="rank")
    router.feed("[rank 1] clustertune-heartbeat rank=1 step=4 phase=train\n", "localhost")
    router.feed("[rank 1] hello\n", "localhost")
    router.close()
    assert (tmp_path / "rank1.log").read_text() == "hello\n"
    assert (tmp_path / "localhost.log").read_text() == "[rank 1] hello\n"
    assert shown == ["[rank 1] hello"]
    assert monitor.ranks[1].step == 4


def test_a_silent_rank_stops_the_run_with_the_stall_code(tmp_path, capsys):
    monitor = StallMonitor(timeout=0.5)
    monitor.record(1, "localhost", 3, "train")
    router = OutputRouter(["localhost"], tmp_path, [], echo=lambda s: None, monitor=monitor)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    run = RunProcesses(localhost_cluster(1, "cpu"), True, "nosuchrunid", None, procs=[sleeper])
    started = _Started(spec=None, proc=sleeper, pumps=[])  # type: ignore[arg-type]
    code = _supervise(run, router, [started], expected_ranks=1)
    router.close()
    assert code == STALL_EXIT_CODE
    assert sleeper.poll() is not None  # stopped, not left running
    assert "rank 1 on localhost sent no heartbeat" in capsys.readouterr().err


def _train(tmp_path: Path, mode: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "r.toml").write_text(RECIPE)
    (tmp_path / "train.jsonl").write_text(RECORD)
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    full = dict(base, PYTHONPATH=str(FAKE_WORKER_DIR), CLUSTERTUNE_WORKER_MODULE="ct_fake_worker",
                CLUSTERTUNE_FAKE_MODE=mode, **env)
    out = subprocess.run([sys.executable, "-m", "clustertune.cli", "train", "r.toml", "--nproc", "2"], cwd=tmp_path,
                         env=full, capture_output=True, timeout=120)
    # decoded by hand: text=True would turn a progress bar's \r into \n
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(), out.stderr.decode())


def _reports(run_dir: Path) -> dict[int, dict]:
    out = {}
    for rank in (0, 1):
        for line in (run_dir / "logs" / f"rank{rank}.log").read_text().splitlines():
            if line.startswith("FAKE {"):
                out[rank] = json.loads(line.split("FAKE ", 1)[1])
    return out


def test_train_ranks_get_the_allow_listed_environment_and_secrets_only_through_the_file(tmp_path):
    out = _train(tmp_path, "ok", HF_TOKEN=HF_TOKEN, MY_TOKEN="my-listed-secret", AWS_SECRET_ACCESS_KEY="awsnope",
                 SOME_SHELL_VARIABLE="not-for-ranks", NCCL_DEBUG="INFO")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "runs" / "fake"
    reports = _reports(run)
    assert sorted(reports) == [0, 1]
    for rank, r in reports.items():
        assert r["RANK"] == str(rank) and r["WORLD_SIZE"] == "2" and r["LOCAL_WORLD_SIZE"] == "2"
        assert r["secrets_in_environ"] == []  # no secret in the environment the launcher gave it...
        assert r["secrets_loaded"] == 2  # ...the listed ones came through the file
        assert r["hf_token_sha"] == hashlib.sha256(HF_TOKEN.encode()).hexdigest()[:16]
        assert not r["secret_on_cmdline"]
        assert "SOME_SHELL_VARIABLE" not in r["env_names"] and "AWS_SECRET_ACCESS_KEY" not in r["env_names"]
        assert r["NCCL_DEBUG"] == "INFO" and r["DS_ACCELERATOR"] == "cpu"
        assert r["CLUSTERTUNE_RUN_ID"]  # what a stop finds the rank's processes by
    info = json.loads((run / "launch" / "run.json").read_text())
    assert info["launcher"] == "local" and info["secret_names"] == ["HF_TOKEN", "MY_TOKEN"]
    assert not (run / "launch" / "secrets.env").exists()  # deleted at the end
    texts = [p.read_text() for p in (run / "logs").glob("*.log")] + [out.stdout, out.stderr,
                                                                       (run / "launch" / "run.env").read_text()]
    assert not any(s in t for t in texts for s in (HF_TOKEN, "my-listed-secret", "awsnope"))
    assert "[rank 1] FAKE {" in out.stderr  # rank-prefixed console lines on stderr, as before


def test_train_rank0_stderr_reaches_the_terminal_as_drawn(tmp_path):
    out = _train(tmp_path, "bar")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # rank 0: raw, each redraw as drawn (other lines may come between them on the terminal)
    positions = [out.stderr.index(f"\rbar {i}/3") for i in (1, 2, 3)]
    assert positions == sorted(positions) and "[rank 0] bar" not in out.stderr
    assert "[rank 1] bar 3/3" in out.stderr  # rank 1: one line per line, its latest redraw
    logs = tmp_path / "runs" / "fake" / "logs"
    assert "bar 3/3\n" in (logs / "rank0.log").read_text() and "\r" not in (logs / "rank0.log").read_text()


def test_train_stops_every_rank_when_one_fails(tmp_path):
    out = _train(tmp_path, "fail:1")
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rank 1 on localhost exited with code 3" in out.stderr
    log0 = (tmp_path / "runs" / "fake" / "logs" / "rank0.log").read_text()
    assert "FAKE sleeping" in log0 and "clustertune-rank-exit rank=0 node=0 code=-15" in log0  # stopped


def _run_pids(run_id: str) -> list[int]:
    """Live processes whose environment carries this run's id."""
    marker = f"CLUSTERTUNE_RUN_ID={run_id}".encode()
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            alive = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            if alive and marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
        except (OSError, IndexError):
            pass
    return found


def test_ctrl_c_stops_every_rank_of_train(tmp_path):
    import signal
    import time
    (tmp_path / "r.toml").write_text(RECIPE)
    (tmp_path / "train.jsonl").write_text(RECORD)
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    env.update(PYTHONPATH=str(FAKE_WORKER_DIR), CLUSTERTUNE_WORKER_MODULE="ct_fake_worker", CLUSTERTUNE_FAKE_MODE="sleep")
    # SIGINT's default disposition for the launcher even when this suite runs as a background job (which
    # ignores SIGINT, inherited: Python then never raises KeyboardInterrupt and Ctrl-C does nothing)
    proc = subprocess.Popen([sys.executable, "-m", "clustertune.cli", "train", "r.toml", "--nproc", "2"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    logs = tmp_path / "runs" / "fake" / "logs"
    try:
        deadline = time.monotonic() + 60
        while not all((logs / f"rank{r}.log").exists() and "FAKE sleeping" in (logs / f"rank{r}.log").read_text()
                      for r in (0, 1)):
            assert time.monotonic() < deadline and proc.poll() is None, "the ranks did not start"
            time.sleep(0.1)
        run_id = json.loads((tmp_path / "runs" / "fake" / "launch" / "run.json").read_text())["run_id"]
        assert len(_run_pids(run_id)) >= 4  # a wrapper and a worker per rank
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err.decode()[-2000:]
        assert "interrupted" in err.decode()
        assert _run_pids(run_id) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_run_that_cannot_start_leaves_no_secrets_file(tmp_path):
    import pytest

    from clustertune.cluster.launch import build_launch_plan
    from clustertune.config import recipe_from_dict
    from clustertune.supervisor import run_plan
    recipe = recipe_from_dict({"run": {"output_dir": str(tmp_path / "run")}, "data": {"train_files": ["t.jsonl"]}})
    plan = build_launch_plan(recipe, localhost_cluster(2, "cpu", master_port=4000), launcher="local", local=True,
                             resume=False, run_id="rid1", environ={"HF_TOKEN": HF_TOKEN}, nics=None,
                             workdir=str(tmp_path), python=str(tmp_path / "no-such-python"), ssh_config=None,
                             cpu_count=2)
    with pytest.raises(FileNotFoundError):
        run_plan(plan)
    assert not plan.files.secrets.exists()
    assert plan.files.recipe.is_file()  # the run files were written; only the secrets go


def test_train_rank0_stderr_is_a_terminal_of_the_terminals_size_when_ours_is_one(tmp_path):
    """tqdm sizes its bar from the stream it writes to: rank 0 must see a terminal as wide as ours."""
    import fcntl
    import struct
    import termios
    (tmp_path / "r.toml").write_text(RECIPE)
    (tmp_path / "train.jsonl").write_text(RECORD)
    ours, theirs = os.openpty()
    fcntl.ioctl(theirs, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 50, 0, 0))  # rows, columns
    drained = threading.Thread(target=lambda: _drain(ours), daemon=True)
    drained.start()
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    env.update(PYTHONPATH=str(FAKE_WORKER_DIR), CLUSTERTUNE_WORKER_MODULE="ct_fake_worker")
    code = subprocess.run([sys.executable, "-m", "clustertune.cli", "train", "r.toml", "--nproc", "2"], cwd=tmp_path,
                          env=env, stdout=subprocess.DEVNULL, stderr=theirs, timeout=120).returncode
    os.close(theirs)
    assert code == 0
    reports = _reports(tmp_path / "runs" / "fake")
    assert reports[0]["stderr_size"] == [50, 20] and reports[1]["stderr_size"] is None


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass
