"""MFU and throughput at any world size (issue 11): one formula, one peak table."""

import pytest

from clustertune import flops, gpus
from clustertune.shapes import lookup_shape
from clustertune.worker import metrics

W1 = lookup_shape("qwen2.5-1.5b")


def test_effective_context_is_the_attention_weighted_length():
    assert flops.effective_context([4096]) == 4096
    assert flops.effective_context([1000, 3000]) == pytest.approx((1000**2 + 3000**2) / 4000)
    assert flops.effective_context([]) == 0.0


def test_flops_per_token_follows_design_md():
    fpt = flops.model_flops_per_token(W1, t_eff=2048)
    assert fpt == 6 * W1.matmul_parameter_count() + 12 * 28 * 1536 * 2048


def test_sixteen_gpus_at_a_sixteenth_each_have_the_mfu_of_one_gpu():
    fpt = flops.model_flops_per_token(W1, t_eff=1500)
    one = flops.mfu(cluster_tokens_per_s=22_635, flops_per_tok=fpt, world_size=1, peak_flops_per_gpu=989e12)
    # 16 GPUs, each as fast as the one above: the cluster does 16x the tokens, MFU stays.
    sixteen = flops.mfu(cluster_tokens_per_s=16 * 22_635, flops_per_tok=fpt, world_size=16,
                        peak_flops_per_gpu=989e12)
    assert sixteen == pytest.approx(one)
    # The same cluster tokens/s over 16 GPUs is 1/16 the utilization (the bug: over one GPU's peak).
    spread = flops.mfu(cluster_tokens_per_s=22_635, flops_per_tok=fpt, world_size=16, peak_flops_per_gpu=989e12)
    assert spread == pytest.approx(one / 16)
    assert one == pytest.approx(0.229, abs=0.01)  # gpu/README: W1 22,635 tokens/s = 22.9% (T_eff near)


def test_throughput_record_has_cluster_and_per_gpu_figures():
    lengths = [1000, 3000] * 8
    record = metrics.throughput(document_lengths=lengths, elapsed_s=0.5, world_size=16, peak_flops_per_gpu=148e12,
                                matmul_params=W1.matmul_parameter_count(), layers=28, hidden=1536)
    assert record["tokens_per_s"] == pytest.approx(64_000)
    assert record["tokens_per_s_per_gpu"] == pytest.approx(4_000)
    assert record["world_size"] == 16
    fpt = flops.model_flops_per_token(W1, flops.effective_context(lengths))
    assert record["mfu"] == pytest.approx(4_000 * fpt / 148e12)
    cpu = metrics.throughput(document_lengths=lengths, elapsed_s=0.5, world_size=2, peak_flops_per_gpu=0.0,
                             matmul_params=1, layers=1, hidden=1)
    assert cpu["mfu"] == 0.0


def test_world_size_below_one_is_refused():
    with pytest.raises(ValueError, match="world_size"):
        flops.mfu(cluster_tokens_per_s=1, flops_per_tok=1, world_size=0, peak_flops_per_gpu=1)


@pytest.mark.parametrize("device, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H20", 148e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("h20", 148e12),
])
def test_one_peak_table_for_worker_planner_and_benchmarks(device, peak):
    assert flops.peak_flops_per_gpu(device) == peak
    assert gpus.peak_flops_for_device(device) == peak


def test_unknown_cards_get_no_peak_rather_than_a_wrong_one():
    # Substring matching made "H100 NVL" (94 GB, lower peak) an SXM H100 and "NVIDIA H200" an H20 risk.
    assert gpus.peak_flops_for_device("NVIDIA H100 NVL") is None
    assert gpus.peak_flops_for_device("NVIDIA GeForce GTX 1080") is None


def test_progress_bar_shows_cluster_and_per_gpu_tokens_and_gib():
    text = metrics._postfix({"loss": 1.0, "tokens_per_s": 50_000.0, "tokens_per_s_per_gpu": 25_000.0,
                             "mfu": 0.4, "mem_gib": 31.7})
    assert "50,000 tok/s (25,000/GPU)" in text and "MFU 40.0%" in text and "31.7 GiB" in text
