"""The planner against the 32B-width runs measured on 4 x H100 80GB HBM3 (2026-11-26, one host,
benchmarks/gpu4_issue12.sh; benchmarks/RESULTS.md "The user's model"): peak GPU memory
(torch.cuda.max_memory_allocated) and host RAM per node (used above the start), within 10%."""

import dataclasses

import pytest

from clustertune import shapes
from clustertune.config import recipe_from_dict
from clustertune.plan import Option, estimate
from clustertune.plan_cli import Job, plan_input

MEASURED = [
    # layers, optimizer offload, GPU GiB, host GiB per node
    (31, False, 68.48, 32.9),
    (48, True, 18.09, 470.6),
]


@pytest.mark.parametrize("layers,offload,gpu_gib,host_gib", MEASURED)
def test_planner_matches_the_measured_32b_width_runs(layers, offload, gpu_gib, host_gib):
    shape = dataclasses.replace(shapes.lookup_shape("deepseek-r1-distill-qwen-32b"), num_hidden_layers=layers)
    recipe = recipe_from_dict({
        "model": {"path": "deepseek-r1-distill-qwen-32b", "liger": "on"},
        "data": {"train_files": ["x.jsonl"], "packing": True, "max_length": 4096},
        "train": {"max_steps": 5, "global_batch_size": 24, "micro_batch_tokens": 4096, "gradient_checkpointing": True},
        "zero": {"stage": 3, "offload_optimizer": offload}})
    job = Job(gpu_mem_gib=79.2, gpu_source="test", nodes=1, gpus_per_node=4, topology_source="test",
              host_mem_gib=503, host_source="test")
    e = estimate(plan_input(recipe, shape, job), Option(3, offload, False, True))
    assert e.gpu.allocated_peak == pytest.approx(gpu_gib, rel=0.10)
    assert e.host.peak == pytest.approx(host_gib, rel=0.10)


def test_the_63_layer_offload_run_that_exhausted_the_host_is_refused():
    """The former model planned 448 GiB for 63 layers and let it run; the run passed 493 GiB of
    the host's 503 and was stopped by the benchmark's out-of-memory guard."""
    shape = dataclasses.replace(shapes.lookup_shape("deepseek-r1-distill-qwen-32b"), num_hidden_layers=63)
    recipe = recipe_from_dict({
        "model": {"path": "deepseek-r1-distill-qwen-32b"}, "data": {"train_files": ["x.jsonl"], "packing": True},
        "train": {"max_steps": 5, "micro_batch_tokens": 4096, "gradient_checkpointing": True},
        "zero": {"stage": 3, "offload_optimizer": True}})
    job = Job(gpu_mem_gib=79.2, gpu_source="test", nodes=1, gpus_per_node=4, topology_source="test",
              host_mem_gib=503, host_source="test")
    e = estimate(plan_input(recipe, shape, job), Option(3, True, False, True))
    assert e.host.peak > 493 and not e.fits
