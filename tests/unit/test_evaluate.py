"""Evaluation: the per-rank eval plan (every sample exactly once, matched forwards), best-step
selection and its checkpoint bookkeeping, generation prompts, and the keep_best recipe checks."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from clustertune.worker import checkpoint
from clustertune.config import RecipeError, recipe_from_dict
from clustertune.data import tokenize_conversation
from clustertune.worker.evaluate import (best_step, eval_loss, eval_plan, generation_prompt, is_better, is_eval_step,
                                  last_turn, perplexity, resumed_best, template_headers)
from clustertune.worker.model import TokenLossModel
from clustertune.worker.objectives.sft import SupervisedFineTuning
from clustertune.shapes import SHAPES
from data_helpers import bpe_chatml_tokenizer, chatml_tokenizer, r1_tokenizer


# ------------------------------------------------------------------------------------ eval plan

@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_eval_plan_covers_every_sample_exactly_once(world, packing):
    for n in range(0, 18):
        lengths = [(7 * i) % 23 + 3 for i in range(n)]  # uneven lengths
        for micro in (1, 2, 3):
            plan = eval_plan(lengths, world_size=world, micro_batch_size=micro, packing=packing, token_budget=40)
            assert len(plan) == world
            counts = Counter(i for rank in plan for group in rank for i in group)
            assert counts == Counter(range(n)), (n, micro, plan)
            depths = {len(rank) for rank in plan}
            assert len(depths) == 1 and depths.pop() >= 1  # same number of forwards on every rank
            for rank in plan:
                for group in rank:
                    if packing:
                        assert sum(lengths[i] for i in group) <= 40
                    else:
                        assert len(group) <= micro
            assert plan == eval_plan(lengths, world_size=world, micro_batch_size=micro, packing=packing,
                                     token_budget=40)


def test_eval_plan_uneven_set_gives_short_ranks_filler_micro_batches():
    plan = eval_plan([5] * 7, world_size=2, micro_batch_size=2, packing=False, token_budget=64)
    assert [len(g) for g in plan[0]] == [2, 2]  # 4 samples
    assert [len(g) for g in plan[1]] == [2, 1]  # 3 samples
    plan = eval_plan([5] * 5, world_size=2, micro_batch_size=1, packing=False, token_budget=64)
    assert [len(g) for g in plan[1]] == [1, 1, 0]  # filler: [] runs one ignored token
    plan = eval_plan([5], world_size=3, micro_batch_size=4, packing=True, token_budget=64)
    assert plan == [[[0]], [[]], [[]]]


def test_eval_plan_groups_samples_of_similar_length():
    lengths = [3, 30, 4, 29, 5, 28, 6, 27]
    plan = eval_plan(lengths, world_size=2, micro_batch_size=2, packing=False, token_budget=64)
    for rank in plan:
        for group in rank:
            assert max(lengths[i] for i in group) - min(lengths[i] for i in group) <= 2


@dataclass
class S:
    input_ids: list
    targets: list

    @property
    def num_trained(self) -> int:
        return sum(t != -100 for t in self.targets)


def _samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        targets = ids[1:] + [-100]
        targets[: n // 2] = [-100] * (n // 2)  # prompt without loss
        out.append(S(ids, targets))
    return out


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_eval_loss_over_simulated_ranks_equals_one_pass(packing):
    """Each simulated rank's (loss, tokens) from its share of the plan, combined token-weighted as
    the all_reduce does, equals the mean over all trained tokens computed sample by sample."""
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa")).float()
    model = TokenLossModel(lm).eval()
    samples = _samples([9, 17, 4, 12, 25, 7, 10])
    with torch.no_grad():
        per_sample = [model(**_tensors(s)).item() for s in samples]
    reference = sum(per_sample) / sum(s.num_trained for s in samples)
    lengths = [len(s.input_ids) for s in samples]
    for world in (1, 2, 3):
        plan = eval_plan(lengths, world_size=world, micro_batch_size=2, packing=packing, token_budget=32)
        objective = SupervisedFineTuning(packing=packing, pad_id=0)
        parts = [eval_loss(model, objective, samples, plan[r], device=torch.device("cpu"))
                 for r in range(world)]
        tokens = sum(t for _, t in parts)
        assert tokens == sum(s.num_trained for s in samples)
        combined = sum(loss * t for loss, t in parts) / tokens
        assert combined == pytest.approx(reference, rel=1e-5), (world, parts)


def _tensors(sample):
    from clustertune.worker.batching import collate
    return collate([sample], packing=False, pad_id=0)


# ------------------------------------------------------------------------------ when, and best

def test_is_eval_step():
    assert [s for s in range(1, 11) if is_eval_step(s, every_steps=4, total_steps=10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if is_eval_step(s, every_steps=0, total_steps=10)] == [10]
    assert [s for s in range(1, 9) if is_eval_step(s, every_steps=4, total_steps=8)] == [4, 8]


def test_best_step_picks_the_lowest_loss_earliest_on_ties_and_skips_nan():
    assert best_step([(2, 3.0), (4, 2.5), (6, 2.7), (8, 2.9)]) == (4, 2.5)
    assert best_step([(2, 3.0), (4, 2.5), (6, 2.5)]) == (4, 2.5)
    assert best_step([(2, float("nan")), (4, 2.5), (6, float("nan"))]) == (4, 2.5)
    assert best_step([]) is None
    assert is_better(1.0, None) and not is_better(float("nan"), None) and not is_better(2.0, 2.0)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert perplexity(1e6) == float("inf")


def test_resumed_best_drops_a_best_from_steps_the_resumed_run_redoes():
    assert resumed_best({"step": 4, "eval_loss": 2.0}, start_step=6) == (4, 2.0)
    assert resumed_best({"step": 6, "eval_loss": 2.0}, start_step=6) == (6, 2.0)
    assert resumed_best({"step": 8, "eval_loss": 2.0}, start_step=6) is None
    assert resumed_best(None, start_step=6) is None


def _save(run_dir, step):
    directory = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(step)
    directory.mkdir(parents=True)
    (directory / "weights.pt").write_text("w")
    checkpoint.write_marker(directory, {"step": step})


def test_keep_best_bookkeeping_keeps_the_best_checkpoint_through_rotation(tmp_path):
    """The train loop's order at an eval+checkpoint step: eval, save, record best, rotate with
    the best protected. The best (step 6) is neither the newest nor among the last two."""
    losses = {2: 3.1, 4: 2.6, 6: 2.2, 8: 2.4, 10: 2.3, 12: 2.9}
    best = None
    for step, loss in losses.items():
        if is_better(loss, None if best is None else best[1]):
            best = (step, loss)
        _save(tmp_path, step)
        checkpoint.write_best(tmp_path, step=best[0], eval_loss=best[1])
        checkpoint.rotate(tmp_path, keep_last=2, protect={best[0]})
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [6, 10, 12]
    assert checkpoint.read_best(tmp_path) == {"step": 6, "eval_loss": 2.2, "tag": "step_00000006"}
    assert best_step(list(losses.items())) == (6, 2.2)
    step, directory = checkpoint.best_checkpoint(tmp_path)
    assert step == 6 and directory.name == "step_00000006"
    # a best whose checkpoint is gone (or incomplete) is not offered for export
    (directory / checkpoint.MARKER).unlink()
    assert checkpoint.best_checkpoint(tmp_path) is None


def test_best_checkpoint_absent_without_record(tmp_path):
    _save(tmp_path, 2)
    assert checkpoint.read_best(tmp_path) is None and checkpoint.best_checkpoint(tmp_path) is None
    (checkpoint.checkpoint_root(tmp_path) / checkpoint.BEST).write_text("{torn")
    assert checkpoint.read_best(tmp_path) is None


# ---------------------------------------------------------------------------- generation prompts

CONVERSATION = [{"role": "user", "content": "up abc"}, {"role": "assistant", "content": "ABC"},
                {"role": "user", "content": "up de"}, {"role": "assistant", "content": "DE"}]


@pytest.mark.parametrize("make", [chatml_tokenizer, bpe_chatml_tokenizer, r1_tokenizer], ids=["chatml", "bpe", "r1"])
def test_generation_prompt_is_the_inference_rendering_of_the_conversation_before_its_last_answer(make):
    tok = make()
    sample = tokenize_conversation(tok, CONVERSATION, max_length=512, overlength="truncate")
    prompt = generation_prompt(tok, sample, template_headers(tok))
    expected = tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.text == expected
    assert prompt.ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert prompt.reference == "DE"


def test_template_headers():
    assert template_headers(chatml_tokenizer()) == ("<|im_start|>assistant\n", "<|im_start|>assistant\n")
    assert template_headers(r1_tokenizer()) == ("<｜Assistant｜>", "<｜Assistant｜><think>\n")


def test_last_turn():
    assert last_turn([-100, -100, 5, 6, -100, -100, 7, 8, 9, -100]) == (6, 9)
    assert last_turn([-100, -100]) == (0, 0)
    assert last_turn([1, 2, -100]) == (0, 2)


def test_generation_prompt_none_without_a_trained_turn():
    tok = chatml_tokenizer()
    assert generation_prompt(tok, S([1, 2, 3], [-100, -100, -100]), None) is None


# ------------------------------------------------------------------------------- recipe checks

def _recipe(**sections):
    base = {"data": {"train_files": ["train.jsonl"], "eval_fraction": 0.1}, "train": {"max_steps": 10}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return recipe_from_dict(base)


def test_keep_best_needs_eval_steps_on_checkpoint_steps():
    with pytest.raises(RecipeError) as err:
        _recipe(checkpoint={"keep_best": True, "every_steps": 4}, eval={"every_steps": 6})
    assert "eval.every_steps (6)" in str(err.value) and "checkpoint.every_steps (4)" in str(err.value)
    _recipe(checkpoint={"keep_best": True, "every_steps": 2}, eval={"every_steps": 6})
    _recipe(checkpoint={"keep_best": True, "every_steps": 4}, eval={"every_steps": 0})  # end only
    _recipe(checkpoint={"keep_best": False, "every_steps": 4}, eval={"every_steps": 6})  # not needed


def test_keep_best_needs_an_eval_set_and_checkpoints():
    with pytest.raises(RecipeError, match="data.eval_files or data.eval_fraction"):
        _recipe(data={"eval_fraction": 0.0}, checkpoint={"keep_best": True, "every_steps": 2})
    with pytest.raises(RecipeError, match="checkpoint.every_steps"):
        _recipe(checkpoint={"keep_best": True, "every_steps": 0})
    assert json.loads(json.dumps(_recipe(data={"eval_files": ["e.jsonl"], "eval_fraction": 0.0},
                                         checkpoint={"keep_best": True, "every_steps": 2}).to_toml_dict()))


def test_generation_uses_dense_attention_while_training_uses_the_varlen_kernel():
    """The varlen kernel needs a packed row's cu_seqlens, which generate does not pass (seen on
    the GPU machine: KeyError 'cu_seq_lens_q'); generation switches to sdpa and back."""
    from clustertune.worker.kernels import VARLEN_ATTENTION, dense_attention
    lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa"))
    lm.config._attn_implementation = VARLEN_ATTENTION
    with pytest.raises(RuntimeError):
        with dense_attention(lm.config):
            assert lm.config._attn_implementation == "sdpa"
            raise RuntimeError("generate failed")
    assert lm.config._attn_implementation == VARLEN_ATTENTION
    lm.config._attn_implementation = "eager"
    with dense_attention(lm.config):
        assert lm.config._attn_implementation == "eager"


def test_dpo_eval_record_counts_pairs_and_has_no_perplexity():
    """A DPO eval loss is per preference pair: metrics.jsonl gets eval_pairs, never an eval_ppl or
    an eval_tokens that would hold a pair count."""
    from clustertune.worker.evaluate import EvalResult
    dpo = EvalResult(step=4, loss=0.61, tokens=200, seconds=1.5, units="pairs").record()
    assert dpo == {"step": 4, "eval_loss": 0.61, "eval_pairs": 200, "eval_time_s": 1.5}
    sft = EvalResult(step=4, loss=1.0, tokens=900, seconds=1.5).record()
    assert sft["eval_tokens"] == 900 and sft["eval_ppl"] == pytest.approx(2.718281828, rel=1e-6)
