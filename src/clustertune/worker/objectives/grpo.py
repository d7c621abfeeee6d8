"""GRPO with verifiable rewards (train.objective = "grpo", Shao et al. 2024), one update per
generation, no KL term:

    rollout:  each step's prompts (global_batch_size / group_size of them) are spread over the
              ranks; each rank samples group_size completions per prompt (worker/generation.py,
              one batched call: under ZeRO-3 one whole-model gather); rewards (clustertune.rewards)
              and group-normalized advantages are shared by all ranks
    loss:     per completion token t of completion i, -A_i * exp(log pi(t) - stop_grad(log pi(t)))
              (the ratio is 1 in value; its gradient is A_i * grad log pi(t)), plus with
              grpo.kl_beta > 0 kl_beta * k3(t), k3 = exp(ref - log pi) - (ref - log pi) - 1 with ref
              the log-prob under the LoRA adapter switched off (a no-grad forward of the same
              micro-batch); summed and divided by the step's completion tokens (token-level
              normalization, as DAPO/Dr. GRPO)

The completions become ordinary samples (prompt + completion, only the completion trained), so
the step plan, packing, accumulation and ZeRO work as for SFT.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from clustertune.config import GrpoSection
from clustertune.data.types import IGNORE_INDEX
from clustertune.plan_generation import rollout_spec
from clustertune.rewards import exact_match, group_advantages, load_reward, share_without_spread
from clustertune.worker import batching
from clustertune.worker.model import TokenLossModel
from clustertune.worker.objectives import MicroBatchLoss


@dataclass(frozen=True)
class CompletionSample:
    """Prompt + sampled completion; targets are the completion's tokens (pre-shifted)."""

    input_ids: list[int]
    targets: list[int]
    advantage: float

    @property
    def num_trained(self) -> int:
        return len(self.targets) - self.targets.count(IGNORE_INDEX)


def completion_sample(prompt: Sequence[int], completion: Sequence[int], advantage: float) -> CompletionSample:
    ids = list(prompt) + list(completion)
    targets = [IGNORE_INDEX] * (len(prompt) - 1) + list(completion) + [IGNORE_INDEX]
    return CompletionSample(ids, targets, advantage)


class TokenLogProbModel(TokenLossModel):
    """Forward returns each token's log-prob of its target ([batch, seq], 0 where ignored)."""

    def forward(self, input_ids, position_ids, targets, attention_mask=None, cu_seq_lens=None, max_length=None):
        return -self.token_losses(input_ids, position_ids, targets, attention_mask, cu_seq_lens, max_length)


def per_token(samples: Sequence[CompletionSample], *, packing: bool) -> torch.Tensor:
    """Each sample's advantage on each of its tokens, laid out as batching.collate lays out the rows."""
    if packing:
        return torch.tensor([[s.advantage for s in samples for _ in s.input_ids]], dtype=torch.float32)
    width = max(len(s.input_ids) for s in samples)
    out = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, s in enumerate(samples):
        out[row, :len(s.input_ids)] = s.advantage
    return out


