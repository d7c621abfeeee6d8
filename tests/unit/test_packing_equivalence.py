"""Padding-free packing is exact: a packed row gives each sample the same per-token losses and
the same gradients as running the samples one by one (fp32, CPU)."""

from dataclasses import dataclass

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from clustertune.worker.batching import collate
from clustertune.worker.model import TokenLossModel
from clustertune.shapes import SHAPES


@dataclass
class S:
    input_ids: list
    targets: list


def make_samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        targets = ids[1:] + [-100]
        targets[: n // 3] = [-100] * (n // 3)  # a prompt part without loss
        out.append(S(ids, targets))
    return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_row_equals_samples_alone():
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa")).float()
    model = TokenLossModel(lm)
    samples = make_samples([7, 13, 4, 21])

    # samples alone
    alone_losses = []
    for s in samples:
        batch = collate([s], packing=False, pad_id=0)
        alone_losses.append(model.token_losses(**batch)[0])
    total_alone = sum(l.sum() for l in alone_losses)
    total_alone.backward()
    g_alone = grads(model)
    model.zero_grad()

    # one packed row: position ids restart, transformers builds the block-diagonal mask
    packed = collate(samples, packing=True, pad_id=0)
    losses = model.token_losses(**packed)[0]
    offset = 0
    for s, ref in zip(samples, alone_losses):
        torch.testing.assert_close(losses[offset:offset + len(s.input_ids)], ref, rtol=1e-5, atol=1e-6)
        offset += len(s.input_ids)
    losses.sum().backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, g_alone[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packing_without_restarting_positions_would_differ():
    """Guard that the test above can fail: the same row with running positions (attention across
    samples) gives different losses for every sample after the first."""
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation="sdpa")).float()
    model = TokenLossModel(lm)
    samples = make_samples([7, 13])
    packed = collate(samples, packing=True, pad_id=0)
    crossing = dict(packed, position_ids=torch.arange(20).unsqueeze(0))
    a = model.token_losses(**packed)[0][7:]
    b = model.token_losses(**crossing)[0][7:]
    assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_every_attention_candidate_keeps_packed_samples_apart(attn):
    """The attention benchmark (benchmarks/bench.py --suite attn) compares these for packed rows;
    each must derive the document mask from the restarting position ids, or the comparison
    would time a different (cross-sample) computation. Forward only: torch has no flex
    backward on CPU. The GPU-only varlen kernel is checked by the benchmark's loss gate."""
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict(), attn_implementation=attn)).float()
    model = TokenLossModel(lm)
    samples = make_samples([7, 13, 4, 21])
    with torch.no_grad():
        alone = torch.cat([model.token_losses(**collate([s], packing=False, pad_id=0))[0] for s in samples])
        packed = model.token_losses(**collate(samples, packing=True, pad_id=0))[0]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
