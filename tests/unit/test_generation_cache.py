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
    config = generation_config(max_new_tokens=16, temperature=0.0, top_p=1.0, num_return_sequences=1,
                               eos_ids=[EOS], pad_id=PAD, kv_cache="static")
    assert config.cache_implementation == "static" and config.disable_compile
    assert generation_config(max_new_tokens=4, temperature=0.0, top_p=1.0, num_return_sequences=1, eos_ids=[EOS],
                             pad_id=PAD, kv_cache="dynamic").cache_implementation is None
    lm = tiny_lm().eval()
    ids = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10]])
    config.return_dict_in_generate = True
    out = lm.generate(input_ids=ids, attention_mask=(ids != PAD).long(), generation_config=config)
    cache = out.past_key_values
    assert isinstance(cache, StaticCache)
    # [batch, kv heads, prompt width + max_new_tokens - 1 (the last new token is never fed back), head dim]
    assert cache.layers[0].keys.shape[2] == 4 + 16 - 1
    with pytest.raises(ValueError, match="kv_cache must be"):
        generation_config(max_new_tokens=4, temperature=0.0, top_p=1.0, num_return_sequences=1, eos_ids=[EOS],
                          pad_id=PAD, kv_cache="paged")
