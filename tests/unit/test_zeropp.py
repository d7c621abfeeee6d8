"""ZeRO++ recipe keys (zero.hpz_partition_size, quantized_weights, quantized_gradients): validation,
the DeepSpeed config they produce, the planner's memory for the secondary partition, and the
inter-node communication estimate that recommends them (clustertune.cluster.interconnect)."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from clustertune.batch_math import batch_layout
from clustertune.cluster.interconnect import COMM_SHARE_WARN, comm_share, planned_step, zeropp_advice
from clustertune.config import RecipeError, TrainSection, ZeroSection, check_zero_topology
from clustertune.plan import Option, PlanInput, gpu_memory
from clustertune.shapes import SHAPES
from clustertune.worker.engine import build_deepspeed_config

ZEROPP = dict(stage=3, hpz_partition_size=8, quantized_weights=True, quantized_gradients=True)


@pytest.mark.parametrize("key, value", [("hpz_partition_size", 8), ("quantized_weights", True),
                                        ("quantized_gradients", True)])
def test_zeropp_keys_need_stage_3(key, value):
    with pytest.raises(ValidationError, match=f"zero.{key} needs zero.stage = 3"):
        ZeroSection(stage=2, **{key: value})
    ZeroSection(stage=3, **{key: value})


def test_hpz_must_be_the_gpus_of_one_node():
    check_zero_topology(ZeroSection(**ZEROPP), world_size=16, gpus_per_node=8)
    check_zero_topology(ZeroSection(stage=3), world_size=16, gpus_per_node=8)
    with pytest.raises(RecipeError, match=r"GPUs per node \(8\).*world size \(16\).*hpz_partition_size = 8"):
        check_zero_topology(ZeroSection(stage=3, hpz_partition_size=4), world_size=16, gpus_per_node=8)
    with pytest.raises(RecipeError, match="divide the world size"):
        check_zero_topology(ZeroSection(stage=3, hpz_partition_size=8), world_size=12, gpus_per_node=8)


def _zero_block(zero: ZeroSection) -> dict:
    train = TrainSection(max_steps=1, global_batch_size=8, micro_batch_size=4)
    layout = batch_layout(train, world_size=2, packing=False)
    return build_deepspeed_config(train, zero, layout=layout, precision="bf16", hidden_size=64)["zero_optimization"]


def test_deepspeed_config_gets_zeropp_keys_only_when_asked():
    z = _zero_block(ZeroSection(**ZEROPP))
    assert (z["zero_hpz_partition_size"], z["zero_quantized_weights"], z["zero_quantized_gradients"]) == (8, True, True)
    plain = _zero_block(ZeroSection(stage=3))
    assert not any(k.startswith("zero_") for k in plain)


def test_planner_counts_the_secondary_partition():
    shape = SHAPES["qwen2.5-7b"]
    inp = PlanInput(shape, tokens_per_micro_batch=4096, seq_len=4096, world_size=16, gpus_per_node=8,
                    gpu_mem_gib=80, host_mem_gib=None)
    option = Option(3, False, False, True)
    plain = gpu_memory(inp, option)
    hpz = gpu_memory(dataclasses.replace(inp, hpz_partition_size=8), option)
    expected_gib = 2 * shape.parameter_count() / 8 / 2**30  # bf16 params / GPUs per node
    assert hpz.params - plain.params == pytest.approx(expected_gib)
    assert hpz.grads == plain.grads and hpz.optimizer == plain.optimizer


def _recipe(**zero):
    from clustertune.config import recipe_from_dict
    return recipe_from_dict({"model": {"path": "qwen2.5-7b"}, "data": {"train_files": ["t.jsonl"], "packing": True,
                                                                       "max_length": 4096},
                             "train": {"max_steps": 5, "micro_batch_tokens": 4096}, "zero": {"stage": 3, **zero}})


def test_slow_link_recommends_zeropp_fast_link_does_not():
    shape = SHAPES["qwen2.5-7b"]
    common = dict(gpu="NVIDIA H100 80GB HBM3", world_size=16, gpus_per_node=8, intra_node_gbs=200.0)
    slow = planned_step(_recipe(), shape, inter_node_gbs=2.7, **common)
    fast = planned_step(_recipe(), shape, inter_node_gbs=400.0, **common)
    assert comm_share(slow) > COMM_SHARE_WARN > comm_share(fast)
    advice = zeropp_advice(comm_share(slow), ZeroSection(stage=3), gpus_per_node=8)
    # weights first (loss within 0.2% of ZeRO-3 where measured); int4 gradients moved it 2-4%
    assert advice and "zero.hpz_partition_size = 8" in advice and "zero.quantized_weights = true" in advice
    assert "quantized_gradients" not in advice
    weights_done = ZeroSection(stage=3, hpz_partition_size=8, quantized_weights=True)
    assert "zero.quantized_gradients = true" in zeropp_advice(0.9, weights_done, gpus_per_node=8)
    assert "compare the loss" in zeropp_advice(0.9, weights_done, gpus_per_node=8)
    assert "hpz" not in zeropp_advice(0.9, ZeroSection(stage=3), gpus_per_node=1)
    assert zeropp_advice(comm_share(fast), ZeroSection(stage=3), gpus_per_node=8) is None
    # ZeRO++ moves a quarter of ZeRO-3's bytes between nodes (the backward gather stays inside)
    pp = planned_step(_recipe(hpz_partition_size=8, quantized_weights=True, quantized_gradients=True), shape,
                      inter_node_gbs=2.7, **common)
    assert pp.communication.bytes_per_step == pytest.approx(slow.communication.bytes_per_step / 4)
    assert comm_share(pp) < comm_share(slow)
    assert "even with ZeRO++" in zeropp_advice(0.9, ZeroSection(**ZEROPP), gpus_per_node=8)
    assert "zero.stage = 3" in zeropp_advice(0.9, ZeroSection(stage=2), gpus_per_node=8)


def test_launch_refuses_an_hpz_partition_that_is_not_one_node():
    from pathlib import Path

    from clustertune.cluster.inventory import cluster_from_dict
    from clustertune.cluster.launch import build_launch_plan
    from clustertune.config import recipe_from_dict
    cluster = cluster_from_dict({"name": "c", "nodes": [{"name": "a", "address": "10.0.0.1", "slots": 4},
                                                        {"name": "b", "address": "10.0.0.2", "slots": 4}]})

    def plan(hpz: int):
        recipe = recipe_from_dict({"run": {"output_dir": "/runs/x"}, "data": {"train_files": ["/d.jsonl"]},
                                   "train": {"max_steps": 2, "global_batch_size": 8, "micro_batch_size": 1},
                                   "zero": {"stage": 3, "hpz_partition_size": hpz}})
        return build_launch_plan(recipe, cluster, launcher="deepspeed", local=False, resume=False, run_id="r",
                                 environ={}, nics=None, workdir="/w", python="/p", ssh_config=Path("/c"), cpu_count=8)

    with pytest.raises(RecipeError, match=r"GPUs per node \(4\).*set zero.hpz_partition_size = 4"):
        plan(2)
    plan(4)


def test_quantized_zeropp_refuses_an_arch_list_deepspeed_cannot_parse():
    """The GPU image's TORCH_CUDA_ARCH_LIST="9.0a" failed every rank's JIT build of the quantizer
    after the engine set-up (ValueError: '0a'); preflight names the variable and the fix first."""
    from clustertune.preflight import check_jit_arch_list
    quantized = ZeroSection(stage=3, quantized_weights=True)
    with pytest.raises(RecipeError, match=r"TORCH_CUDA_ARCH_LIST='9\.0a'.*export TORCH_CUDA_ARCH_LIST=\"9\.0\""):
        check_jit_arch_list(quantized, {"TORCH_CUDA_ARCH_LIST": "9.0a"})
    with pytest.raises(RecipeError, match=r"'10\.0f\+PTX'.*\"8\.0;10\.0\""):
        check_jit_arch_list(quantized, {"TORCH_CUDA_ARCH_LIST": "8.0 10.0f+PTX"})
    for fine in ({}, {"TORCH_CUDA_ARCH_LIST": "9.0"}, {"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}):
        check_jit_arch_list(quantized, fine)
    check_jit_arch_list(ZeroSection(stage=3), {"TORCH_CUDA_ARCH_LIST": "9.0a"})  # nothing JIT-built: no check
