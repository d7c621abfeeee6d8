"""Evaluation in the real worker (2 CPU processes over gloo, tiny Qwen2): eval loss independent of
the world size and of packing, an uneven eval set counted exactly once, generation samples under
ZeRO-3, and checkpoint.keep_best with `clustertune export --best`.

    python -m pytest tests/integration/test_eval.py -q      # ~1.5 min on 2 CPU cores
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clustertune.worker.checkpoint import tag_for
from clustertune.worker.evaluate import best_step
from conftest import ROOT, metrics, run_train, write_recipe

pytestmark = pytest.mark.integration

EVAL_SIZE = 13  # not divisible by the world size (2) nor by the micro-batch size (2)


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """(eval file, its words, trained tokens). With the char-level tokenizer an answer WORD trains
    len(WORD) tokens plus the closing <|im_end|>: the exact count, independent of the pipeline."""
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9))) for _ in range(EVAL_SIZE)]
    with open(path, "w") as f:
        for word in words:
            f.write(json.dumps({"messages": [{"role": "user", "content": "up " + word},
                                             {"role": "assistant", "content": word.upper()}]}) + "\n")
    return path, words, sum(len(w) + 1 for w in words)


def _recipe(tmp_path, task_dir, eval_set, name, *, data=None, **sections):
    # max_length 128: no sample is truncated, so every eval answer is trained in full
    data = {"eval_files": [str(eval_set[0])], "max_length": 128, **(data or {})}
    run_dir = tmp_path / name
    return write_recipe(tmp_path / f"{name}.toml", task_dir, run_dir, data=data, **sections), run_dir


def _evals(run_dir):
    return [m for m in metrics(run_dir) if "eval_loss" in m]


def test_eval_loss_is_the_same_on_one_and_two_ranks_and_counts_an_uneven_set_once(tmp_path, task_dir, eval_set):
    """Identical training on 1 and 2 ranks gives identical weights (test_worker), so the eval at
    steps 2 and 4 must agree; 13 samples over 2 ranks with micro-batches of 2 leaves rank 1 a
    filler micro-batch, and every trained token of the set is counted exactly once."""
    results = {}
    for nproc in (1, 2):
        recipe, run_dir = _recipe(tmp_path, task_dir, eval_set, f"n{nproc}", train={"max_steps": 4},
                                  eval={"every_steps": 2})
        proc = run_train(recipe, nproc=nproc)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[nproc] = _evals(run_dir)
        assert "eval step 4: loss" in proc.stderr
    expected_tokens = eval_set[2]
    assert [r["step"] for r in results[1]] == [r["step"] for r in results[2]] == [2, 4]
    for one, two in zip(results[1], results[2]):
        assert one["eval_tokens"] == two["eval_tokens"] == expected_tokens
        assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)
        assert two["eval_ppl"] == pytest.approx(math.exp(two["eval_loss"]), rel=1e-9)
    assert results[2][1]["eval_loss"] < results[2][0]["eval_loss"]  # it learns the task


def test_zero3_packed_eval_equals_unpacked_and_logs_generations(tmp_path, task_dir, eval_set):
    """ZeRO-3 on 2 ranks, packed vs padded micro-batches (training too): the same per-sample
    losses give the same eval loss. The packed run also generates 3 samples greedily (rank 1 gets
    one prompt and runs a filler generate, kept in step by synced_gpus)."""
    runs = {}
    for packing in (False, True):
        recipe, run_dir = _recipe(
            tmp_path, task_dir, eval_set, f"packed{int(packing)}",
            data={"packing": packing}, zero={"stage": 3}, train={"max_steps": 4, "micro_batch_tokens": 256},
            eval={"every_steps": 2, "generate_samples": 3 if packing else 0, "max_new_tokens": 6})
        proc = run_train(recipe)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[packing] = run_dir
    padded, packed = _evals(runs[False]), _evals(runs[True])
    assert [r["step"] for r in packed] == [2, 4]
    for a, b in zip(padded, packed):
        assert a["eval_tokens"] == b["eval_tokens"] == eval_set[2]
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)

    generations = [m for m in metrics(runs[True]) if "samples" in m]
    assert [g["step"] for g in generations] == [2, 4]
    assert not any("samples" in m for m in metrics(runs[False]))
    tok = AutoTokenizer.from_pretrained(task_dir / "tokenizer")
    words = eval_set[1]
    for g in generations:
        assert len(g["samples"]) == 3
        for sample, word in zip(g["samples"], words):  # the first eval samples, in file order
            assert sample["prompt"] == tok.apply_chat_template([{"role": "user", "content": "up " + word}],
                                                               tokenize=False, add_generation_prompt=True)
            assert sample["reference"] == word.upper()
            assert isinstance(sample["completion"], str) and len(sample["completion"]) <= 6


def test_keep_best_keeps_and_exports_the_best_eval_step(tmp_path, task_dir, eval_set):
    """A constant LR of 3e-2 makes the eval loss go up and down; with keep_last = 1 rotation must
    still keep the checkpoint of the lowest eval loss, and export --best must export it."""
    recipe, run_dir = _recipe(
        tmp_path, task_dir, eval_set, "best",
        train={"max_steps": 12, "lr": 3e-2, "schedule": "constant", "warmup_steps": 0},
        eval={"every_steps": 2}, checkpoint={"every_steps": 2, "keep_last": 1, "keep_best": True})
    proc = run_train(recipe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = [(r["step"], r["eval_loss"]) for r in _evals(run_dir)]
    assert [s for s, _ in history] == [2, 4, 6, 8, 10, 12]
    best, best_loss = best_step(history)
    assert best != 12, f"the case needs a best eval before the last step: {history}"
    assert min(loss for _, loss in history) == best_loss

    root = run_dir / "checkpoints"
    assert json.loads((root / "best.json").read_text()) == {"step": best, "eval_loss": best_loss,
                                                             "tag": tag_for(best)}
    assert sorted(p.name for p in root.glob("step_*")) == [tag_for(best), tag_for(12)]
    assert f"best eval loss {best_loss:.4f} at step {best}" in proc.stderr

    out = tmp_path / "best_export"
    exported = subprocess.run([sys.executable, "-m", "clustertune.cli", "export", str(run_dir), "--best", "--out",
                               str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert exported.returncode == 0, exported.stderr
    assert f"exported best step {best}" in exported.stdout
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    trained = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag_for(best))
    model = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in trained.items():
        torch.testing.assert_close(model[name.removeprefix("lm.")], tensor, msg=name)
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    assert not torch.equal(final["model.norm.weight"], model["model.norm.weight"])
