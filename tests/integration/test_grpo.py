"""GRPO on the real worker (2 CPU processes, gloo, tiny model): ZeRO-2 and ZeRO-3 (packed) roll out,
reward, train and export; the rollout metrics land in metrics.jsonl.

    python -m pytest tests/integration/test_grpo.py -q
"""

from __future__ import annotations

import pytest

from conftest import metrics, run_train, write_recipe

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("stage,packing,kl", [(2, False, False), (3, True, False), (3, True, True)])
def test_grpo_rolls_out_trains_and_exports(tmp_path, task_dir, stage, packing, kl):
    run_dir = tmp_path / "run"
    # operator:lt rewards a completion that sorts before the answer: about half of random ones, so
    # groups have reward spread and the gradient is not zero.
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir,
                          data={"max_length": 96, "packing": packing, "eval_fraction": 0.1},
                          eval={"every_steps": 2, "generate_samples": 2},
                          train={"objective": "grpo", "max_steps": 3, "global_batch_size": 16, "micro_batch_size": 4,
                                 "micro_batch_tokens": 256, "lr": 1e-3},
                          grpo={"group_size": 4, "max_new_tokens": 8, "rewards": ["operator:lt", "format"],
                                **({"kl_beta": 0.1} if kl else {})},
                          zero={"stage": stage}, **({"lora": {"enabled": True, "r": 4, "alpha": 8.0}} if kl else {}))
    proc = run_train(recipe)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = [m for m in metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3]
    for m in records:
        for key in ("reward_mean", "reward_std", "groups_without_spread", "completion_len_mean",
                    "generation_time_s", "completion_tokens"):
            assert key in m, key
        assert 1 <= m["completion_len_mean"] <= 8
        assert m["grad_norm"] > 0  # groups with spread: a real gradient
    # held-out prompts: greedy completions scored after step 2 and at the end (step 3)
    evals = [m for m in metrics(run_dir) if "eval_reward_mean" in m]
    assert [m["step"] for m in evals] == [2, 3]
    for m in evals:
        assert m["eval_prompts"] > 0 and 0 <= m["eval_exact_match"] <= 1 and "eval_loss" not in m
    if kl:  # the adapter starts at zero (policy = reference), then moves away
        assert records[0]["kl"] == pytest.approx(0.0, abs=1e-7) and records[-1]["kl"] > 0
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_grpo_demo_briefly(tmp_path):
    import os
    import re
    import subprocess
    import sys
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "clustertune.cli", "demo", "--objective", "grpo",
                           "--set", f"run.output_dir={tmp_path / 'demo'}", "--set", "train.max_steps=60"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    before = float(re.search(r"exact match before GRPO.*?: ([\d.]+)%", output).group(1))
    after = float(re.search(r"exact match after GRPO: ([\d.]+)%", output).group(1))
    assert 30 <= before <= 90  # the short SFT: partly learnt
    assert after > before  # RL alone raises it (68% -> ~75% in 60 steps, ~85% in the full 150)
    # the in-training eval (greedy on the same held-out prompts, at steps 50 and 60) agrees with demo_eval
    evals = [m for m in metrics(tmp_path / "demo") if "eval_exact_match" in m]
    assert [m["step"] for m in evals] == [50, 60]
    assert 100 * evals[-1]["eval_exact_match"] == pytest.approx(after, abs=2.0)
    assert (tmp_path / "demo" / "final" / "model.safetensors").is_file()
