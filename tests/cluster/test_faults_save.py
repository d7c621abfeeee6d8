"""SIGKILL during a checkpoint save, at each named point of the save (the worker's TEST-ONLY hook,
CLUSTERTUNE_FAULT=kill_during_save:<point>:<rank>:<step>, see clustertune.watchdog.fault_point):

    before_shards  rank 1 dies before writing anything of step 4
    after_shards   rank 1 dies after writing its shards, before the barrier
    after_barrier  rank 0 (the marker writer) dies after every shard is written, before the marker

Each launch (`clustertune launch`, DeepSpeed launcher, 2 real worker ranks on this machine, tiny
Qwen2, ZeRO-2) fails naming the killed rank, and the next `launch --resume` starts from step 2,
the previous complete checkpoint, never from the partial step 4; the last one finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterlib import base_env, run_pids
from tinytask import make_task, tiny_recipe

pytestmark = [pytest.mark.cluster]

ENV = {"OMP_NUM_THREADS": "1",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))}


def _launch(tmp: Path, recipe: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(base_env(), **ENV)
    env.pop("CLUSTERTUNE_FAULT", None)
    if fault:
        env["CLUSTERTUNE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "clustertune.cli", "launch", str(recipe), "--skip-doctor", *extra],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)


def test_kill_during_save_resumes_from_previous_complete_checkpoint(tmp_path):
    tokenizer, _ = make_task(tmp_path)
    recipe = tmp_path / "save.toml"
    recipe.write_text(tiny_recipe("save", tokenizer, steps=6, stage=2,
                                   run={"collective_timeout_s": 30, "stall_timeout_s": 30},
                                   train={"device": "cpu"}, checkpoint={"every_steps": 2, "keep_last": 3}))
    run = tmp_path / "runs" / "save"
    ckpts = run / "checkpoints"
    for i, (point, rank) in enumerate([("before_shards", 1), ("after_shards", 1), ("after_barrier", 0)]):
        started = time.monotonic()
        out = _launch(tmp_path, recipe, *(["--resume"] if i else []), fault=f"kill_during_save:{point}:{rank}:4")
        text = out.stdout + out.stderr
        assert out.returncode != 0, text[-4000:]
        assert f"rank {rank} SIGKILLs itself at {point} of the step-4 save" in text, text[-4000:]
        assert f"run failed: rank {rank} on localhost was killed by SIGKILL" in text, text[-4000:]
        assert time.monotonic() - started < 120
        if i:
            assert "(step 2)" in [line for line in text.splitlines() if "resumed from" in line][0], text[-4000:]
        assert (ckpts / "step_2" / "COMPLETE.json").exists() or any(ckpts.glob("*2/COMPLETE.json"))
        assert not list(ckpts.glob("*4/COMPLETE.json")), point  # step 4 never counts as complete
        assert run_pids(json.loads((run / "launch" / "run.json").read_text())["run_id"]) == []
    # the step-4 directory of the last fault holds every shard, and still is not taken
    assert len(list(ckpts.glob("*4/*optim_states.pt"))) == 2

    out = _launch(tmp_path, recipe, "--resume")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "(step 2)" in [line for line in text.splitlines() if "resumed from" in line][0], text[-4000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert max(steps) == 6
    assert list(ckpts.glob("*6/COMPLETE.json"))
