"""The planner against the peak GPU memory measured on one H100 80GB HBM3 with the lean MLP
(2026-11-26, fifth session: benchmarks/RESULTS.md "The lean MLP" and "The plain recipe, stage and
recompute chosen together"; summaries in benchmarks/logs/session7_*). Fixed-length workloads, so
every 32k-token row is full and the plan's tokens are the run's, and each step is one row. The planner
may over-count (it is what keeps `auto` from running out of memory) but never under-count, and by at
most 5% (plan.DEFAULT_SAFETY_MARGIN rests on it). Session 8's points ran at the edge of the card,
through `clustertune train` with the worker's defaults (expandable segments, immediate_grad_update)."""

from __future__ import annotations

import dataclasses

import pytest

from clustertune.config import recipe_from_dict
from clustertune.plan import Option, gpu_memory
from clustertune.plan_cli import Job, plan_input
from clustertune.shapes import shape_from_model_path

W2 = ("qwen2.5-1.5b", None)
W3 = ("qwen2.5-7b", 8)

MEASURED = [
    # workload, zero stage, checkpoint_every_n_layers (None: no checkpointing), lean MLP,
    # bf16.immediate_grad_update, measured max_memory_allocated GiB (session, call)
    (W2, 1, 2, True, False, 52.1),  # harness, 7.1
    (W2, 1, 4, True, False, 63.2),  # harness, 7.1
    (W2, 1, 7, True, False, 68.5),  # harness, 7.2 (68.0 in 7.1)
    (W2, 1, 14, True, False, 71.7),  # harness, 7.2 (71.17 through clustertune train, 7.4)
    (W3, 1, 1, True, False, 60.6),  # harness, 7.1-7.3
    (W3, 0, 3, True, False, 61.6),  # harness, 7.2 (60.66 through clustertune train, 7.4)
    (W3, 0, 4, True, False, 64.8),  # harness, 7.2
    (W3, 0, 8, True, False, 68.3),  # harness, 7.2 (67.3 in 7.3 and through clustertune train, 7.4)
    (W2, 1, 2, False, False, 59.7),  # harness, 6.7
    (W3, 1, 1, False, False, 60.6),  # harness, 7.3
    # through `clustertune train`, expandable segments, session 8 call 1 (benchmarks/gpu1_memory_edge.sh)
    (W2, 1, 14, True, True, 71.17),
    (W2, 1, 28, True, True, 72.76),
    (W2, 1, None, True, True, 74.36),
    (W3, 0, 8, True, True, 67.18),
    (W3, 0, None, True, True, 70.65),
    (W3, 1, 2, True, True, 68.73),
]
# 48 samples per step = three full 32k rows: the earlier rows' gradients live through the later ones
# (session 8 call 4, benchmarks/gpu1_accumulation_edge.sh): workload, stage, n, immediate_grad_update, GiB
ACCUMULATING = [
    (W2, 1, 28, True, 72.76),  # the bf16 gradients freed as they are added: as with one row
    (W2, 1, 28, False, 75.64),  # DeepSpeed's default: +2 B/param (2.88 GiB)
    (W3, 0, 8, True, 72.12),  # ZeRO-0's bf16 gradients, whole from the second row on
]


def planned_peak(workload, stage, every, lean, immediate, *, samples_per_step: int) -> float:
    path, layers = workload
    recipe = recipe_from_dict({
        "model": {"path": path, **({"num_layers": layers} if layers else {})},
        "data": {"train_files": ["x.jsonl"], "max_length": 2048},
        "train": {"max_steps": 12, "global_batch_size": samples_per_step, "micro_batch_tokens": 32768,
                  "gradient_checkpointing": every is not None, **({"checkpoint_every_n_layers": every} if every else {})},
        "zero": {"stage": stage, "immediate_grad_update": immediate}})
    job = Job(gpu_mem_gib=79.6, gpu_source="test", nodes=1, gpus_per_node=1, topology_source="test",
              host_mem_gib=None, host_source="test")
    inp = plan_input(recipe, shape_from_model_path(path, layers), job)
    assert inp.attention == "varlen" and inp.lean_mlp  # what the GPU runs used (lean: the worker's default)
    if not lean:
        inp = dataclasses.replace(inp, lean_mlp=False)
    assert inp.step_tokens == samples_per_step * 2048
    return gpu_memory(inp, Option(stage, False, False, every is not None), 32768).allocated_peak


@pytest.mark.parametrize("workload,stage,every,lean,immediate,measured", MEASURED)
def test_planned_peak_covers_the_measured_one_by_at_most_five_percent(workload, stage, every, lean, immediate,
                                                                       measured):
    planned = planned_peak(workload, stage, every, lean, immediate, samples_per_step=16)  # one row per step
    assert measured <= planned <= 1.05 * measured, (planned, measured)


@pytest.mark.parametrize("workload,stage,every,immediate,measured", ACCUMULATING)
def test_planned_peak_of_steps_of_several_rows(workload, stage, every, immediate, measured):
    planned = planned_peak(workload, stage, every, True, immediate, samples_per_step=48)
    assert measured <= planned <= 1.05 * measured, (planned, measured)


# ZeRO-3 across ranks, 2048-token samples, 32k tokens per rank per step (session 8: call 5 on 2 x H100,
# benchmarks/gpu2_zero3_edge.sh, one 32k row per rank; call 6 on 4 x H100, gpu4_zero3_edge.sh, two
# 30,720-token rows per rank, what `auto` chose). The allocator's slack there is mostly the per-layer
# gathers: the card must hold max_memory_reserved, which the plan's total (allocated + runtime + slack)
# covers, by at most 10% (its gather slack is the largest measured).
ZERO3_ACROSS_RANKS = [
    # GPUs, shape, layers, row tokens, checkpoint_every_n_layers (None: off), expandable segments,
    # allocated, reserved GiB
    (2, "qwen2.5-7b", 8, 32768, None, True, 55.49, 58.45),
    (2, "deepseek-r1-distill-qwen-32b", 8, 32768, 2, True, 68.51, 74.79),
    (2, "deepseek-r1-distill-qwen-32b", 8, 32768, 1, False, 52.76, 66.78),
    (4, "deepseek-r1-distill-qwen-32b", 24, 30720, 1, True, 65.55, 74.48),
]


@pytest.mark.parametrize("gpus,path,layers,row,every,expandable,allocated,reserved", ZERO3_ACROSS_RANKS)
def test_zero3_across_ranks_plan_covers_allocated_and_reserved(gpus, path, layers, row, every, expandable,
                                                               allocated, reserved):
    recipe = recipe_from_dict({
        "model": {"path": path, "num_layers": layers},
        "data": {"train_files": ["x.jsonl"], "max_length": 2048},
        "train": {"max_steps": 12, "global_batch_size": 16 * gpus, "micro_batch_tokens": row,
                  "gradient_checkpointing": every is not None, **({"checkpoint_every_n_layers": every} if every else {})},
        "zero": {"stage": 3}})
    job = Job(gpu_mem_gib=79.6, gpu_source="test", nodes=1, gpus_per_node=gpus, topology_source="test",
              host_mem_gib=None, host_source="test", expandable_segments=expandable)
    inp = plan_input(recipe, shape_from_model_path(path, layers), job)
    mem = gpu_memory(inp, Option(3, False, False, every is not None), row)
    assert allocated <= mem.allocated_peak <= 1.05 * allocated, (mem.allocated_peak, allocated)
    # reserved + the CUDA context and NCCL outside the allocator (at least 0.5 GiB) within the plan's total
    assert reserved + 0.5 <= mem.total <= 1.10 * (reserved + 1.5), (mem.total, reserved)
