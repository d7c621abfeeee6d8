"""The one supervisor of every launch: `clustertune train` (ranks on this machine), `clustertune
launch` (this machine, or the nodes of a cluster file, through DeepSpeed's launcher or torchrun).
It executes a `cluster.launch.LaunchPlan` (built there, without side effects):

    plan = build_launch_plan(...)        # what to write and what to start
    code = run_plan(plan)                # writes the run files, starts, watches, stops

Executing a plan:
  * writes RUN/launch/ (recipe, the allow-listed env file, hostfile, run.json, command.txt) and
    the 0600 secrets file: secrets reach the ranks only through that file, on one machine too;
  * copies them to the nodes, starts the plan's processes (each in its own session), and routes
    their output: each line prefixed by its node and rank on the console, saved per node and
    per rank in RUN/logs/, with known secret values masked; rank 0 of `train` keeps its stderr
    (the live progress bar) on the terminal;
  * feeds the ranks' heartbeats to the stall monitor (clustertune.watchdog);
  * stops every process of the run (by run id, on every node, nothing else) on the first failed
    rank, a stall, Ctrl-C or SIGTERM, and sweeps leftovers after every run.

Launcher side: never imports torch.
"""

from __future__ import annotations

import codecs
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable

from clustertune import contract
from clustertune.errors import UserError
from clustertune.secrets import write_secrets_file
from clustertune.watchdog import STALL_EXIT_CODE, StallMonitor

if TYPE_CHECKING:
    from clustertune.cluster.inventory import Cluster
    from clustertune.cluster.launch import LaunchPlan, LaunchProcess
    from clustertune.config import Recipe

# ---------------------------------------------------------------------------- this machine


def free_port() -> int:
    """A TCP port free on loopback now: the rendezvous port of a one-machine run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_data_before_start(recipe: Recipe) -> None:
    """Every record of the data files parsed and validated here, so bad input is one clear
    error (file:line) before any rank takes a GPU."""
    from clustertune.data import check_records
    report = check_records(recipe.data, recipe.train.objective)
    print(f"data: {report.valid} records in {len(report.files)} file(s) read"
          + (f", {report.total_lines - report.valid} invalid skipped (data.skip_invalid)"
             if report.total_lines > report.valid else ""), file=sys.stderr)


# ------------------------------------------------------------------------------ output routing

_PDSH_LINE = re.compile(r"^(?P<node>[A-Za-z0-9][A-Za-z0-9_.-]*): (?P<rest>.*)$")
_PDSH_EXIT = re.compile(r"^pdsh@[^:]*: (?P<node>[^:]+): ssh exited with exit code (?P<code>\d+)")
_DS_INFO = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[INFO\] ")


class OutputRouter:
    """Prefixes, saves per node and per rank, masks secrets, and notices failures in the merged
    stream. console="node": `node1 r0 | text` (a cluster); "rank": `[rank 0] text` (train)."""

    def __init__(self, node_names: list[str], logs_dir: Path, secret_values: list[str], *,
                 echo: Callable[[str], None] | None = None, monitor: StallMonitor | None = None,
                 console: str = "node"):
        self.nodes = set(node_names)
        self.monitor = monitor  # heartbeats (clustertune.watchdog) go here, not to the logs
        self.stopping = False  # set once the run is being stopped: later exits are consequences
        self.console = console
        self.logs_dir = logs_dir
        logs_dir.mkdir(parents=True, exist_ok=True)
        self.files = {n: open(logs_dir / f"{n}.log", "a", encoding="utf-8") for n in node_names}
        self.files["launcher"] = open(logs_dir / "launcher.log", "a", encoding="utf-8")
        self.rank_files: dict[int, IO[str]] = {}
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
        """One line of a process's output. node=None: DeepSpeed's runner, whose lines from the
        nodes carry pdsh's `node: ` prefix."""
        line = self.mask(line.rstrip("\r\n"))
        m = _PDSH_EXIT.match(line)
        if m and m["node"] in self.nodes and int(m["code"]) != 0:
            self._fail(f"node {m['node']}: launcher exited with code {m['code']}", int(m["code"]))
        if node is None:
            m = _PDSH_LINE.match(line)
            if m and m["node"] in self.nodes:
                node, line = m["node"], m["rest"]
        rank = None
        body = line
        parsed = contract.parse_rank_line(line) if node is not None else None
        if parsed is not None:
            rank, body = parsed
            self.rank_node[rank] = node  # type: ignore[assignment]
            beat = contract.parse_heartbeat(body)
            if beat is not None:
                if self.monitor is not None:
                    self.monitor.record(beat.rank, node, beat.step, beat.phase)
                return
            ended = contract.parse_exit(body)
            if ended is not None:  # for the logs; the console gets the run's summary instead
                self._rank_exited(rank, node, ended.code)  # type: ignore[arg-type]
                self.log(rank, node, body, echo=False)
                return
        body = _latest_redraw(body)
        self.log(rank, node, body, echo=rank is not None or not _DS_INFO.match(body))

    def log(self, rank: int | None, node: str | None, body: str, *, echo: bool) -> None:
        """Save one line of a rank (or of a launcher process when rank is None); show it if echo."""
        label = node if node is not None else "launcher"
        with self.lock:
            handle = self.files.get(label, self.files["launcher"])
            handle.write((contract.rank_line(rank, body) if rank is not None else body) + "\n")
            handle.flush()
            if rank is not None:
                if rank not in self.rank_files:
                    self.rank_files[rank] = open(self.logs_dir / f"rank{rank}.log", "a", encoding="utf-8")
                self.rank_files[rank].write(body + "\n")
                self.rank_files[rank].flush()
            if echo:
                self.echo(self._console_line(rank, label, body))

    def _console_line(self, rank: int | None, label: str, body: str) -> str:
        if self.console == "rank":
            return contract.rank_line(rank, body) if rank is not None else body
        tag = f"{label} r{rank}" if rank is not None else label
        return f"{tag.ljust(self.width + 4)} | {body}"

    def _rank_exited(self, rank: int, node: str, code: int) -> None:
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

    def _fail(self, why: str, code: int, signal_death: bool = False) -> None:
        # The first failure names the cause; a rank killed by a signal (before we stop the run)
        # outranks a peer that merely exited with an error because that rank vanished.
        upgrade = signal_death and not self.failure_is_signal and not self.stopping
        if self.failure is None or upgrade:
            self.failure, self.failed_code, self.failure_is_signal = why, code, signal_death
        self.event.set()

    def close(self) -> None:
        for handle in [*self.files.values(), *self.rank_files.values()]:
            handle.close()


