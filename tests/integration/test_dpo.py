"""DPO on the real worker (2 CPU processes, gloo, tiny model): ZeRO-2 and ZeRO-3 (packed) train and
export; the first step's loss is log 2 (the reference stage ran on the initial policy); the
reference stage interrupted halfway continues where it stopped; LoRA's reference is the adapter
switched off; a resumed run uses the stored reference and continues exactly; the demo, briefly.

    python -m pytest tests/integration/test_dpo.py -q
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, metrics, run_train, write_recipe

pytestmark = pytest.mark.integration

LOG2 = math.log(2)


def write_pairs(path: Path, *, count: int, seed: int) -> Path:
    """"up abc" -> chosen "ABC", rejected the same with one letter wrong (or lower-case)."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:  # distinct pairs: the reference is stored once per distinct pair
        words.add("".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 7))))
    with open(path, "w") as f:
        for i, word in enumerate(sorted(words)):
            chosen = word.upper()
            k = rng.randrange(len(word))
            rejected = chosen[:k] + ("Z" if chosen[k] != "Z" else "Y") + chosen[k + 1:]
            if i % 3 == 0:  # the whole-conversation shape, with a shared prompt
                user = {"role": "user", "content": "up " + word}
                record = {"chosen": [user, {"role": "assistant", "content": chosen}],
                          "rejected": [user, {"role": "assistant", "content": rejected}]}
            else:
                record = {"prompt": "up " + word, "chosen": chosen, "rejected": rejected}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def pair_task(tmp_path_factory, task_dir) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    write_pairs(root / "train.jsonl", count=64, seed=0)
    write_pairs(root / "eval.jsonl", count=16, seed=1)
    train_words = {json.loads(line).get("prompt") for line in (root / "train.jsonl").read_text().splitlines()}
    eval_words = {json.loads(line).get("prompt") for line in (root / "eval.jsonl").read_text().splitlines()}
    assert not (train_words & eval_words) - {None}
    return root


def dpo_recipe(tmp_path: Path, task_dir: Path, pair_task: Path, run_dir: Path, *, zero=None, train=None, **sections):
    return write_recipe(tmp_path / f"{run_dir.name}.toml", task_dir, run_dir,
                        data={"train_files": [str(pair_task / "train.jsonl")],
                              "eval_files": [str(pair_task / "eval.jsonl")], "max_length": 128,
                              "cache_dir": str(pair_task / "cache"), **sections.pop("data", {})},
                        train={"objective": "dpo", "max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2,
                               "micro_batch_tokens": 256, "lr": 3e-3, **(train or {})},
                        zero=zero or {"stage": 2}, dpo={"beta": 0.5}, **sections)


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def stored_reference(run_dir: Path) -> dict[str, tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "reference_logps" / "logps.jsonl").read_text().splitlines()]
    return {r["key"]: (r["chosen"], r["rejected"]) for r in rows}


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, task_dir, pair_task) -> Path:
    tmp = tmp_path_factory.mktemp("dpo2")
    run_dir = tmp / "run"
    recipe = dpo_recipe(tmp, task_dir, pair_task, run_dir, checkpoint={"every_steps": 2, "keep_last": 5})
    proc = run_train(recipe)
    assert proc.returncode == 0
    return run_dir


