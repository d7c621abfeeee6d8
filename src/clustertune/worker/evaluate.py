"""Held-out evaluation during training: loss and perplexity over the whole eval set across ranks,
greedy generation samples, and the bookkeeping for `checkpoint.keep_best`.

    [data]  eval_files = ["data/eval.jsonl"]      # or eval_fraction = 0.02
    [eval]  every_steps = 200                     # 0: only at the end
            generate_samples = 4                  # greedy completions logged next to the metrics
    [checkpoint] every_steps = 100, keep_best = true   # eval.every_steps a multiple of this

Eval samples come from the training data pipeline (same chat template, same assistant-only mask),
so eval loss is the training loss on held-out data: the mean cross-entropy per trained token over
the whole set. Every rank computes the same plan (`eval_plan`, pure) that gives each sample to
exactly one rank; the loss sum and the token count are all-reduced, so the result does not depend
on the world size, the micro-batch size or packing. All ranks run the same number of forwards
(short ranks run empty filler micro-batches), which ZeRO-3 needs to keep its gathers matched.

An objective with a `held_out` method (GRPO) has no eval loss: its eval is a greedy completion of
every held-out prompt scored by the recipe's rewards (`eval_reward_mean`, `eval_exact_match`,
`eval_completion_len_mean`, `eval_prompts` in metrics.jsonl), computed by the objective with the
rollout's own generator and rewards.

Worker side: imported by worker/loop.py only; torch is imported inside the functions that need it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from clustertune.worker import batching
from clustertune.data.types import IGNORE_INDEX

# ----------------------------------------------------------------------------------- pure part


def eval_plan(lengths: Sequence[int], *, world_size: int, micro_batch_size: int, packing: bool,
              token_budget: int) -> list[list[list[int]]]:
    """plan[r][m] = eval-sample indices of micro-batch m on rank r; [] is a filler micro-batch.

    Every index appears exactly once over all ranks, and every rank has the same number of
    micro-batches. Unpacked: samples sorted by length (longest first) and dealt round-robin, so
    the micro-batches of a rank hold samples of similar length (little padding). Packed: rows of
    at most `token_budget` tokens (first-fit decreasing), dealt round-robin, largest first.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1 (got {world_size})")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if packing:
        rows = batching.pack_bins(order, lengths, token_budget)
        rows.sort(key=lambda row: (-sum(lengths[i] for i in row), row))
        per_rank = [rows[r::world_size] for r in range(world_size)]
    else:
        per_rank = []
        for r in range(world_size):
            mine = order[r::world_size]
            per_rank.append([mine[m:m + micro_batch_size] for m in range(0, len(mine), micro_batch_size)])
    depth = max(1, max(len(groups) for groups in per_rank))
    return [[list(g) for g in groups] + [[] for _ in range(depth - len(groups))] for groups in per_rank]


def is_eval_step(step: int, *, every_steps: int, total_steps: int) -> bool:
    """Evaluate after optimizer step `step` (1-based): every `every_steps`, and at the end."""
    return step == total_steps or (every_steps > 0 and step % every_steps == 0)


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def is_better(loss: float, best_loss: float | None) -> bool:
    """Strictly lower wins, so on a tie the earlier checkpoint stays best; NaN never wins."""
    return not math.isnan(loss) and (best_loss is None or loss < best_loss)


