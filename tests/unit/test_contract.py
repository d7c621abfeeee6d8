"""The launcher-worker contract (clustertune.contract): every writer's line is read back by its
parser, and the parsers reject what is not theirs."""

from __future__ import annotations

import subprocess
import sys

from clustertune import contract


def test_rank_line_round_trip():
    assert contract.parse_rank_line(contract.rank_line(12, "step 3 loss 1.5")) == (12, "step 3 loss 1.5")
    assert contract.parse_rank_line(contract.rank_line(0, "")) == (0, "")
    assert contract.parse_rank_line("[rank x] text") is None and contract.parse_rank_line("rank 1 text") is None


def test_exit_line_round_trip_inside_a_rank_line():
    line = contract.rank_line(3, contract.exit_line(3, 1, -9, 12.345))
    rank, text = contract.parse_rank_line(line)
    assert rank == 3 and contract.parse_exit(text) == contract.RankExit("3", "1", -9, 12.3)
    assert contract.parse_exit(contract.exit_line("?", "?", 0, 0)).code == 0
    assert contract.parse_exit("clustertune-rank-exit rank=1") is None


def test_heartbeat_round_trip():
    line = contract.rank_line(2, contract.heartbeat_line(2, 40, "train"))
    assert contract.parse_heartbeat(line) == contract.Heartbeat(2, 40, "train")
    assert contract.parse_heartbeat("loss 1.0") is None


def test_env_file_round_trip():
    env = {"A": "1", "B": "with space", "C": "a=b,c@d%e+f", "EMPTY": ""}
    assert contract.parse_env_file_text(contract.env_file_text(env)) == env


def test_node_rank_names():
    assert contract.node_rank({"CROSS_RANK": "2"}) == "2" and contract.node_rank({"GROUP_RANK": "1"}) == "1"
    assert contract.node_rank({}) is None


def test_contract_is_standard_library_only():
    code = "import sys, clustertune.contract; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pydantic', 'deepspeed')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_no_contract_literal_outside_the_contract():
    """The names live in contract.py; other modules use them by name. (remote_snippets.py runs on
    a node as source text without clustertune, so it keeps its own copy of the run id's name.)"""
    from pathlib import Path
    src = Path(contract.__file__).parent
    literals = ['"CLUSTERTUNE_SECRETS_FILE"', '"CLUSTERTUNE_NODE_LOCAL_DIR"', '"CLUSTERTUNE_WORKER_MODULE"',
                '"CLUSTERTUNE_FAULT"', '"CLUSTERTUNE_NODE_NICS"', '"CLUSTERTUNE_RUN_ID"', '"clustertune-rank-exit"',
                '"clustertune-heartbeat"', '"[rank ']
    offenders = []
    for path in src.rglob("*.py"):
        if path.name in ("contract.py", "remote_snippets.py"):
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(src)}: {lit}" for lit in literals if lit in text]
    assert offenders == []
