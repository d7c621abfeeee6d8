"""Deterministic benchmark data shared by the baseline and clustertune: random token samples
whose lengths follow the workload (SFT-like lognormal or fixed). Sample i's tokens depend only
on (seed, i), so both programs train the same tokens in the same order.
"""

from __future__ import annotations

import math

import torch

VOCAB = 151936


def sample_lengths(mode: str, n: int, cap: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    if mode == "fixed":
        return [cap] * n
    # SFT-like: lognormal, median e^6.2 ~ 490 tokens, capped (the seed baseline's distribution).
    return [int(min(cap, max(16, math.exp(6.2 + 0.9 * torch.randn(1, generator=g).item())))) for _ in range(n)]


def sample_tokens(i: int, length: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    return torch.randint(0, vocab, (length,), generator=g)
