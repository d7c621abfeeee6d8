"""The one-machine supervisor (clustertune train): heartbeats feed the stall monitor and stay out
of logs; a silent rank is reported by number and every worker is stopped."""

import io
import subprocess
import sys
import threading

from clustertune.local import _pump, _supervise
from clustertune.watchdog import STALL_EXIT_CODE, StallMonitor


def test_heartbeats_are_recorded_not_logged():
    monitor = StallMonitor(timeout=60)
    log = io.StringIO()
    stream = io.StringIO("clustertune-heartbeat rank=1 step=4 phase=train\nhello\n")
    _pump(stream, "[rank 1] ", log, False, monitor)
    assert log.getvalue() == "hello\n"
    assert monitor.ranks[1].step == 4


def test_a_silent_rank_stops_the_run_with_the_stall_code(capsys):
    monitor = StallMonitor(timeout=0.5)
    monitor.record(1, None, 3, "train")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    code = _supervise([sleeper], [threading.Thread(target=lambda: None)], monitor)
    assert code == STALL_EXIT_CODE
    assert sleeper.poll() is not None  # stopped, not left running
    assert "rank 1 sent no heartbeat" in capsys.readouterr().err