def test_zero2_trains_logs_dpo_metrics_and_exports(zero2_run):
    records = [m for m in metrics(zero2_run) if "loss" in m]
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    # Step 1: the policy is the reference, so every pair's logit is 0 and the loss log 2.
    assert records[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    for key in ("pref_accuracy", "logps_chosen", "logps_rejected", "rewards_chosen", "rewards_rejected"):
        assert key in records[-1]
    assert records[-1]["pairs"] == 8 and records[-1]["loss"] < LOG2
    assert any(m.get("eval_loss") is not None for m in metrics(zero2_run))
    assert len(stored_reference(zero2_run)) == 80  # 64 train + 16 eval pairs
    assert (zero2_run / "final" / "model.safetensors").is_file()


def test_packed_gives_the_unpacked_losses_and_reference(tmp_path, task_dir, pair_task, zero2_run):
    run_dir = tmp_path / "packed"
    proc = run_train(dpo_recipe(tmp_path, task_dir, pair_task, run_dir, data={"packing": True}))
    assert proc.returncode == 0
    got, expected = losses(run_dir), losses(zero2_run)
    assert got.keys() == expected.keys()
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    reference, expected_reference = stored_reference(run_dir), stored_reference(zero2_run)
    assert reference.keys() == expected_reference.keys()
    for key, (chosen, rejected) in expected_reference.items():
        assert reference[key] == pytest.approx((chosen, rejected), abs=1e-4)


def test_zero3_packed_trains_and_exports(tmp_path, task_dir, pair_task):
    run_dir = tmp_path / "run3"
    proc = run_train(dpo_recipe(tmp_path, task_dir, pair_task, run_dir, zero={"stage": 3}, data={"packing": True}))
    assert proc.returncode == 0
    records = [m for m in metrics(run_dir) if "loss" in m]
    assert records[0]["loss"] == pytest.approx(LOG2, abs=1e-6)  # the reference stage ran on the initial policy
    assert records[-1]["loss"] < LOG2
    assert len(stored_reference(run_dir)) == 80
    # The final eval's forwards, then the export's gathers (ZeRO-3 parameters left in flight failed this).
    assert any("eval_loss" in m for m in metrics(run_dir))
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_reference_stage_interrupted_halfway_continues(tmp_path, task_dir, pair_task, zero2_run):
    run_dir = tmp_path / "run"
    recipe = dpo_recipe(tmp_path, task_dir, pair_task, run_dir, checkpoint={"every_steps": 2, "keep_last": 5})
    # 80 pairs, 2 per micro-batch, 2 ranks: 20 micro-batches a rank, stored 16 at a time.
    proc = run_train(recipe, env={"CLUSTERTUNE_FAULT": "kill_during_save:reference_round:0:1"})
    assert proc.returncode != 0
    partial = stored_reference(run_dir)
    assert len(partial) == 64
    proc = run_train(recipe, "--resume")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "16 pairs (64 already in" in proc.stdout + proc.stderr
    assert stored_reference(run_dir) == stored_reference(zero2_run)
    assert losses(run_dir) == losses(zero2_run)


def test_resume_uses_the_stored_reference_and_continues_exactly(tmp_path, zero2_run, task_dir, pair_task):
    run_dir = tmp_path / "run"
    shutil.copytree(zero2_run, run_dir)
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoints" / "step_00000004")
    recipe = dpo_recipe(tmp_path, task_dir, pair_task, run_dir, checkpoint={"every_steps": 2, "keep_last": 5})
    proc = run_train(recipe, "--resume")
    assert proc.returncode == 0
    assert "reference log-probs of 80 pairs loaded" in proc.stdout + proc.stderr
    resumed = {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}
    assert resumed[4] == pytest.approx(losses(zero2_run)[4], abs=1e-6)

    # Without the stored values a resumed run cannot recompute them (the weights moved): a clear error.
    shutil.rmtree(run_dir / "reference_logps")
    proc = run_train(recipe, "--resume")
    assert proc.returncode == 2
    assert "reference_logps" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr


def test_zero3_lora_reference_is_the_adapter_switched_off(tmp_path, task_dir, pair_task):
    run_dir = tmp_path / "run"
    proc = run_train(dpo_recipe(tmp_path, task_dir, pair_task, run_dir, zero={"stage": 3},
                                lora={"enabled": True, "r": 4, "alpha": 8.0}))
    assert proc.returncode == 0
    first = [m for m in metrics(run_dir) if "loss" in m][0]
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_dpo_demo_briefly(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "clustertune.cli", "demo", "--objective", "dpo",
                           "--set", f"run.output_dir={tmp_path / 'demo'}", "--set", "train.max_steps=150",
                           "--set", "checkpoint.every_steps=0"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    before = float(re.search(r"preference accuracy before training.*?: ([\d.]+)%", output).group(1))
    after = float(re.search(r"preference accuracy after training.*?: ([\d.]+)%", output).group(1))
    assert 40 <= before <= 65  # two answers of the same length: a random model is near chance
    assert "eval step 150: DPO loss" in output  # the held-out pairs' DPO loss, not a perplexity
    assert after >= before + 5  # 54% -> ~70% after 150 steps (~89% after the full 500)
    assert (tmp_path / "demo" / "reference_logps" / "logps.jsonl").is_file()