def _latest_redraw(text: str) -> str:
    """A progress bar redraws with \\r: keep the latest state of the line only."""
    if "\r" not in text:
        return text
    return next((seg for seg in reversed(text.split("\r")) if seg.strip()), "")


def _pump_lines(stream, router: OutputRouter, node: str | None) -> None:
    for raw in iter(stream.readline, b""):
        router.feed(raw.decode("utf-8", "replace"), node)
    stream.close()


def _pump_raw_stderr(fd: int, router: OutputRouter, rank: int, node: str, terminal: IO[bytes]) -> None:
    """A rank's stderr as it comes, chunk by chunk, to the terminal (a progress bar redraws in
    place with \\r and never ends its line, so line-by-line routing would show nothing until
    the end) and, line by line, to its logs. Secret values are masked per chunk: the worker never
    holds one outside its environment, this is a second line of defence."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = ""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the pseudo-terminal's other side is closed, i.e. end of stream
            chunk = b""
        text = decoder.decode(chunk, final=not chunk)
        if text:
            text = router.mask(text)
            try:
                terminal.write(text.encode("utf-8"))
                terminal.flush()
            except (OSError, ValueError):
                pass
            pending += text
            *lines, pending = pending.split("\n")
            for line in lines:
                router.log(rank, node, _latest_redraw(line), echo=False)
        if not chunk:
            break
    if pending.strip():
        router.log(rank, node, _latest_redraw(pending), echo=False)
    os.close(fd)


def _stderr_for_the_terminal() -> tuple[int, int]:
    """(ours, the rank's) ends of what carries a rank's stderr to our terminal: a pseudo-terminal
    of the terminal's size when our stderr is one (tqdm then draws a bar as wide as the terminal,
    as it did when the rank owned the terminal), else a pipe."""
    if not sys.stderr.isatty():
        return os.pipe()
    ours, theirs = os.openpty()
    size = fcntl.ioctl(sys.stderr.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
    fcntl.ioctl(theirs, termios.TIOCSWINSZ, size)
    attrs = termios.tcgetattr(theirs)
    attrs[1] &= ~termios.OPOST  # bytes as written: no \n -> \r\n
    termios.tcsetattr(theirs, termios.TCSANOW, attrs)
    return ours, theirs


# ----------------------------------------------------------------------- the run's processes

@dataclass
class RunProcesses:
    """The processes of one run on every node: what `stop` and the final sweep act on (every
    process whose environment carries CLUSTERTUNE_RUN_ID=<run id>, and the local launchers)."""

    cluster: Cluster
    local: bool  # the implicit localhost cluster: no ssh at all
    run_id: str
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


@dataclass
class _Started:
    spec: LaunchProcess
    proc: subprocess.Popen
    pumps: list[threading.Thread]

    @property
    def label(self) -> str:
        if self.spec.rank is not None:
            return f"rank {self.spec.rank} on {self.spec.node}"
        return "a launcher process"


# ----------------------------------------------------------------------------- executing a plan

def run_plan(plan: LaunchPlan) -> int:
    """Write the plan's files, start its processes, supervise them; the run's exit code."""
    files = plan.files
    write_run_files(plan)
    if plan.sbatch_text is not None:
        print(f"wrote {files.sbatch}\nsubmit it with: sbatch {files.sbatch}")
        if plan.secrets:
            print(f"note: {files.secrets} (0600) holds {', '.join(sorted(plan.secrets))} for the job; delete it "
                  "once the job has started")
        return 0

    run = RunProcesses(plan.cluster, plan.local, plan.run_id, plan.ssh_config)
    names = plan.node_names
    echo = None if plan.console == "node" else (lambda s: print(s, file=sys.stderr, flush=True))
    router = OutputRouter(names, files.logs_dir, list(plan.secrets.values()), echo=echo, console=plan.console,
                          monitor=StallMonitor(plan.stall_timeout_s))
    try:
        stage(run, plan.staged_files())
        print(f"clustertune: run {plan.run_id}: {plan.cluster.world_size} rank(s) on {len(names)} node(s) "
              f"({', '.join(names)}), master {plan.cluster.rendezvous_addr}:{plan.cluster.master_port}, launcher "
              f"{plan.launcher}; logs in {files.logs_dir}", flush=True)
        started: list[_Started] = []
        try:
            for spec in plan.processes:
                started.append(_start(spec, plan.workdir, router))
        finally:
            run.procs.extend(s.proc for s in started)
            if len(started) < len(plan.processes):  # a start failed: nothing of the run may stay
                run.stop(f"could not start {plan.processes[len(started)].argv[0]}")
        code = _supervise(run, router, started, plan.cluster.world_size)
    finally:
        router.close()
        if plan.secrets:  # on every node, whatever happened (a failed copy may have reached some)
            files.secrets.unlink(missing_ok=True)
            try:
                stage(run, [], remove=[str(files.secrets)])
            except StageError as err:
                print(f"warning: {err}", file=sys.stderr)
    for name in names:
        ranks = sorted(r for r, n in router.rank_node.items() if n == name)
        ok = [r for r in ranks if router.rank_exit.get(r) == 0]
        print(f"  {name}: ranks {ranks or '-'}: {len(ok)}/{len(ranks)} finished ok; "
              f"log {files.logs_dir / (name + '.log')}")
    print(f"clustertune: run {plan.run_id} {'finished' if code == 0 else f'FAILED (exit code {code})'}", flush=True)
    return code


def write_run_files(plan: LaunchPlan) -> None:
    """RUN/launch/* (the run describes itself: `clustertune cluster stop RUN_DIR` reads run.json)
    and a fresh RUN/logs/. The secrets file is created 0600 before any byte is written."""
    files = plan.files
    files.launch_dir.mkdir(parents=True, exist_ok=True)
    files.logs_dir.mkdir(parents=True, exist_ok=True)
    for stale in files.logs_dir.glob("*.log"):
        stale.unlink()
    files.secrets.unlink(missing_ok=True)
    if plan.secrets:
        write_secrets_file(files.secrets, plan.secrets)
    info = dict(plan.info, started=time.time())
    for path, text in plan.run_files():
        _write(path, text)
    _write(files.info, json.dumps(info, indent=2) + "\n")


class StageError(UserError):
    """The run files could not be copied to a node (ssh failed); the message names the nodes."""

    exit_code = 1  # a node is unreachable or full: the machines, not the input, need fixing


def stage(run: RunProcesses, files: list[tuple[Path, str, int]], remove: list[str] = ()) -> None:
    """Copy run files to every node (no shared filesystem is assumed), or remove them there."""
    if run.local:
        return
    payload = {"files": [{"path": str(p), "content": c, "mode": m} for p, c, m in files], "remove": list(remove)}
    results = run.on_every_node("stage", payload, timeout=60)
    bad = {n: r.error for n, r in results.items() if not r.ok}
    if bad:
        raise StageError("could not copy the run files to: " + "; ".join(f"{n}: {e}" for n, e in bad.items()))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _start(spec: LaunchProcess, workdir: str, router: OutputRouter) -> _Started:
    ours, theirs = _stderr_for_the_terminal() if spec.raw_stderr else (-1, subprocess.STDOUT)
    try:
        proc = subprocess.Popen(list(spec.argv), env=dict(spec.env), cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=theirs, start_new_session=True)
    except OSError:
        if spec.raw_stderr:
            os.close(ours)
        raise
    finally:
        if spec.raw_stderr:
            os.close(theirs)  # the rank holds its copy; our end sees the end of stream when it exits
    pumps = [threading.Thread(target=_pump_lines, args=(proc.stdout, router, spec.node), daemon=True)]
    if spec.raw_stderr:
        assert spec.rank is not None and spec.node is not None
        pumps.append(threading.Thread(target=_pump_raw_stderr, daemon=True,
                                      args=(ours, router, spec.rank, spec.node, sys.stderr.buffer)))
    for t in pumps:
        t.start()
    return _Started(spec, proc, pumps)


def _supervise(run: RunProcesses, router: OutputRouter, started: list[_Started], expected_ranks: int) -> int:
    interrupted = False
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, _frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        while any(s.proc.poll() is None for s in started):
            if router.event.wait(0.2):
                break
            stuck = router.monitor.check() if router.monitor is not None else None
            if stuck:
                router._fail(stuck, STALL_EXIT_CODE)
                break
            bad = [s for s in started if s.proc.poll() not in (None, 0)]
            if bad:
                for t in bad[0].pumps:  # its last lines (the exit tag) name the rank and the cause
                    t.join(timeout=2)
                router._fail(f"{bad[0].label} exited with code {bad[0].proc.returncode}", bad[0].proc.returncode)
                break
        if router.failure:
            # A peer's error exit often arrives just before the exit of the rank that died
            # (SIGKILL, OOM kill): give that a moment, so the report names the first to die.
            settle = time.monotonic() + 2
            while (not router.failure_is_signal and router.failed_code != STALL_EXIT_CODE
                   and time.monotonic() < settle):
                time.sleep(0.1)
            router.stopping = True
            run.stop(router.failure)
    except KeyboardInterrupt:
        interrupted = True
        run.stop("interrupted (Ctrl-C / SIGTERM)")
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    for s in started:
        for t in s.pumps:
            t.join(timeout=10)
    run.kill_local()
    run.sweep()
    if interrupted:
        return 130
    if router.failure:
        print(f"clustertune: run failed: {router.failure}", file=sys.stderr)
        code = router.failed_code or 1
        return code if 0 < code < 256 else 1
    codes = [s.proc.returncode for s in started]
    if any(codes):
        return next(c for c in codes if c) if all(0 < c < 256 for c in codes if c) else 1
    missing = sorted(set(range(expected_ranks)) - set(router.rank_exit))
    if missing:
        print(f"clustertune: rank(s) {missing} never reported their exit; treating the run as failed",
              file=sys.stderr)
        return 1
    return 0
