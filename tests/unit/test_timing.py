"""The planner's time estimate (issue 12): pure arithmetic, pinned by hand-computed values."""

import pytest

from clustertune import timing
from clustertune.flops import model_flops_per_token
from clustertune.shapes import lookup_shape

W1 = lookup_shape("qwen2.5-1.5b")
R1_32B = lookup_shape("deepseek-r1-distill-qwen-32b")

TABLE = timing.load_mfu_table("""
[[measured]]
gpu = "h100"
hidden = 1536
model = "small"
zero_stage = 2
gradient_checkpointing = true
mfu = 0.2
tokens_per_s = 1
tokens_per_gpu_step = 30000
source = "test"

[[measured]]
gpu = "h100"
hidden = 3584
model = "wide"
zero_stage = 3
gradient_checkpointing = true
mfu = 0.4
tokens_per_s = 1
tokens_per_gpu_step = 30000
source = "test"
""")


def test_bundled_table_says_where_every_figure_came_from():
    table = timing.load_mfu_table()
    assert table, "the bundled achieved-MFU table is empty"
    for entry in table:
        assert 0 < entry.mfu < 1 and entry.source and entry.gpu == "h100"
    # this round's 1-GPU figures through `clustertune train` (RESULTS.md 'Weak scaling', 2026-11-26)
    # (W1's as total FLOPs over total time, 2026-11-26 third session; plain recipes at ZeRO-0)
    assert {(e.hidden, e.zero_stage, e.mfu) for e in table} >= {(1536, 2, 0.323), (1536, 3, 0.215),
                                                                 (3584, 2, 0.445), (3584, 3, 0.404),
                                                                 (1536, 0, 0.360), (3584, 0, 0.457)}
    assert all("clustertune train" in e.source or "harness" in e.source for e in table)


def test_communication_volume_per_zero_stage():
    p, t = 1000, 100  # parameters, trainable (bf16: 2 bytes each)
    assert timing.communication_per_step(zero_stage=1, parameters=p, trainable=t, micro_batches=4).bytes_per_step == 2 * 200
    # ZeRO-2: a reduce-scatter in every micro-batch + one all-gather
    assert timing.communication_per_step(zero_stage=2, parameters=p, trainable=t, micro_batches=4).bytes_per_step == 5 * 200
    # ZeRO-3: two gathers of every param (the frozen ones too) + a reduce-scatter, per micro-batch
    assert timing.communication_per_step(zero_stage=3, parameters=p, trainable=t, micro_batches=4).bytes_per_step == 4 * (2 * 2000 + 200)


def test_ring_collective_time_and_the_slowest_link():
    # 8 GiB over 16 ranks at 100 Gb/s: each rank moves 15/16 of it at 12.5 GB/s
    assert timing.collective_seconds(8e9, world_size=16, bus_gbps=100) == pytest.approx(8e9 * 15 / 16 / 12.5e9)
    assert timing.collective_seconds(8e9, world_size=1, bus_gbps=100) == 0.0
    assert timing.bus_bandwidth_gbps(nodes=2, intra_node_gbps=1600, inter_node_gbps=100) == 100
    assert timing.bus_bandwidth_gbps(nodes=1, intra_node_gbps=1600, inter_node_gbps=100) == 1600


def test_one_gpu_step_is_pure_compute_at_the_table_mfu():
    est = timing.estimate_run_time(W1, gpu="h100", world_size=1, gpus_per_node=1, zero_stage=2,
                                   gradient_checkpointing=True, tokens_per_step=24_000, t_eff=1500,
                                   tokens_per_micro_batch=16_384, table=TABLE)
    fpt = model_flops_per_token(W1, 1500)
    assert est.communication_s == 0 and est.step_s == pytest.approx(24_000 * fpt / (989e12 * 0.2))
    assert est.mfu == pytest.approx(0.2)
    assert est.wall_seconds(100) == pytest.approx(100 * est.step_s)


