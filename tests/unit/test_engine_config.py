"""DeepSpeed config generation, batch arithmetic and the LR schedule: pure, no processes."""

import math

import pytest

from clustertune.config import RecipeError, TrainSection, ZeroSection
from clustertune.batch_math import batch_layout, lr_multiplier
from clustertune.worker.engine import build_deepspeed_config


def train(**kw) -> TrainSection:
    kw.setdefault("max_steps", 10)
    return TrainSection(**kw)


def test_train_batch_is_micro_times_accumulation_times_world():
    layout = batch_layout(train(global_batch_size=32, micro_batch_size=2), world_size=4, packing=False)
    assert layout.gradient_accumulation_steps == 4
    cfg = build_deepspeed_config(train(global_batch_size=32, micro_batch_size=2), ZeroSection(stage=2),
                                 layout=layout, precision="bf16", hidden_size=1536)
    assert cfg["train_batch_size"] == 32 == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 4
    assert cfg["bf16"] == {"enabled": True}
    assert "auto" not in repr(cfg)


def test_indivisible_batch_shows_the_arithmetic():
    with pytest.raises(RecipeError, match=r"global_batch_size \(10\) must be a multiple of .*\(4\) x world size \(3\) = 12"):
        batch_layout(train(global_batch_size=10, micro_batch_size=4), world_size=3, packing=False)


def test_fp32_has_no_mixed_precision_block():
    layout = batch_layout(train(global_batch_size=4, micro_batch_size=2), world_size=2, packing=False)
    cfg = build_deepspeed_config(train(global_batch_size=4, micro_batch_size=2), ZeroSection(stage=2),
                                 layout=layout, precision="fp32", hidden_size=64)
    assert "bf16" not in cfg and "fp16" not in cfg


def test_stage3_offload_blocks():
    layout = batch_layout(train(global_batch_size=16, micro_batch_size=1), world_size=16, packing=False)
    zero = ZeroSection(stage=3, offload_optimizer=True, offload_params=True, prefetch_bucket_size=12345)
    cfg = build_deepspeed_config(train(global_batch_size=16, micro_batch_size=1), zero, layout=layout,
                                 precision="bf16", hidden_size=5120)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_prefetch_bucket_size"] == 12345
    assert z["reduce_bucket_size"] == 5120 * 5120
    assert cfg["optimizer"]["type"] == "AdamW"  # DeepSpeed's CPU Adam for offloaded states
    assert "allgather_bucket_size" not in z


def test_stage3_sub_group_size_written_out_default_or_recipe():
    layout = batch_layout(train(global_batch_size=8, micro_batch_size=4), world_size=2, packing=False)
    configs = [build_deepspeed_config(train(global_batch_size=8, micro_batch_size=4), zero, layout=layout,
                                      precision="bf16", hidden_size=64)["zero_optimization"]
               for zero in (ZeroSection(stage=3), ZeroSection(stage=3, sub_group_size=200_000_000))]
    assert [z["sub_group_size"] for z in configs] == [1_000_000_000, 200_000_000]


def test_stage2_has_no_stage3_keys():
    layout = batch_layout(train(global_batch_size=8, micro_batch_size=4), world_size=2, packing=False)
    z = build_deepspeed_config(train(global_batch_size=8, micro_batch_size=4), ZeroSection(stage=2),
                               layout=layout, precision="bf16", hidden_size=64)["zero_optimization"]
    assert not any(k.startswith("stage3") for k in z)
    assert "offload_optimizer" not in z and "sub_group_size" not in z


def test_warmup_then_cosine_to_floor():
    t = train(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    values = [lr_multiplier(s, train=t, total_steps=20) for s in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert lr_multiplier(20, train=t, total_steps=20) == pytest.approx(0.1)
    mid = lr_multiplier(12, train=t, total_steps=20)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_constant_and_linear():
    assert lr_multiplier(9, train=train(schedule="constant"), total_steps=10) == 1.0
    lin = train(schedule="linear", min_lr_ratio=0.0)
    assert lr_multiplier(5, train=lin, total_steps=10) == pytest.approx(0.5)


def test_zero1_in_bf16_accumulates_in_fp32_by_default_and_nowhere_else():
    """grad_accum_dtype "auto": fp32 (DeepSpeed's BF16_Optimizer) exactly at ZeRO-1 in bf16 without
    optimizer offload; an explicit "bf16" or any other stage/precision writes no data_types block."""
    layout = batch_layout(train(global_batch_size=8, micro_batch_size=1), world_size=1, packing=False)

    def data_types(zero: ZeroSection, precision: str = "bf16"):
        cfg = build_deepspeed_config(train(global_batch_size=8, micro_batch_size=1), zero, layout=layout,
                                     precision=precision, hidden_size=64)
        return cfg.get("data_types")

    assert ZeroSection().grad_accum_dtype == "auto"
    assert data_types(ZeroSection(stage=1)) == {"grad_accum_dtype": "fp32"}
    assert data_types(ZeroSection(stage=1, grad_accum_dtype="fp32")) == {"grad_accum_dtype": "fp32"}
    assert data_types(ZeroSection(stage=1, grad_accum_dtype="bf16")) is None
    assert data_types(ZeroSection(stage=1), precision="fp32") is None
    assert data_types(ZeroSection(stage=1, offload_optimizer=True)) is None
    for stage in (0, 2, 3):
        assert data_types(ZeroSection(stage=stage)) is None


def test_fp32_accumulation_frees_each_bf16_gradient_at_once_unless_told_not_to():
    layout = batch_layout(train(global_batch_size=8, micro_batch_size=1), world_size=1, packing=False)

    def bf16_block(zero: ZeroSection):
        return build_deepspeed_config(train(global_batch_size=8, micro_batch_size=1), zero, layout=layout,
                                      precision="bf16", hidden_size=64)["bf16"]

    assert bf16_block(ZeroSection(stage=1)) == {"enabled": True, "immediate_grad_update": True}
    assert bf16_block(ZeroSection(stage=1, immediate_grad_update=False)) == {"enabled": True,
                                                                            "immediate_grad_update": False}
    assert bf16_block(ZeroSection(stage=2)) == {"enabled": True}  # no BF16_Optimizer: nothing to say


@pytest.mark.parametrize("zero, named", [({"stage": 0}, "got stage 0"), ({"stage": 2}, "got stage 2"),
                                         ({"stage": 3}, "got stage 3"),
                                         ({"stage": 1, "offload_optimizer": True}, "offload_optimizer")])
def test_fp32_accumulation_is_refused_where_deepspeed_would_not_run_it(zero, named):
    from clustertune.config import recipe_from_dict
    tree = {"run": {"output_dir": "/runs/x"}, "model": {"path": "tiny"}, "data": {"train_files": ["/d.jsonl"]},
            "train": {"max_steps": 1}, "zero": {**zero, "grad_accum_dtype": "fp32"}}
    with pytest.raises(RecipeError, match=rf"zero.grad_accum_dtype = \"fp32\" needs zero.stage = 1.*{named}"):
        recipe_from_dict(tree)