def best_step(history: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    """(step, loss) with the lowest eval loss of (step, loss) pairs in step order."""
    best: tuple[int, float] | None = None
    for step, loss in history:
        if is_better(loss, None if best is None else best[1]):
            best = (step, loss)
    return best


def resumed_best(record: dict[str, Any] | None, *, start_step: int) -> tuple[int, float] | None:
    """The recorded best (checkpoints/best.json) when resuming from `start_step`, unless it belongs
    to steps after it, which the resumed run redoes (a checkpoint removed by hand)."""
    if not record or int(record["step"]) > start_step:
        return None
    return int(record["step"]), float(record["eval_loss"])


def last_turn(targets: Sequence[int]) -> tuple[int, int]:
    """[start, stop) of the last run of trained targets: the final assistant turn. The model
    reads input_ids[:start + 1] before it predicts the turn's first token."""
    stop = len(targets)
    while stop > 0 and targets[stop - 1] == IGNORE_INDEX:
        stop -= 1
    start = stop
    while start > 0 and targets[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, stop


def template_headers(tokenizer: Any) -> tuple[str, str] | None:
    """(header the chat template writes before an assistant turn's content, its generation prompt).

    They differ for some templates (DeepSeek-R1: "<｜Assistant｜>" vs "<｜Assistant｜><think>\\n"),
    so a training rendering cut before the last turn is not what inference sees. None when the
    template cannot be probed this way.
    """
    user = [{"role": "user", "content": "x"}]
    mark = "\x00"
    try:
        base = tokenizer.apply_chat_template(user, tokenize=False)
        gen = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": mark}], tokenize=False)
    except Exception:  # a foreign template: fall back to the training rendering
        return None
    if not (gen.startswith(base) and turn.startswith(base) and turn.count(mark) == 1):
        return None
    return turn[len(base):turn.index(mark)], gen[len(base):]


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # what generate reads
    text: str  # the rendered prompt (chat template + generation prompt)
    reference: str  # the eval set's answer (the last assistant turn), for comparison


def generation_prompt(tokenizer: Any, sample: Any, headers: tuple[str, str] | None) -> Prompt | None:
    """The conversation up to its last assistant turn, as the chat template renders it for
    inference (with the generation prompt), and that turn's answer. None without a trained turn.

    Built from the tokenized sample (the eval set holds no raw messages): its rendering before the
    last turn ends with the template's assistant header, which is swapped for the template's
    generation prompt when the two differ.
    """
    start, stop = last_turn(sample.targets)
    if start == stop:
        return None
    text = tokenizer.decode(sample.input_ids[:start + 1], skip_special_tokens=False)
    if headers is not None:
        header, gen_prompt = headers
        if header and header != gen_prompt and text.endswith(header):
            text = text[:-len(header)] + gen_prompt
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reference = tokenizer.decode(sample.input_ids[start + 1:stop + 1], skip_special_tokens=True)
    return Prompt(ids=list(ids), text=text, reference=reference)


# ---------------------------------------------------------------------------------- torch part


@dataclass
class EvalResult:
    step: int
    loss: float
    tokens: int
    seconds: float
    generations: list[dict[str, str]] = field(default_factory=list)
    # A generative eval (GRPO: greedy completions scored by rewards) has these instead of a loss.
    rewards: dict[str, float] = field(default_factory=dict)
    # What `tokens` counts: the objective's loss units ("tokens" for SFT, "pairs" for DPO, whose
    # loss per pair has no perplexity).
    units: str = "tokens"

    def record(self) -> dict[str, Any]:
        if self.rewards:
            return {"step": self.step, **self.rewards, "eval_time_s": self.seconds}
        if self.units != "tokens":
            return {"step": self.step, "eval_loss": self.loss, f"eval_{self.units}": self.tokens,
                    "eval_time_s": self.seconds}
        return {"step": self.step, "eval_loss": self.loss, "eval_ppl": perplexity(self.loss),
                "eval_tokens": self.tokens, "eval_time_s": self.seconds}


def eval_loss(ds_engine, objective, samples, plan: list[list[int]], *, device) -> tuple[float, int]:
    """(mean loss per loss unit, loss units) over all ranks (SFT: per trained token); `plan` is
    this rank's micro-batches from eval_plan. Collective: every rank calls it with a plan of the
    same length.

    Goes through the objective's training forward in the DeepSpeed engine (same loss, Liger's
    fused head on GPU so no vocabulary-wide fp32 logits, ZeRO-3 gathers driven by the engine)."""
    import torch
    import torch.distributed as dist

    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, loss units
    with torch.no_grad():
        for group in plan:
            out = objective.micro_batch_loss(ds_engine, [samples[i] for i in group], device=device)
            totals[0] += out.loss_sum.detach().double()
            totals[1] += sum(objective.loss_units(samples[i]) for i in group)
    if dist.is_initialized():
        dist.all_reduce(totals)
    tokens = int(totals[1].item())
    return float(totals[0]) / max(1, tokens), tokens


def generate(lm, tokenizer, prompts: Sequence[Prompt], *, rank: int, world_size: int, device,
             max_new_tokens: int, zero3: bool) -> list[dict[str, str]]:
    """Greedy completions of `prompts`, spread round-robin over the ranks; every rank returns all
    of them, in order. Under ZeRO-3 every rank makes the same number of generate calls
    (synced_gpus keeps their forwards matched; a rank without a prompt of its own runs a filler)."""
    import torch
    import torch.distributed as dist
    from transformers import GenerationConfig

    from clustertune.worker.kernels import dense_attention
    from clustertune.worker.model import base_causal_lm

    if not prompts:
        return []
    eos = {tokenizer.eos_token_id}
    configured = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    eos |= set(configured if isinstance(configured, (list, tuple)) else [configured])
    eos.discard(None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    settings = dict(do_sample=False, num_beams=1, eos_token_id=sorted(eos), pad_token_id=pad, use_cache=True)
    config = GenerationConfig(max_new_tokens=max_new_tokens, **settings)
    filler = GenerationConfig(max_new_tokens=1, **settings)  # synced_gpus runs it as long as the others
    mine = list(range(rank, len(prompts), world_size))
    calls = -(-len(prompts) // world_size) if zero3 and world_size > 1 else len(mine)
    done: dict[int, str] = {}
    with torch.no_grad(), dense_attention(base_causal_lm(lm).config):
        for c in range(calls):
            index = mine[c] if c < len(mine) else None
            prompt = prompts[index if index is not None else 0]
            ids = torch.tensor([prompt.ids], device=device)
            out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              generation_config=config if index is not None else filler,
                              synced_gpus=zero3 and world_size > 1)
            if index is not None:
                done[index] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    gathered: list[dict[int, str]] = [done]
    if dist.is_initialized() and world_size > 1:
        gathered = [{} for _ in range(world_size)]
        dist.all_gather_object(gathered, done)
    completions = {i: text for part in gathered for i, text in part.items()}
    return [{"prompt": p.text, "completion": completions[i], "reference": p.reference} for i, p in enumerate(prompts)]


class Evaluator:
    """What the training loop calls: `maybe_run(step, total_steps)` after an optimizer step.

    Holds the eval plan (computed once), the generation prompts and the best eval loss so far.
    """

    def __init__(self, *, recipe, objective, samples, tokenizer, ds_engine, lm, rt, sink):
        self.objective = objective
        self.samples = samples
        self.every_steps = recipe.eval.every_steps
        self.max_new_tokens = recipe.eval.max_new_tokens
        self.keep_best = recipe.checkpoint.keep_best
        self.zero3 = recipe.zero.stage == 3
        self.tokenizer, self.ds_engine, self.lm, self.rt, self.sink = tokenizer, ds_engine, lm, rt, sink
        self.plan = eval_plan([len(s.input_ids) for s in samples], world_size=rt.world_size,
                              micro_batch_size=recipe.train.micro_batch_size, packing=recipe.data.packing,
                              token_budget=recipe.train.micro_batch_tokens)[rt.rank]
        self.expected_tokens = sum(objective.loss_units(s) for s in samples)
        self.generate_samples = recipe.eval.generate_samples
        headers = template_headers(tokenizer)
        prompts = (generation_prompt(tokenizer, getattr(s, "chosen", s), headers) for s in samples)  # DPO: the chosen side
        self.prompts = [p for p in prompts if p is not None][:recipe.eval.generate_samples]
        self.best: tuple[int, float] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.samples)

    def restore_best(self, record: dict[str, Any] | None, *, start_step: int) -> None:
        self.best = resumed_best(record, start_step=start_step)

    def maybe_run(self, step: int, *, total_steps: int) -> EvalResult | None:
        if not self.enabled or not is_eval_step(step, every_steps=self.every_steps, total_steps=total_steps):
            return None
        return self.run(step)

    def run(self, step: int) -> EvalResult:
        if hasattr(self.objective, "held_out"):  # GRPO: greedy completions scored by rewards, no loss
            return self._run_generative(step)
        started = time.perf_counter()
        was_training = self.ds_engine.module.training
        self.ds_engine.eval()
        try:
            loss, tokens = eval_loss(self.ds_engine, self.objective, self.samples, self.plan, device=self.rt.device)
            if tokens != self.expected_tokens:
                raise RuntimeError(f"eval counted {tokens} trained tokens, the eval set has {self.expected_tokens}")
            generations = generate(self.lm, self.tokenizer, self.prompts, rank=self.rt.rank,
                                   world_size=self.rt.world_size, device=self.rt.device,
                                   max_new_tokens=self.max_new_tokens, zero3=self.zero3)
        finally:
            self.ds_engine.train(was_training)
            if self.zero3:
                # Forwards with no backward can leave ZeRO-3's prefetched parameters in flight (after a
                # DPO reference stage, the export that followed the final eval failed: "Cannot partition a
                # param in flight"); release them so what follows starts clean.
                self.ds_engine.empty_partition_cache()
        result = EvalResult(step, loss, tokens, time.perf_counter() - started, generations,
                            units=self.objective.loss_unit)
        improved = self.keep_best and is_better(loss, None if self.best is None else self.best[1])
        if improved:
            self.best = (step, loss)
        self._log(result, improved)
        return result

    def _run_generative(self, step: int) -> EvalResult:
        started = time.perf_counter()
        rewards, generations = self.objective.held_out(self.samples, rt=self.rt, samples_to_log=self.generate_samples)
        result = EvalResult(step, float("nan"), 0, time.perf_counter() - started, generations, rewards)
        self._log(result, improved=False)
        return result

    def best_to_keep(self, step: int) -> tuple[int, float] | None:
        """The best (step, loss) for checkpoint bookkeeping at `step`, when keep_best is on."""
        return self.best if self.keep_best and self.best is not None and self.best[0] <= step else None

    def _log(self, result: EvalResult, improved: bool) -> None:
        sink = self.sink
        sink.log(result.record())
        note = " (best so far)" if improved else ""
        if result.rewards:
            measured = (f"reward mean {result.rewards['eval_reward_mean']:.3f}, exact match "
                        f"{result.rewards['eval_exact_match']:.1%} over {result.rewards['eval_prompts']} held-out "
                        f"prompts (greedy)")
        elif result.units == "pairs":  # DPO: a loss per preference pair, no perplexity
            measured = f"DPO loss {result.loss:.4f} over {result.tokens} pairs"
        else:
            measured = f"loss {result.loss:.4f}, ppl {perplexity(result.loss):.3f} over {result.tokens} tokens"
        sink.write(f"eval step {result.step}: {measured} in {result.seconds:.1f} s{note}")
        if result.generations:
            sink.log({"step": result.step, "samples": result.generations})
            for g in result.generations:
                sink.write(f"  prompt ...{_tail(g['prompt'])!r}\n    -> {g['completion']!r}")


def _tail(text: str, n: int = 80) -> str:
    return text[-n:]
