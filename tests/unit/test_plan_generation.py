"""GRPO's rollout memory (plan_generation.py) and what `clustertune plan` does with it: hand-computed
KV cache, prefill, logits and gather sizes; options whose rollout does not fit are not recommended;
a set-up whose rollout fits no option is refused with its numbers and fixes; the LoRA whole-base table.

    python -m pytest tests/unit/test_plan_generation.py -q
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from clustertune.cli import main
from clustertune.errors import UserError
from clustertune.plan import GIB, Option, PlanInput, gpu_memory, plan
from clustertune.plan_generation import (GenerationMemoryError, RolloutSpec, check_rollout_fits, decode_logits_bytes,
                                         fits, kv_cache_bytes, lora_fit_table, max_new_tokens, max_prompts_per_rank,
                                         prefill_bytes, rollout_memory, rollout_spec, with_rollout)
from clustertune.shapes import SHAPES

R1_32B = SHAPES["deepseek-r1-distill-qwen-32b"]  # 64 layers, hidden 5120, 8 KV heads x 128, vocab 152064
ROOT = Path(__file__).resolve().parents[2]
GRPO_RECIPE = ROOT / "configs" / "r1-distill-32b-grpo-lora.toml"
H100 = 79.6


def job(world: int = 8, **changes) -> PlanInput:
    inp = PlanInput(R1_32B, tokens_per_micro_batch=2 * 1536, seq_len=1536, world_size=world, gpus_per_node=8,
                    gpu_mem_gib=H100, host_mem_gib=None)
    return dataclasses.replace(inp, **changes)


# 64 completions per step over 8 GPUs: 8 per GPU, 512-token prompts + 1024 new tokens
SPEC = rollout_spec(global_batch_size=64, group_size=8, max_length=512, max_new_tokens=1024)


def test_kv_cache_prefill_and_logits_by_hand():
    # 8 seqs x 1536 tokens x 64 layers x 2 (k, v) x 8 KV heads x 128 x 2 B = 3 GiB exactly
    assert kv_cache_bytes(R1_32B, sequences=8, cache_tokens=1536, element_bytes=2) == 3 * GIB
    # 8 x 512 prompt tokens x 2 B x (2 x 5120 + 3 x 27648)
    assert prefill_bytes(R1_32B, sequences=8, prompt_tokens=512, element_bytes=2) == 8 * 512 * 2 * 93184 == 763363328
    assert decode_logits_bytes(R1_32B, sequences=8) == 8 * 152064 * 16


def test_prompts_are_spread_over_the_ranks_like_the_rollout():
    spec = RolloutSpec(prompts_per_step=9, group_size=4, prompt_tokens=10, max_new_tokens=5)
    assert [spec.prompts_per_rank(w) for w in (1, 2, 4, 9, 16)] == [9, 5, 3, 1, 1]  # prompt_indices[rank::world]
    assert spec.sequences_per_rank(4) == 12 and spec.cache_tokens == 15
    assert SPEC.prompts_per_step == 8 and SPEC.sequences_per_rank(8) == 8


def test_rollout_adds_gather_kv_prefill_runtime_and_slack_to_the_engine_states():
    inp, zero3 = job(), Option(3, False, False, True)
    mem = rollout_memory(inp, zero3, SPEC)
    train = gpu_memory(inp, zero3)
    assert mem.engine_states == pytest.approx(train.params + train.optimizer + train.grads + train.comm_buckets)
    assert mem.gathered_weights == pytest.approx(2 * R1_32B.parameter_count() / GIB)  # 61.03 GiB of bf16
    assert mem.kv_cache == 3.0 and mem.prefill == pytest.approx(0.7109375) and mem.sequences == 8
    assert mem.runtime == 1.5  # CUDA context + NCCL
    assert mem.fragmentation == pytest.approx(0.1 * (3.0 + 0.7109375))  # none on the gathered weights
    assert mem.total == pytest.approx(mem.engine_states + mem.gathered_weights + 3.0 + 0.7109375 + 1.5
                                      + 0.1 * 3.7109375)


@pytest.mark.parametrize("option,world,gathered", [
    (Option(2, False, False, True), 8, False),  # stage 1/2: weights whole on every GPU already
    (Option(1, False, False, False), 8, False),
    (Option(3, False, False, True), 8, True),
    (Option(3, False, False, True), 1, False),  # one GPU: a gathered param is a view of its partition
    (Option(3, False, True, True), 1, True),  # param offload: the weights come from the host
])
def test_the_whole_model_is_gathered_only_under_zero3(option, world, gathered):
    mem = rollout_memory(job(world), option, SPEC)
    assert (mem.gathered_weights > 0) == gathered


def test_an_option_fits_only_when_its_rollout_fits_too():
    # LoRA 32B on 8 x H100: ZeRO-3 trains in 15 GiB but gathers 61.0 GiB of weights for the rollout:
    # 8.9 engine states (7.6 partition + 0.9 reduce bucket + LoRA states) + 61.0 + 3.0 KV + 0.7 prefill
    # + 1.5 runtime + 0.37 slack = 75.5 GiB > 71.6 budget; ZeRO-1/2 keep the base whole and fit both
    # (61.5 + 3.0 + 0.7 + 1.5 + 0.37 = 67.0 GiB at ZeRO-1, + 0.25 for ZeRO-1's fp32 accumulation
    # buffer of the LoRA parameters, whose bf16 gradients immediate_grad_update frees: 67.3).
    inp = job(lora_rank=16)
    training = plan(inp)
    grpo = with_rollout(training, SPEC)
    zero3 = next(e for e in training.estimates if e.option == Option(3, False, False, True))
    assert zero3.fits  # the training step alone
    assert not next(e for e in grpo.plan.estimates if e.option == zero3.option).fits
    assert grpo.rollouts[zero3.option].total == pytest.approx(75.48, abs=0.01)
    assert grpo.plan.recommended.option.stage in (1, 2)
    assert grpo.recommended_rollout.total == pytest.approx(67.30, abs=0.01)
    check_rollout_fits(grpo)  # something fits: no error


def test_largest_batch_and_length_that_fit_are_the_edge():
    inp, option = job(lora_rank=16), Option(2, False, False, True)
    most = max_prompts_per_rank(inp, option, SPEC)
    assert most == 2  # 16 completions of 1536 tokens: 6 GiB of KV cache
    assert fits(inp, rollout_memory(inp, option, dataclasses.replace(SPEC, prompts_per_step=most * 8)))
    assert not fits(inp, rollout_memory(inp, option, dataclasses.replace(SPEC, prompts_per_step=(most + 1) * 8)))
    longest = max_new_tokens(inp, option, SPEC)
    assert fits(inp, rollout_memory(inp, option, dataclasses.replace(SPEC, max_new_tokens=longest)))
    assert not fits(inp, rollout_memory(inp, option, dataclasses.replace(SPEC, max_new_tokens=longest + 1)))


def test_a_rollout_that_fits_no_option_is_refused_with_numbers_and_fixes():
    # full fine-tuning: the options that train in 80 GB are the offload ones; the leanest rollout,
    # ZeRO-2 + opt offload, holds the whole 61.0 GiB of weights + 9 GiB of KV cache for 4096 new tokens
    long = rollout_spec(global_batch_size=64, group_size=8, max_length=512, max_new_tokens=4096)
    grpo = with_rollout(plan(job()), long)
    assert any(e.fits for e in grpo.training.estimates) and grpo.plan.recommended is None
    with pytest.raises(GenerationMemoryError) as err:
        check_rollout_fits(grpo)
    text = str(err.value)
    assert ("during generation each GPU holds 73.2 GiB with ZeRO-2 + opt offload + ckpt" in text
            and "over the 71.6 GiB budget" in text and "engine states 61.0 + gathered bf16 weights 0.0" in text)
    assert "KV cache 9.0 (8 completions x (512 prompt + 4096 new tokens) x 64 layers x 2 x 8 KV heads x 128 x 2 B)" in text
    assert "even one prompt's 8 completions do not fit" in text
    assert "a shorter grpo.max_new_tokens: at most 3365 fits (now 4096)" in text
    assert "LoRA (lora.enabled = true) would not fit this rollout either" in text
    assert "more GPUs do not help here" in text
    assert isinstance(err.value, UserError) and err.value.exit_code == 2


def test_the_refusal_names_more_gpus_or_a_smaller_batch_when_they_help():
    many = rollout_spec(global_batch_size=256, group_size=8, max_length=512, max_new_tokens=1024)  # 32 per GPU
    with pytest.raises(GenerationMemoryError) as err:
        check_rollout_fits(with_rollout(plan(job(lora_rank=16)), many))
    text = str(err.value)
    assert "at most 2 prompts x grpo.group_size 8 = 16 fit (now 4 x 8 = 32: train.global_batch_size = 128 on 8 GPUs" in text
    assert "more GPUs: 16 GPUs of this size would fit both the training step and the rollout (now 8" in text


def test_lora_fit_table_for_the_32b_base_whole_on_each_gpu():
    gpus = {"h100": 79.6, "a100": 80.0, "h20": 95.6, "h200": 140.4, "a100-40": 40.0}
    rows = {r.gpu: r for r in lora_fit_table(job(lora_rank=16), SPEC, gpus)}
    assert rows["h100"].base == pytest.approx(2 * R1_32B.parameter_count() / GIB)  # 61.0 GiB, whole
    # adapters (134.2M params) in bf16 + their fp32 master and Adam states: 14 B/param (gradients partitioned)
    assert rows["h100"].adapter_states == pytest.approx(0.5, abs=0.05)
    assert {name: r.max_prompts for name, r in rows.items()} == {"h100": 2, "a100": 2, "h20": 5, "h200": 15,
                                                                 "a100-40": 0}
    assert [name for name, r in rows.items() if r.fits(0.1)] == ["h100", "a100", "h20", "h200"]
    assert lora_fit_table(job(lora_rank=16), None, {"h100": 79.6})[0].rollout is None  # not GRPO: training only


# ------------------------------------------------------------------------------- clustertune plan

H100_NODE = ["--gpu", "h100", "--nodes", "1", "--gpus-per-node", "8", "--samples", "7000", "--tokens-per-sample", "900"]


def test_plan_of_the_shipped_grpo_recipe_prints_the_rollout_and_the_lora_table(capsys):
    assert main(["plan", str(GRPO_RECIPE), *H100_NODE]) == 0
    out = capsys.readouterr().out
    assert "GRPO rollout (between optimizer steps, GiB per GPU): 8 prompts x grpo.group_size 8 per step" in out
    assert "static KV cache of 512 prompt (data.max_length) + 1024 new tokens" in out
    assert "1536 tokens per micro-batch" not in out and "3072 tokens per micro-batch (max_length 1536)" in out
    assert "recommended: ZeRO-1 + ckpt" in out or "recommended: ZeRO-2 + ckpt" in out
    assert "up to 2 prompts (16 completions) per GPU fit" in out
    assert "h200        140.4 |   61.0" in out  # the LoRA whole-base table


def test_plan_refuses_a_grpo_recipe_whose_rollout_cannot_fit(capsys):
    code = main(["plan", str(GRPO_RECIPE), *H100_NODE, "--set", "lora.enabled=false", "--set", "grpo.kl_beta=0.0",
                 "--set", "grpo.max_new_tokens=8192"])
    assert code == 2
    err = capsys.readouterr().err
    assert "the GRPO rollout does not fit" in err and "grpo.max_new_tokens" in err


def test_lora_fit_flag_needs_no_gpu_and_takes_a_shape(capsys):
    assert main(["plan", str(GRPO_RECIPE), "--lora-fit", "qwen2.5-7b", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "on qwen2.5-7b with its bf16 base whole on every GPU (ZeRO-2 + ckpt: no gather for generation)" in out
    assert all(f"\n{gpu} " in out for gpu in ("h100", "a100", "h20", "h200"))
    assert main(["plan", str(GRPO_RECIPE), "--lora-fit", "nope", "--gpus-per-node", "8"]) == 2
