"""Generation for on-policy objectives (GRPO, issue 15 item 3): one small interface, so a backend
other than Hugging Face generate (vLLM) can be added later without touching the objective.

Used by worker/objectives/grpo.py; tested on 2 CPU processes under ZeRO-2 and ZeRO-3
(tests/integration/test_generation.py).

    generator = HFGenerator(ds_engine, lm, zero_stage=3, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id],
                            max_new_tokens=256, temperature=1.0, top_p=1.0)
    generator.sync_weights()                        # after each optimizer step (HF: nothing to copy)
    completions = generator.generate(prompts, num_return_sequences=8, seed=step,
                                     prompt_keys=dataset_indices)       # one call per rollout

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
                 seed: int, max_batch: int | None = None,
                 prompt_keys: Sequence[int] | None = None) -> list[list[int]]:
        """len(prompts) * num_return_sequences completions (token ids), grouped by prompt;
        batches of at most max_batch sequences (None: all at once). A sampled completion depends
        only on (seed, its prompt's key, its number in the group): prompt_keys (default: the
        prompts' positions) name the prompts independently of how they were split over ranks."""


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
                 seed: int, max_batch: int | None = None,
                 prompt_keys: Sequence[int] | None = None) -> list[list[int]]:
        """Left-padded batch of every prompt, each repeated num_return_sequences times; greedy at
        temperature 0; sampling (temperature > 0) through RowSeededSampling: each completion's
        random draws come from its own seed (seed, prompt key, number in the group), so a rollout
        is the same whichever rank generates a prompt and whatever shares its batch (exact resume
        on another world size), and the global RNG (which checkpoints save) is never touched.
        `max_batch`: generate for at most this many sequences at once (held-out eval: no more than
        a rollout, so the KV cache `clustertune plan` counts holds), all under one gather.
        Collective under ZeRO-3 (the gather): every rank calls it once per rollout."""
        import torch

        from clustertune.worker.kernels import dense_attention
        from clustertune.worker.model import base_causal_lm

        if not prompts:  # still take part in the ZeRO-3 gather the other ranks make
            with engine.generation_weights(self.ds_engine, zero_stage=self.zero_stage):
                return []
        from transformers import LogitsProcessorList

        device = next(iter(self.ds_engine.module.parameters())).device
        config = generation_config(max_new_tokens=self.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
                                   kv_cache=self.kv_cache)
        keys = list(range(len(prompts))) if prompt_keys is None else list(prompt_keys)
        if len(keys) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(keys)} prompt keys")
        group = num_return_sequences
        rows = [(prompt, row_seed(seed, key, k)) for prompt, key in zip(prompts, keys) for k in range(group)]
        per_call = len(rows) if max_batch is None else max(1, max_batch // group) * group
        was_training = self.lm.training
        self.lm.eval()
        completions: list[list[int]] = []
        try:
            with engine.generation_weights(self.ds_engine, zero_stage=self.zero_stage), torch.no_grad(), \
                    dense_attention(base_causal_lm(self.lm).config):
                for start in range(0, len(rows), per_call):
                    chunk = rows[start:start + per_call]
                    ids, mask = self._left_padded([prompt for prompt, _ in chunk])
                    sampling = LogitsProcessorList(
                        [row_seeded_sampling([s for _, s in chunk], temperature=self.temperature, top_p=self.top_p,
                                             prompt_width=ids.shape[1])] if self.temperature > 0 else [])
                    # synced_gpus off: with the whole model gathered and the hooks off, a rank's forwards
                    # hold no collective, so ranks need not run in step (transformers would turn it on
                    # under ZeRO-3 and all-reduce every token).
                    out = self.lm.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config, logits_processor=sampling, synced_gpus=False)
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


def generation_config(*, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
                      kv_cache: str = "static") -> Any:
    """transformers.GenerationConfig of a rollout: one sequence per input row, argmax decoding (the
    sampling itself is RowSeededSampling's, which turns argmax into an exact sample), the KV cache
    "static" (allocated once, no torch.compile) or "dynamic"."""
    from transformers import GenerationConfig

    if kv_cache not in ("static", "dynamic"):
        raise ValueError(f"kv_cache must be 'static' or 'dynamic' (got {kv_cache!r})")
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_return_sequences=1,
        eos_token_id=list(eos_ids), pad_token_id=pad_id, use_cache=True,
        cache_implementation="static" if kv_cache == "static" else None, disable_compile=True)


_MIX = 1_000_003  # a prime multiplier: distinct (seed, key, k, position) give distinct generator seeds
_SEED_MOD = 2 ** 63 - 1


def row_seed(seed: int, prompt_key: int, number: int) -> int:
    """The seed of one completion: number `number` of the group of the prompt `prompt_key`."""
    return ((seed * _MIX + prompt_key) * _MIX + number) % _SEED_MOD


def row_seeded_sampling(row_seeds: Sequence[int], *, temperature: float, top_p: float, prompt_width: int) -> Any:
    """A transformers LogitsProcessor that makes generate's argmax an exact sample of each row's
    distribution (the Gumbel-max trick): temperature, then top-p (transformers' TopPLogitsWarper),
    then Gumbel noise drawn from a generator seeded by the row's seed and the token's position
    after the prompt. A row's tokens therefore depend on its own seed only, never on the other
    rows of the batch or on the global RNG."""
    import torch
    from transformers import LogitsProcessor, TopPLogitsWarper

    top_p_warper = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    class RowSeededSampling(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.float() / temperature
            if top_p_warper is not None:
                scores = top_p_warper(input_ids, scores)
            position = input_ids.shape[1] - prompt_width
            uniform = torch.empty_like(scores)
            for row, seed in enumerate(row_seeds):
                generator = torch.Generator(device=scores.device).manual_seed((seed * _MIX + position) % _SEED_MOD)
                uniform[row].uniform_(generator=generator)
            gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20, max=1.0 - 1e-7)))
            return scores + gumbel

    return RowSeededSampling()
