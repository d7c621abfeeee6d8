"""The planner against the peak GPU memory measured on one H100 80GB HBM3 with the lean MLP
(2026-11-26, fifth session: benchmarks/RESULTS.md "The lean MLP" and "The plain recipe, stage and
recompute chosen together"; summaries in benchmarks/logs/session7_*). Fixed-length workloads, so
every 32k-token row is full and the plan's tokens are the run's. The planner may over-count (it is
what keeps `auto` from running out of memory) but never under-count, and by at most 10%."""

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
    # workload, zero stage, checkpoint_every_n_layers, lean MLP, measured max_memory_allocated GiB (call)
    (W2, 1, 2, True, 52.1),  # harness, call 1
    (W2, 1, 4, True, 63.2),  # harness, call 1
    (W2, 1, 7, True, 68.5),  # harness, call 2 (68.0 in call 1)
    (W2, 1, 14, True, 71.7),  # harness, call 2 (71.17 through clustertune train, call 4)
    (W3, 1, 1, True, 60.6),  # harness, calls 1-3
    (W3, 0, 3, True, 61.6),  # harness, call 2 (60.66 through clustertune train, call 4)
    (W3, 0, 4, True, 64.8),  # harness, call 2
    (W3, 0, 8, True, 68.3),  # harness, call 2 (67.3 in call 3 and through clustertune train, call 4)
    (W2, 1, 2, False, 59.7),  # harness, session 6 call 7
    (W3, 1, 1, False, 60.6),  # harness, call 3
]


@pytest.mark.parametrize("workload,stage,every,lean,measured", MEASURED)
def test_planned_peak_covers_the_measured_one_by_at_most_ten_percent(workload, stage, every, lean, measured):
    path, layers = workload
    recipe = recipe_from_dict({
        "model": {"path": path, **({"num_layers": layers} if layers else {})},
        "data": {"train_files": ["x.jsonl"], "max_length": 2048},
        "train": {"max_steps": 12, "global_batch_size": 16, "micro_batch_tokens": 32768,
                  "gradient_checkpointing": True, "checkpoint_every_n_layers": every},
        "zero": {"stage": stage}})
    job = Job(gpu_mem_gib=79.6, gpu_source="test", nodes=1, gpus_per_node=1, topology_source="test",
              host_mem_gib=None, host_source="test")
    inp = plan_input(recipe, shape_from_model_path(path, layers), job)
    assert inp.attention == "varlen" and inp.lean_mlp  # what the GPU runs used (lean: the worker's default)
    if not lean:
        inp = dataclasses.replace(inp, lean_mlp=False)
    planned = gpu_memory(inp, Option(stage, False, False, True), 32768).allocated_peak
    assert measured <= planned <= 1.10 * measured, (planned, measured)
