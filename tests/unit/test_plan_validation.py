"""The planner against measured peak GPU memory (issue 6: within +-15% for >= 3 configurations
of different ZeRO stages and model sizes).

Measured values: peak torch.cuda.max_memory_allocated() / 2**30 of the GPU benchmark runs, one
NVIDIA H100 80GB HBM3, 2026-11-25, recorded in benchmarks/logs/call{1,2,3,4}_*.json (run name in
each case) and tabulated in benchmarks/RESULTS.md "Planner validation (issue 6)". The inputs
mirror how each run was made (benchmarks/bench.py, bench_clustertune.py, hf_trainer.py);
benchmarks/plan_validation.py derives them from the logs and prints the table.
"""

from __future__ import annotations

import dataclasses

import pytest

from clustertune.plan import Option, PlanInput, ZeroBuckets, gpu_memory
from clustertune.shapes import SHAPES

QWEN_1_5B = SHAPES["qwen2.5-1.5b"]
QWEN_7B_8L = dataclasses.replace(SHAPES["qwen2.5-7b"], num_hidden_layers=8)  # bench --layers 8


def clustertune_run(shape, tokens: int, *, accumulation: bool = True) -> PlanInput:
    """bench_clustertune.py: packed rows of `tokens`, Liger, the engine's buckets (hidden^2)."""
    h2 = shape.hidden_size ** 2
    return PlanInput(shape, tokens_per_micro_batch=tokens, seq_len=4096, world_size=1, gpus_per_node=1,
                     gpu_mem_gib=79.6, host_mem_gib=1024, liger=True, grad_accumulation=accumulation,
                     buckets=ZeroBuckets(reduce_bucket=h2, prefetch_bucket=int(0.9 * h2),
                                         param_persistence_threshold=100_000_000))


def baseline_run(shape, tokens: int) -> PlanInput:
    """hf_trainer.py: HF Trainer + DeepSpeed defaults (reduce bucket 5e8), no Liger,
    sdpa, one padded micro-batch per step. W1's variable lengths: 4 sequences padded to the
    longest of the batch; the peak batch holds a 4096-token sample (benchmarks/workload.py
    sample_lengths, seed 0: batches 14 and 16 of 20) -> 4 x 4096."""
    return PlanInput(shape, tokens_per_micro_batch=tokens, seq_len=4096, world_size=1, gpus_per_node=1,
                     gpu_mem_gib=79.6, host_mem_gib=1024, liger=False, grad_accumulation=False)


def zero(stage: int, gc: bool = True) -> Option:
    return Option(stage, offload_optimizer=False, offload_params=False, gradient_checkpointing=gc)


# (log file: run name, inputs, option, measured GiB, where the planner puts the peak)
MEASURED = [
    ("call3: W2 baseline ZeRO-3", baseline_run(QWEN_1_5B, 4 * 2048), zero(3), 38.66, "loss"),
    ("call1: W1 baseline ZeRO-2", baseline_run(QWEN_1_5B, 4 * 4096), zero(2), 49.58, "loss"),
    ("call1: W1 baseline ZeRO-3", baseline_run(QWEN_1_5B, 4 * 4096), zero(3), 53.38, "loss"),
    ("call2: W3 baseline ZeRO-3", baseline_run(QWEN_7B_8L, 4 * 2048), zero(3), 59.60, "loss"),
    ("call1: W1 clustertune ZeRO-2", clustertune_run(QWEN_1_5B, 16384), zero(2), 31.69, "step"),
    ("call3: W1 clustertune ZeRO-2 64/step 32k", clustertune_run(QWEN_1_5B, 32768), zero(2), 31.69, "step"),
    ("call1: W1 clustertune ZeRO-3", clustertune_run(QWEN_1_5B, 16384), zero(3), 28.67, "step"),
    ("call3: W2 clustertune ZeRO-3 gc", clustertune_run(QWEN_1_5B, 16384), zero(3), 28.67, "step"),
    ("call3: MEM clustertune ZeRO-3 8192 tok/micro", clustertune_run(QWEN_1_5B, 8192, accumulation=False),
     zero(3), 28.67, "step"),
    ("call3: W2 clustertune ZeRO-3 no-gc", clustertune_run(QWEN_1_5B, 8192), zero(3, gc=False), 40.44, "loss"),
    ("call2: W3 clustertune ZeRO-3", clustertune_run(QWEN_7B_8L, 16384), zero(3), 49.87, "step"),
    ("call4: W2 clustertune ZeRO-3 gc 32/step 32k", clustertune_run(QWEN_1_5B, 32768), zero(3), 28.95, "backward"),
    ("call4: W3 clustertune ZeRO-3 32/step 32k", clustertune_run(QWEN_7B_8L, 32768), zero(3), 52.01, "backward"),
]