def test_sixteen_gpus_with_free_communication_scale_perfectly():
    one = timing.estimate_run_time(W1, gpu="h100", world_size=1, gpus_per_node=1, zero_stage=2,
                                   gradient_checkpointing=True, tokens_per_step=24_000, t_eff=1500,
                                   tokens_per_micro_batch=16_384, table=TABLE)
    sixteen = timing.estimate_run_time(W1, gpu="h100", world_size=16, gpus_per_node=8, zero_stage=2,
                                       gradient_checkpointing=True, tokens_per_step=16 * 24_000, t_eff=1500,
                                       tokens_per_micro_batch=16_384, table=TABLE,
                                       intra_node_gbps=1e12, inter_node_gbps=1e12)
    assert sixteen.compute_s == pytest.approx(one.compute_s)
    assert sixteen.tokens_per_s_per_gpu == pytest.approx(one.tokens_per_s, rel=1e-6)


def test_exposed_communication_is_the_overlapped_share_or_what_compute_cannot_hide():
    kwargs = dict(gpu="h100", world_size=16, gpus_per_node=8, zero_stage=3, gradient_checkpointing=True,
                  tokens_per_step=16 * 4096, t_eff=2048, tokens_per_micro_batch=4096, table=TABLE)
    est = timing.estimate_run_time(R1_32B, inter_node_gbps=100, overlap=0.5, **kwargs)
    params = R1_32B.parameter_count()
    assert est.communication.bytes_per_step == 1 * (2 * 2 * params + 2 * params)  # 1 micro-batch per rank
    comm = est.communication.bytes_per_step * 15 / 16 / 12.5e9
    assert est.communication_s == pytest.approx(comm)
    assert est.exposed_communication_s == pytest.approx(max(comm / 2, comm - est.compute_s))
    assert est.step_s == pytest.approx(est.compute_s + est.exposed_communication_s)
    fast = timing.estimate_run_time(R1_32B, inter_node_gbps=3200, overlap=0.5, **kwargs)
    assert fast.step_s < est.step_s


def test_lookup_borrows_and_says_so():
    h20 = timing.lookup_achieved_mfu(TABLE, gpu="h20", hidden=5120, zero_stage=3, gradient_checkpointing=True)
    assert h20.mfu == 0.4 and h20.entry.hidden == 3584
    assert any("borrowed from H100" in n for n in h20.notes)
    assert any("hidden 3584, the job's is 5120" in n for n in h20.notes)
    # no ZeRO-1 measurement: the nearest stage (2); checkpointing off: scaled up by the measured ratio
    z1 = timing.lookup_achieved_mfu(TABLE, gpu="h100", hidden=1536, zero_stage=1, gradient_checkpointing=False)
    assert z1.entry.zero_stage == 2 and z1.mfu == pytest.approx(0.2 * timing.CHECKPOINTING_SPEEDUP)
    assert any("ZeRO-2's used" in n for n in z1.notes) and any("scaled" in n for n in z1.notes)
    exact = timing.lookup_achieved_mfu(TABLE, gpu="NVIDIA H100 80GB HBM3", hidden=1536, zero_stage=2,
                                       gradient_checkpointing=True)
    assert exact.mfu == 0.2 and exact.notes == ()


def test_compare_with_measured():
    est = timing.estimate_run_time(W1, gpu="h100", world_size=1, gpus_per_node=1, zero_stage=2,
                                   gradient_checkpointing=True, tokens_per_step=24_000, t_eff=1500,
                                   tokens_per_micro_batch=16_384, table=TABLE)
    row = timing.compare_with_measured(est, measured_step_s=est.step_s * 1.25)
    assert row["error"] == pytest.approx(1 / 1.25 - 1)
    assert row["measured_tokens_per_s"] == pytest.approx(24_000 / (est.step_s * 1.25))


