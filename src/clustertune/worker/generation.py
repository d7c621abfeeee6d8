"""Generation for on-policy objectives (GRPO, issue 15 item 3): one small interface, so a backend
other than Hugging Face generate (vLLM) can be added later without touching the objective.

Used by worker/objectives/grpo.py; tested on 2 CPU processes under ZeRO-2 and ZeRO-3
(tests/integration/test_generation.py).

    generator = HFGenerator(ds_engine, lm, zero_stage=3, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id],
                            max_new_tokens=256, temperature=1.0, top_p=1.0)
    generator.sync_weights()                        # after each optimizer step (HF: nothing to copy)
    completions = generator.generate(prompts, num_return_sequences=8, seed=step)  # one call per rollout

`generate` takes every prompt of the rollout at once and returns num_return_sequences completions
per prompt, grouped by prompt, each cut after its first end-of-sequence token. Under ZeRO-3 the
whole model is gathered once for the call (engine.generation_weights), never per token.

KV cache (grpo.kv_cache): "static" (default) allocates the whole cache for the batch once, sized
longest prompt + max_new_tokens (transformers' StaticCache through the public
`cache_implementation="static"`): what `clustertune plan` counts (plan_generation.py), with no
per-token growth (DynamicCache concatenates every step, copying the cache and fragmenting the
allocator). transformers would torch.compile the forward for a static cache on a GPU; that is
switched off (disable_compile): under ZeRO-3 the weights are gathered per rollout and the batch and
cache sizes change between rollouts, so it would recompile, and it is not measured here. Greedy
output is the same as with "dynamic" (tests/unit/test_generation_cache.py).
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from clustertune.worker import engine


class Generator(Protocol):
    def sync_weights(self) -> None:
        """Make the generator use the policy's current weights (after an optimizer step)."""

    def generate(self, prompts: Sequence[Sequence[int]], *, num_return_sequences: int,
                 seed: int, max_batch: int | None = None) -> list[list[int]]:
        """len(prompts) * num_return_sequences completions (token ids), grouped by prompt;
        batches of at most max_batch sequences (None: all at once)."""


class HFGenerator:
    """Hugging Face generate on the training model itself (no second copy of the weights)."""

    def __init__(self, ds_engine: Any, lm: Any, *, zero_stage: int, pad_id: int, eos_ids: Sequence[int],
                 max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, kv_cache: str = "static"):
        self.ds_engine, self.lm, self.zero_stage = ds_engine, lm, zero_stage
        self.pad_id, self.eos_ids = pad_id, list(eos_ids)
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.kv_cache = kv_cache

    def sync_weights(self) -> None:
        """Nothing to copy: generation reads the training weights themselves."""

    def generate(self, prompts: Sequence[Sequence[int]], *, num_return_sequences: int,
                 seed: int, max_batch: int | None = None) -> list[list[int]]:
        """Left-padded batch of every prompt; sampling (temperature > 0) from a generator seeded
        with `seed` without touching the global RNG (so training's RNG stream, which checkpoints
        save for exact resume, is the same with or without a rollout); greedy at temperature 0.
        `max_batch`: generate for at most this many sequences at once (held-out eval: no more than
        a rollout, so the KV cache `clustertune plan` counts holds), all under one gather.
        Collective under ZeRO-3 (the gather): every rank calls it once per rollout."""
        import torch

        from clustertune.worker.kernels import dense_attention
        from clustertune.worker.model import base_causal_lm

        if not prompts:  # still take part in the ZeRO-3 gather the other ranks make
            with engine.generation_weights(self.ds_engine, zero_stage=self.zero_stage):
                return []
        device = next(iter(self.ds_engine.module.parameters())).device
        config = generation_config(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                   top_p=self.top_p, num_return_sequences=num_return_sequences,
                                   eos_ids=self.eos_ids, pad_id=self.pad_id, kv_cache=self.kv_cache)
        per_call = len(prompts) if max_batch is None else max(1, max_batch // num_return_sequences)
        was_training = self.lm.training
        self.lm.eval()
        devices = [device] if device.type == "cuda" else []
        completions: list[list[int]] = []
        try:
            with engine.generation_weights(self.ds_engine, zero_stage=self.zero_stage), torch.no_grad(), \
                    torch.random.fork_rng(devices=devices), dense_attention(base_causal_lm(self.lm).config):
                torch.manual_seed(seed)
                for start in range(0, len(prompts), per_call):
                    ids, mask = self._left_padded(prompts[start:start + per_call])
                    # synced_gpus off: with the whole model gathered and the hooks off, a rank's forwards
                    # hold no collective, so ranks need not run in step (transformers would turn it on
                    # under ZeRO-3 and all-reduce every token).
                    out = self.lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config, synced_gpus=False)
                    completions += [self._cut(row) for row in out[:, ids.shape[1]:].tolist()]
        finally:
            self.lm.train(was_training)
        return completions

    def _left_padded(self, prompts: Sequence[Sequence[int]]) -> tuple[Any, Any]:
        import torch
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(list(prompt))
            mask[row, width - len(prompt):] = 1
        return ids, mask

    def _cut(self, tokens: list[int]) -> list[int]:
        for i, token in enumerate(tokens):
            if token in self.eos_ids:
                return tokens[:i + 1]
        return tokens


def generation_config(*, max_new_tokens: int, temperature: float, top_p: float, num_return_sequences: int,
                      eos_ids: Sequence[int], pad_id: int, kv_cache: str = "static") -> Any:
    """transformers.GenerationConfig of a rollout: sampling at temperature > 0 (top_k off), greedy
    at 0; the KV cache "static" (allocated once, no torch.compile) or "dynamic"."""
    from transformers import GenerationConfig

    if kv_cache not in ("static", "dynamic"):
        raise ValueError(f"kv_cache must be 'static' or 'dynamic' (got {kv_cache!r})")
    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampling, num_return_sequences=num_return_sequences,
        eos_token_id=list(eos_ids), pad_token_id=pad_id, use_cache=True,
        cache_implementation="static" if kv_cache == "static" else None, disable_compile=True,
        **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sampling else {}))
