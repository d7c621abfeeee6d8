"""GRPO (train.objective = "grpo"): recipe keys, prompt records, completion samples, and the
token-level loss against a direct computation (CPU, no processes).

    python -m pytest tests/unit/test_grpo.py -q
"""

from __future__ import annotations

import pytest
import torch
from data_helpers import chatml_tokenizer, write_jsonl
from transformers import Qwen2Config, Qwen2ForCausalLM

from clustertune.config import DataSection, GrpoSection, RecipeError, recipe_from_dict
from clustertune.data import DataError, check_records, prepare_dataset
from clustertune.data.prompts import record_to_prompt
from clustertune.data.records import RecordError
from clustertune.data.types import IGNORE_INDEX
from clustertune.shapes import SHAPES
from clustertune.worker.objectives.grpo import (GroupRelativePolicyOptimization, TokenLogProbModel,
                                                completion_sample)

U = {"role": "user", "content": "2+2?"}


def recipe(**grpo):
    return {"data": {"train_files": ["x.jsonl"], "max_length": 64},
            "train": {"max_steps": 1, "objective": "grpo", "global_batch_size": 16}, "grpo": grpo}


def test_recipe_keys_and_checks():
    r = recipe_from_dict(recipe(group_size=4, rewards=["number_after_marker", "format"]))
    assert r.grpo.group_size == 4 and r.grpo.scale_rewards
    with pytest.raises(RecipeError, match="multiple of grpo.group_size"):
        recipe_from_dict(recipe(group_size=3))
    tree = recipe(group_size=4)
    tree["data"]["eval_fraction"] = 0.1  # held-out prompts: greedy reward eval (tests/unit/test_grpo_eval.py)
    assert recipe_from_dict(tree).data.eval_fraction == 0.1


def test_prompt_records():
    assert record_to_prompt({"prompt": "2+2?", "answer": "4"}).prompt == [U]
    from_sft = record_to_prompt({"messages": [U, {"role": "assistant", "content": "4"}]})
    assert from_sft.prompt == [U] and from_sft.answer == "4"
    for record, kind in [({"prompt": "x"}, "missing field"), ({"answer": "4"}, "missing field"),
                         ({"prompt": "x", "answer": "4", "score": 1}, "unknown key")]:
        with pytest.raises(RecordError) as err:
            record_to_prompt(record)
        assert err.value.kind == kind


def test_prompt_files_checked_and_tokenized(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4"}, {"prompt": "x"}])
    data = DataSection(train_files=[str(path)], max_length=256)
    with pytest.raises(DataError, match=f"{path}:2: missing field"):
        check_records(data, "grpo")
    tok = chatml_tokenizer()
    prepared = prepare_dataset(data.model_copy(update={"skip_invalid": True}), tok, seed=0, cache_dir=tmp_path,
                               log=lambda *_: None, objective="grpo")
    (sample,) = prepared.train
    assert sample.answer == "4" and tok.decode(sample.input_ids).endswith("<|im_start|>assistant\n")


def test_token_level_loss_gradient_is_advantage_times_grad_logp():
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa")).float()
    samples = [completion_sample([5, 6, 7], [9, 10, 11], 1.5), completion_sample([5, 8], [12, 3], -0.5)]
    assert samples[0].targets == [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 11, IGNORE_INDEX] and samples[0].num_trained == 3

    direct = torch.zeros(())
    for s in samples:
        logps = torch.log_softmax(lm(input_ids=torch.tensor([s.input_ids])).logits[0].float(), -1)
        direct = direct - s.advantage * sum(logps[i, t] for i, t in enumerate(s.targets) if t != IGNORE_INDEX)
    direct.backward()
    expected = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()

    class Tok:
        eos_token_id = 2
    for packing in (False, True):
        grpo = GroupRelativePolicyOptimization(packing=packing, pad_id=0, grpo=GrpoSection(), tokenizer=Tok())
        model = TokenLogProbModel(lm)
        out = grpo.micro_batch_loss(model, samples, device=torch.device("cpu"))
        out.loss_sum.backward()
        assert out.loss_sum.item() == pytest.approx(-(1.5 * 3 - 0.5 * 2), abs=1e-6)  # ratio 1 in value
        for n, p in lm.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-4, msg=n)
        lm.zero_grad()


def test_grpo_demo_recipe_validates():
    from clustertune import demo
    r = recipe_from_dict(demo.demo_grpo_recipe_dict("runs/x-sft/final"))
    assert r.train.objective == "grpo" and r.train.global_batch_size % r.grpo.group_size == 0


def test_kl_to_the_adapter_off_reference_matches_a_direct_computation():
    from peft import LoraConfig, get_peft_model

    from clustertune.worker.objectives.grpo import k3
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa")).float()
    lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # policy != reference
    samples = [completion_sample([5, 6, 7], [9, 10, 11], 1.5), completion_sample([5, 8], [12, 3], -0.5)]
    beta = 0.3

    def token_logps(model, s):
        logps = torch.log_softmax(model(input_ids=torch.tensor([s.input_ids])).logits[0].float(), -1)
        return torch.stack([logps[i, t] for i, t in enumerate(s.targets) if t != IGNORE_INDEX])
    direct, kl_sum = torch.zeros(()), 0.0
    for s in samples:
        policy = token_logps(lm, s)
        with torch.no_grad(), lm.disable_adapter():
            reference = token_logps(lm, s)
        kl = k3(policy, reference)
        direct = direct + (-s.advantage * torch.exp(policy - policy.detach()) + beta * kl).sum()
        kl_sum += float(kl.sum())
    direct.backward()
    expected = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()
    assert kl_sum > 0

    class Tok:
        eos_token_id = 2
    grpo = GroupRelativePolicyOptimization(packing=True, pad_id=0, grpo=GrpoSection(kl_beta=beta), tokenizer=Tok())
    grpo.lm = lm
    out = grpo.micro_batch_loss(TokenLogProbModel(lm), samples, device=torch.device("cpu"))
    out.loss_sum.backward()
    assert out.loss_sum.item() == pytest.approx(direct.item(), abs=1e-5)
    assert out.metric_sums["kl"].item() == pytest.approx(kl_sum, rel=1e-5)
    for n, g in expected.items():
        torch.testing.assert_close(dict(lm.named_parameters())[n].grad, g, atol=1e-5, rtol=1e-4, msg=n)


def test_kl_needs_lora():
    tree = recipe(group_size=4, kl_beta=0.1)
    with pytest.raises(RecipeError, match="needs lora.enabled"):
        recipe_from_dict(tree)
    tree["lora"] = {"enabled": True}
    assert recipe_from_dict(tree).grpo.kl_beta == 0.1
