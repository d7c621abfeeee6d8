"""`clustertune export RUN_DIR` of a ZeRO-3 LoRA checkpoint (consolidated shard by shard, LoRA
merged) gives the same logits on a probe batch as the run's own final/ export, which rank 0 gathered
from the live engine at the end of training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_export, run_train, write_recipe

pytestmark = pytest.mark.integration


def test_offline_export_of_a_zero3_lora_checkpoint_gives_the_engine_logits(tmp_path, task_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir, train={"max_steps": 4, "lr": 1e-2},
                          zero={"stage": 3}, lora={"enabled": True, "r": 8, "alpha": 16.0},
                          checkpoint={"every_steps": 4, "keep_last": 1})
    assert run_train(recipe).returncode == 0
    proc = run_export(run_dir, tmp_path / "x")
    assert proc.returncode == 0, proc.stderr
    assert "exported step 4" in proc.stdout
    live = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    offline = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    assert not any("lora" in n for n in offline.state_dict())
    probe = torch.tensor([[1, 5, 9, 12, 40, 41, 77, 3]])
    with torch.no_grad():
        a, b = live(probe).logits, offline(probe).logits
    torch.testing.assert_close(a, b)

    # Without a shared filesystem, node1 holds only its own ranks' shards: a clear error that says
    # how to gather them (rank 1's shard removed here, as if it lived on node2).
    for f in (run_dir / "checkpoints" / "step_00000004").glob("*rank_1_*optim_states.pt"):
        f.unlink()
    proc = run_export(run_dir, tmp_path / "y")
    assert proc.returncode == 2, proc.stderr
    assert "shards of rank(s) [1] of 2 are missing" in proc.stderr
    assert "CLUSTERTUNE_NODE_LOCAL_DIR=D clustertune export" in proc.stderr