def test_unknown_gpu_has_no_estimate():
    with pytest.raises(ValueError, match="peak"):
        timing.estimate_run_time(W1, gpu="h100-nvl", world_size=1, gpus_per_node=1, zero_stage=2,
                                 gradient_checkpointing=True, tokens_per_step=1, t_eff=1, tokens_per_micro_batch=1)


@pytest.mark.parametrize("seconds, text", [(45, "45s"), (600, "10m"), (3 * 3600 + 5 * 60, "3h05m"),
                                           (3 * 86400 + 7200, "3d02h")])
def test_format_duration(seconds, text):
    assert timing.format_duration(seconds) == text


def test_zeropp_moves_and_shrinks_zero3_traffic():
    p = 1000
    plain = timing.communication_per_step(zero_stage=3, parameters=p, trainable=p, micro_batches=1)
    zpp = timing.communication_per_step(zero_stage=3, parameters=p, trainable=p, micro_batches=1, hpz=True,
                                        quantized_weights=True, quantized_gradients=True)
    assert plain.bytes_per_step == 3 * 2000
    assert zpp.bytes_per_step == 0.75 * 2000  # the ZeRO++ paper's 0.75M across the job
    assert zpp.bytes_within_node_per_step == 2000  # the backward gather, inside the node
    kwargs = dict(gpu="h20", world_size=16, gpus_per_node=8, zero_stage=3, gradient_checkpointing=True,
                  tokens_per_step=16 * 4096, t_eff=2048, tokens_per_micro_batch=4096, table=TABLE, inter_node_gbps=25)
    slow = timing.estimate_run_time(R1_32B, **kwargs)
    fast = timing.estimate_run_time(R1_32B, hpz=True, quantized_weights=True, quantized_gradients=True, **kwargs)
    assert fast.communication_s < slow.communication_s / 3


def test_far_fewer_tokens_per_gpu_step_than_measured_is_said():
    chosen = timing.lookup_achieved_mfu(TABLE, gpu="h100", hidden=1536, zero_stage=2, gradient_checkpointing=True,
                                        tokens_per_gpu_step=8_000)
    assert any("30,000 tokens per GPU per step, the job has 8,000" in n and "optimistic" in n for n in chosen.notes)
    near = timing.lookup_achieved_mfu(TABLE, gpu="h100", hidden=1536, zero_stage=2, gradient_checkpointing=True,
                                      tokens_per_gpu_step=40_000)
    assert near.notes == ()


@pytest.mark.parametrize("shape, stage, tokens_per_step, t_eff, budget, measured_tokens_per_s", [
    # shared/gpu/README.md "Two H100s, one host" (2026-11-26): W1 ZeRO-2, 32 samples per GPU per
    # step (workload T_eff 1,402 over 64-sample steps), 50,407 tokens/s on 2 GPUs.
    (W1, 2, 2 * 23_892, 1_402, 16_384, 50_407),
    # W3 (7B width, 8 layers) ZeRO-3, 16 fixed 2048-token samples per GPU per step: 52,224 tokens/s.
    ("qwen2.5-7b-8l", 3, 2 * 32_768, 2_048, 16_384, 52_224),
])
def test_estimate_is_within_25_percent_of_the_measured_two_gpu_runs(shape, stage, tokens_per_step, t_eff, budget,
                                                                    measured_tokens_per_s):
    import dataclasses
    if isinstance(shape, str):
        shape = dataclasses.replace(lookup_shape("qwen2.5-7b"), num_hidden_layers=8)
    est = timing.estimate_run_time(shape, gpu="h100", world_size=2, gpus_per_node=2, zero_stage=stage,
                                   gradient_checkpointing=True, tokens_per_step=tokens_per_step, t_eff=t_eff,
                                   tokens_per_micro_batch=budget)
    row = timing.compare_with_measured(est, measured_step_s=tokens_per_step / measured_tokens_per_s)
    assert abs(row["error"]) < 0.25, row