@pytest.mark.parametrize("name, inp, option, measured, phase", MEASURED, ids=[m[0] for m in MEASURED])
def test_prediction_within_15_percent_of_measured(name, inp, option, measured, phase):
    mem = gpu_memory(inp, option)
    assert mem.allocated_peak == pytest.approx(measured, rel=0.15), name
    assert mem.peak_phase == phase, name


def test_validation_covers_stages_and_sizes_and_stays_tight():
    errors = [gpu_memory(inp, option).allocated_peak / measured - 1 for _, inp, option, measured, _ in MEASURED]
    kinds = {(option.stage, inp.shape.parameter_count()) for _, inp, option, _, _ in MEASURED}
    assert {(2, QWEN_1_5B.parameter_count()), (3, QWEN_1_5B.parameter_count()),
            (3, QWEN_7B_8L.parameter_count())} <= kinds
    # today: worst +4.5% (W3 32k rows: the planner counts k/v repeated to all heads, which the
    # native-GQA varlen path of that run no longer does), mean |error| 0.8%
    assert max(abs(e) for e in errors) < 0.06
    assert sum(abs(e) for e in errors) / len(errors) < 0.02


def test_packed_clustertune_peak_is_the_optimizer_step_whatever_the_row_size():
    """Measured: ZeRO-2 31.69 GiB with 16k and 32k-token rows, ZeRO-3 28.67 with 8k and 16k: the
    peak is the step (16 B/param of states + the flattened bf16 and fp32 gradient copies)."""
    z2 = [gpu_memory(clustertune_run(QWEN_1_5B, t), zero(2)) for t in (16384, 32768)]
    z3 = [gpu_memory(clustertune_run(QWEN_1_5B, t), zero(3)) for t in (8192, 16384)]
    for pair in (z2, z3):
        assert pair[0].allocated_peak == pair[1].allocated_peak and pair[0].peak_phase == "step"
    params = QWEN_1_5B.parameter_count()
    assert z2[0].allocated_peak * 2**30 / params == pytest.approx(22.0, abs=0.05)  # 16 + 2 + 4 B/param


def test_gate_run_loaded_from_a_directory_trained_without_checkpointing():
    """The gate run (call2, call4) loaded its model from a saved directory, and from_pretrained
    returned it in eval mode, where HF's gradient checkpointing does nothing: it trained with
    checkpointing OFF although the recipe asked for it (fixed since: model.build_causal_lm now
    puts the model in train mode; tests/unit/test_model_build.py). Its peaks, 6.4-7.5 GiB above
    the same run built from the shape, are the planner's no-checkpointing estimate for its
    largest step: 4 W1 samples of 7,620 tokens in one packed row (workload.sample_lengths seed 0,
    step 16 of 20), peaking in backward."""
    largest_step_tokens = 7620
    for measured in (39.14, 38.12):
        mem = gpu_memory(clustertune_run(QWEN_1_5B, largest_step_tokens, accumulation=False), zero(2, gc=False))
        assert mem.allocated_peak == pytest.approx(measured, rel=0.05) and mem.peak_phase == "backward"
        checkpointed = gpu_memory(clustertune_run(QWEN_1_5B, largest_step_tokens, accumulation=False), zero(2))
        assert checkpointed.allocated_peak < measured - 5