class GroupRelativePolicyOptimization:
    name = "grpo"
    loss_unit = "tokens"

    def __init__(self, *, packing: bool, pad_id: int, grpo: GrpoSection, tokenizer: Any):
        self.packing, self.pad_id, self.grpo, self.tokenizer = packing, pad_id, grpo, tokenizer
        self.eos_ids = [tokenizer.eos_token_id]
        self.group_size = grpo.group_size  # completions per prompt: the loop takes global_batch_size / this prompts
        self.rewards = [load_reward(spec) for spec in grpo.rewards]
        self.generator: Any = None
        self.greedy: Any = None  # held-out eval: greedy completions
        self.eval_batch: int | None = None  # sequences generated at once in eval: no more than a rollout's
        self.lm: Any = None  # the (PEFT) model: its adapter is switched off for the KL reference
        self.last_rollout: dict[str, float] = {}

    def module(self, lm: Any, *, varlen: bool) -> torch.nn.Module:
        return TokenLogProbModel(lm, varlen=varlen)

    def loss_units(self, sample: CompletionSample) -> int:
        return sample.num_trained

    def before_training(self, parts: Any, data: Any, *, rt: Any, run_dir: Any, resuming: bool,
                        heartbeat: Any) -> None:
        from clustertune.worker.generation import HFGenerator
        zero_stage = parts.ds_config["zero_optimization"]["stage"]
        self.lm = parts.lm
        self.generator = HFGenerator(parts.ds_engine, parts.lm, zero_stage=zero_stage, pad_id=self.pad_id,
                                     eos_ids=self.eos_ids, max_new_tokens=self.grpo.max_new_tokens,
                                     temperature=self.grpo.temperature, top_p=self.grpo.top_p,
                                     kv_cache=self.grpo.kv_cache)
        self.greedy = HFGenerator(parts.ds_engine, parts.lm, zero_stage=zero_stage, pad_id=self.pad_id,
                                  eos_ids=self.eos_ids, max_new_tokens=self.grpo.max_new_tokens, temperature=0.0,
                                  kv_cache=self.grpo.kv_cache)
        self.eval_batch = rollout_spec(global_batch_size=parts.layout.global_batch_size, group_size=self.group_size,
                                       max_length=0, max_new_tokens=0).sequences_per_rank(rt.world_size)

    def reward(self, completion: str, answer: str) -> float:
        return float(sum(fn(completion, answer) for fn in self.rewards))

    def rollout(self, step: int, prompt_indices: Sequence[int], prompts: Sequence[Any], *, rt: Any,
                seed: int) -> list[CompletionSample]:
        """The step's completions, rewards and advantages: identical on every rank. Collective."""
        started = time.perf_counter()
        mine = list(prompt_indices)[rt.rank::rt.world_size]
        self.generator.sync_weights()
        # Seeded by step and dataset index, not by rank: the same completions on any world size
        # (exact resume after a change of world size).
        completions = self.generator.generate([prompts[i].input_ids for i in mine],
                                              num_return_sequences=self.group_size,
                                              seed=seed * 1_000_003 + step, prompt_keys=mine)
        rows = []
        for k, index in enumerate(mine):
            for completion in completions[k * self.group_size:(k + 1) * self.group_size]:
                rows.append((index, completion, self.reward(self.decode(completion), prompts[index].answer)))
        order = {index: n for n, index in enumerate(prompt_indices)}
        # Every rank orders the rollouts the same way: by the prompt's place in the step, then rank-local order.
        ordered = sorted(all_ranks(rows, rt), key=lambda row: order[row[0]])
        rewards = [r for _, _, r in ordered]
        advantages = group_advantages(rewards, group_size=self.group_size, scale=self.grpo.scale_rewards)
        samples = [completion_sample(prompts[i].input_ids, c, a) for (i, c, _), a in zip(ordered, advantages)]
        mean = sum(rewards) / len(rewards)
        self.last_rollout = {
            "reward_mean": mean,
            "reward_std": (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5,
            "groups_without_spread": share_without_spread(rewards, group_size=self.group_size),
            "completion_len_mean": sum(len(c) for _, c, _ in ordered) / len(ordered),
            "completion_len_max": max(len(c) for _, c, _ in ordered),
            "generation_time_s": time.perf_counter() - started,
        }
        return samples

    def decode(self, completion: Sequence[int]) -> str:
        return self.tokenizer.decode(completion, skip_special_tokens=True)

    def held_out(self, prompts: Sequence[Any], *, rt: Any, samples_to_log: int = 0) -> tuple[dict[str, float], list]:
        """Held-out eval (worker/evaluate.py): a greedy completion of every prompt (spread over the
        ranks, at most a rollout's sequences at once), scored with the recipe's rewards and exact
        match. Returns the eval metrics and the first `samples_to_log` as {prompt, completion,
        reference}; the same on every rank. Collective (one generate per rank: one ZeRO-3 gather)."""
        mine = list(range(rt.rank, len(prompts), rt.world_size))
        completions = self.greedy.generate([prompts[i].input_ids for i in mine], num_return_sequences=1, seed=0,
                                           max_batch=self.eval_batch)
        rows = []
        for index, completion in zip(mine, completions):
            text, answer = self.decode(completion), prompts[index].answer
            rows.append((index, len(completion), text, self.reward(text, answer), exact_match(text, answer)))
        ordered = sorted(all_ranks(rows, rt))
        count = max(1, len(ordered))
        metrics = {"eval_reward_mean": sum(r[3] for r in ordered) / count,
                   "eval_exact_match": sum(r[4] for r in ordered) / count,
                   "eval_completion_len_mean": sum(r[1] for r in ordered) / count,
                   "eval_prompts": len(ordered)}
        logged = [{"prompt": self.tokenizer.decode(prompts[i].input_ids), "completion": text,
                   "reference": prompts[i].answer} for i, _, text, _, _ in ordered[:samples_to_log]]
        return metrics, logged

    def micro_batch_loss(self, ds_engine: Any, samples: Sequence[CompletionSample], *,
                         device: torch.device) -> MicroBatchLoss:
        batch = batching.collate(samples, packing=self.packing, pad_id=self.pad_id)
        # The reference forward first and on every micro-batch, fillers included: under ZeRO-3 every
        # rank must run the same forwards.
        reference = self.reference_logps(ds_engine, batch, device) if self.grpo.kl_beta > 0 else None
        logps = ds_engine(**batching.to_device(batch, device)).float()
        if not samples:
            zero = logps.sum() * 0.0
            return MicroBatchLoss(zero, {} if reference is None else {"kl": zero.detach()})
        trained = (batch["targets"] != IGNORE_INDEX).to(device)
        advantages = per_token(samples, packing=self.packing).to(device)
        ratio = torch.exp(logps - logps.detach())
        losses = -advantages * ratio
        metrics = {}
        if reference is not None:
            kl = k3(logps, reference)
            losses = losses + self.grpo.kl_beta * kl
            metrics["kl"] = (kl.detach() * trained).sum()
        return MicroBatchLoss((losses * trained).sum(), metrics)

    def reference_logps(self, ds_engine: Any, batch: dict, device: torch.device) -> torch.Tensor:
        """Per-token log-probs under the reference: the same engine, LoRA adapter off, no grad."""
        with torch.no_grad(), self.lm.disable_adapter():
            return ds_engine(**batching.to_device(batch, device)).float()

    def step_metrics(self, sums: dict[str, float], plan: batching.StepPlan) -> dict[str, float]:
        kl = {"kl": sums["kl"] / max(1, plan.loss_units)} if "kl" in sums else {}
        return {"completion_tokens": plan.loss_units, **kl, **self.last_rollout}


def all_ranks(rows: list, rt: Any) -> list:
    """Every rank's rows (picklable), concatenated in rank order, on every rank. Collective."""
    if not (dist.is_initialized() and rt.world_size > 1):
        return list(rows)
    everyone: list[Any] = [None] * rt.world_size
    dist.all_gather_object(everyone, rows)
    return [row for part in everyone for row in part]


def k3(logps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: unbiased, never negative."""
    delta = reference - logps
    return torch.exp(delta) - delta - 1
