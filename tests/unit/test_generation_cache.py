"""worker/generation.py's KV cache: the static cache (allocated once, grpo.kv_cache = "static") gives
the same greedy completions as the dynamic one on the tiny model, for a left-padded batch (CPU, no
processes).

    python -m pytest tests/unit/test_generation_cache.py -q      # on a GPU machine it also runs on CUDA
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache

from clustertune.shapes import SHAPES
from clustertune.worker.generation import HFGenerator, generation_config

PAD, EOS = 0, 2
# Prompts of different lengths: the batch is left-padded, so the cache holds padding slots too.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [40, 41, 42, 43, 44]]


def tiny_lm() -> Qwen2ForCausalLM:  # fp32: greedy ties cannot flip between the two caches
    torch.manual_seed(0)
    # A wide init so that greedy decoding wanders over the vocabulary instead of repeating one token.
    config = Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa", initializer_range=0.4)
    return Qwen2ForCausalLM(config).float()


def completions(lm, kv_cache: str) -> list[list[int]]:
    engine = types.SimpleNamespace(module=lm)  # generation_weights is a no-op below ZeRO-3
    generator = HFGenerator(engine, lm, zero_stage=2, pad_id=PAD, eos_ids=[EOS], max_new_tokens=16,
                            kv_cache=kv_cache, temperature=0.0)
    return generator.generate(PROMPTS, num_return_sequences=1, seed=3)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on the GPU machine: transformers' GPU path too


@pytest.mark.parametrize("device", DEVICES)
def test_static_cache_greedy_equals_dynamic(device):
    lm = tiny_lm().to(device)
    static, dynamic = completions(lm, "static"), completions(lm, "dynamic")
    assert static == dynamic
    assert len({t for c in static for t in c}) > 8  # a real test: varied tokens, not one repeated


def test_static_cache_sampling_with_a_seed_equals_dynamic():
    lm = tiny_lm()
    engine = types.SimpleNamespace(module=lm)
    runs = [HFGenerator(engine, lm, zero_stage=2, pad_id=PAD, eos_ids=[EOS], max_new_tokens=12, temperature=1.0,
                        kv_cache=cache).generate(PROMPTS, num_return_sequences=3, seed=7) for cache in ("static", "dynamic")]
    assert runs[0] == runs[1] and len(runs[0]) == 12


def test_the_static_config_builds_a_static_cache_sized_prompt_plus_new_tokens():
    config = generation_config(max_new_tokens=16, eos_ids=[EOS], pad_id=PAD, kv_cache="static")
    assert config.cache_implementation == "static" and config.disable_compile
    assert generation_config(max_new_tokens=4, eos_ids=[EOS], pad_id=PAD, kv_cache="dynamic").cache_implementation is None
    lm = tiny_lm().eval()
    ids = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10]])
    config.return_dict_in_generate = True
    out = lm.generate(input_ids=ids, attention_mask=(ids != PAD).long(), generation_config=config)
    cache = out.past_key_values
    assert isinstance(cache, StaticCache)
    # [batch, kv heads, prompt width + max_new_tokens - 1 (the last new token is never fed back), head dim]
    assert cache.layers[0].keys.shape[2] == 4 + 16 - 1
    with pytest.raises(ValueError, match="kv_cache must be"):
        generation_config(max_new_tokens=4, eos_ids=[EOS], pad_id=PAD, kv_cache="paged")


def test_a_sampled_completion_depends_on_its_own_seed_only():
    """Row-seeded sampling: a prompt's completions are the same whether it is generated alone or
    beside other prompts (another rank split, another batch), as long as its key is the same; the
    key and the seed change them; greedy is untouched by seeds; the global RNG is not used."""
    lm = tiny_lm()
    engine = types.SimpleNamespace(module=lm)
    sampler = HFGenerator(engine, lm, zero_stage=2, pad_id=PAD, eos_ids=[EOS], max_new_tokens=12, temperature=1.0)
    rng = torch.get_rng_state()
    together = sampler.generate(PROMPTS, num_return_sequences=3, seed=7, prompt_keys=[10, 11, 12, 13])
    alone = sampler.generate([PROMPTS[2]], num_return_sequences=3, seed=7, prompt_keys=[12])
    assert together[6:9] == alone
    assert torch.equal(rng, torch.get_rng_state())
    assert sampler.generate([PROMPTS[2]], num_return_sequences=3, seed=7, prompt_keys=[13]) != alone
    assert sampler.generate([PROMPTS[2]], num_return_sequences=3, seed=8, prompt_keys=[12]) != alone
    assert len({tuple(c) for c in alone}) > 1  # the group's completions differ from each other


def test_row_seeded_sampling_draws_from_the_softmax():
    """The Gumbel-max draw over fixed logits: frequencies match softmax(logits / T) (4,000 rows,
    tolerance 0.03), and top-p removes the tail."""
    from clustertune.worker.generation import row_seeded_sampling
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    rows = 4000
    process = row_seeded_sampling(list(range(rows)), temperature=0.5, top_p=1.0, prompt_width=3)
    picks = process(torch.zeros(rows, 3, dtype=torch.long), logits.repeat(rows, 1)).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / rows
    assert torch.allclose(freq, torch.softmax(logits / 0.5, -1), atol=0.03)
    nucleus = row_seeded_sampling(list(range(rows)), temperature=1.0, top_p=0.7, prompt_width=3)
    picks = nucleus(torch.zeros(rows, 3, dtype=torch.long), logits.repeat(rows, 1)).argmax(-1)
    assert set(picks.tolist()) == {0, 1}  # p = 0.64, 0.24, 0.09, 0.03: the top two reach 0.7
