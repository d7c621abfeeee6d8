"""GRPO's held-out eval (train.objective = "grpo" with data.eval_files / data.eval_fraction): the
prompts are held out like SFT's, and at eval time each gets a greedy completion scored by the
recipe's rewards and exact match, logged to metrics.jsonl (one process, CPU, tiny model).

    python -m pytest tests/unit/test_grpo_eval.py -q
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from data_helpers import chatml_tokenizer, write_jsonl
from transformers import Qwen2Config, Qwen2ForCausalLM

from clustertune.config import DataSection, GrpoSection, ModelSection, RecipeError, recipe_from_dict
from clustertune.data import prepare_dataset
from clustertune.data.prompts import PromptSample
from clustertune.rewards import format_check
from clustertune.shapes import SHAPES
from clustertune.worker.evaluate import Evaluator
from clustertune.worker.metrics import MetricsSink
from clustertune.worker.model import load_tokenizer
from clustertune.worker.objectives.grpo import GroupRelativePolicyOptimization


def grpo_recipe(**data):
    return {"data": {"train_files": ["x.jsonl"], "max_length": 64, **data},
            "train": {"max_steps": 2, "objective": "grpo", "global_batch_size": 4},
            "grpo": {"group_size": 2, "max_new_tokens": 6, "rewards": ["exact_match", "format"]},
            "eval": {"every_steps": 1, "generate_samples": 1}}


def test_eval_sets_are_accepted_and_keep_best_is_refused():
    assert recipe_from_dict(grpo_recipe(eval_fraction=0.25)).data.eval_fraction == 0.25
    tree = grpo_recipe(eval_files=["e.jsonl"])
    tree["checkpoint"] = {"every_steps": 1, "keep_best": True}
    with pytest.raises(RecipeError, match="keep_best ranks checkpoints by eval loss"):
        recipe_from_dict(tree)


@pytest.mark.parametrize("held_out", ["eval_files", "eval_fraction"])
def test_held_out_prompts_are_prepared(tmp_path, held_out):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"{i}+{i}?", "answer": str(2 * i)} for i in range(8)])
    extra = ({"eval_files": [str(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "9+9?", "answer": "18"}]))]}
             if held_out == "eval_files" else {"eval_fraction": 0.25})
    data = DataSection(train_files=[str(train)], max_length=256, **extra)
    prepared = prepare_dataset(data, chatml_tokenizer(), seed=0, cache_dir=tmp_path, log=lambda *_: None,
                               objective="grpo")
    # eval_files: the 8 train prompts and the file's 1; eval_fraction: 2 of the 8 held out
    expected = (8, 1) if held_out == "eval_files" else (6, 2)
    assert (len(prepared.train), len(prepared.eval)) == expected
    assert (prepared.report.train_samples, prepared.report.eval_samples) == expected
    train_answers = {s.answer for s in prepared.train}
    assert all(isinstance(s, PromptSample) and s.answer not in train_answers for s in prepared.eval)


def test_eval_logs_the_greedy_reward_and_exact_match(tmp_path):
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa", initializer_range=0.4)
    lm = Qwen2ForCausalLM(config).float()
    tok = load_tokenizer(ModelSection(path="tiny"))
    recipe = recipe_from_dict(grpo_recipe(eval_fraction=0.1, packing=False))  # padded, as the objective below
    objective = GroupRelativePolicyOptimization(packing=False, pad_id=tok.pad_token_id, grpo=recipe.grpo,
                                                tokenizer=tok)
    engine = types.SimpleNamespace(module=lm)  # below ZeRO-3 generation needs only the module
    parts = types.SimpleNamespace(ds_engine=engine, lm=lm, ds_config={"zero_optimization": {"stage": 2}},
                                  layout=types.SimpleNamespace(global_batch_size=4))
    rt = types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
    objective.before_training(parts, None, rt=rt, run_dir=tmp_path, resuming=False, heartbeat=None)
    assert objective.eval_batch == 4  # no more sequences at once than a rollout: 2 prompts x group_size 2

    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("abc", "hello", "xy")]
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    said = [objective.decode(c) for c in objective.greedy.generate(ids, num_return_sequences=1, seed=0)]
    # The first two answers are what the model says greedily, the third is not: exact match 2/3.
    prompts = [PromptSample(ids[0], said[0]), PromptSample(ids[1], said[1]), PromptSample(ids[2], said[2] + "!")]
    sink = MetricsSink(tmp_path, enabled=True, total_steps=2)
    evaluator = Evaluator(recipe=recipe, objective=objective, samples=prompts, tokenizer=tok, ds_engine=engine, lm=lm,
                          rt=rt, sink=sink)
    assert evaluator.maybe_run(1, total_steps=2) is not None
    sink.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (scores,) = [r for r in records if "eval_exact_match" in r]
    assert scores["step"] == 1 and scores["eval_prompts"] == 3
    assert scores["eval_exact_match"] == pytest.approx(2 / 3)
    fmt = sum(format_check(s) for s in said)
    assert scores["eval_reward_mean"] == pytest.approx((2 + fmt) / 3)  # exact_match + format, as in training
    assert "eval_loss" not in scores and "eval_time_s" in scores
    (logged,) = [r for r in records if "samples" in r]
    assert logged["samples"] == [{"prompt": tok.decode(ids[0]), "completion": said[0], "reference": said[0]}]
