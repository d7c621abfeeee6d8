"""The lean MLP (worker/kernels.py SwiGLUDown, on by default) under ZeRO-3 on 2 ranks: it reads
down_proj's weight inside its own autograd function, so ZeRO-3 must still gather that weight for the
forward and the backward and reduce-scatter its gradient. From the same saved weights, the same
losses and gradient norms as ZeRO-2 (which partitions no weights) at every step."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from clustertune.shapes import SHAPES
from conftest import metrics, run_train, write_recipe

pytestmark = pytest.mark.integration


def test_lean_mlp_trains_the_same_under_zero3_as_under_zero2(tmp_path, task_dir):
    start = tmp_path / "start"
    torch.manual_seed(3)
    Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict())).save_pretrained(start)
    runs = {}
    for stage in (2, 3):
        run_dir = tmp_path / f"z{stage}"
        recipe = write_recipe(tmp_path / f"z{stage}.toml", task_dir, run_dir, model={"path": str(start)},
                              train={"max_steps": 3, "gradient_checkpointing": True}, zero={"stage": stage})
        proc = run_train(recipe, nproc=2)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[stage] = metrics(run_dir)
    assert len(runs[2]) == len(runs[3]) == 3
    for a, b in zip(runs[2], runs[3]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert runs[3][-1]["loss"] < runs[3][0]["loss"]
