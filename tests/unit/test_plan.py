"""Memory planner arithmetic (clustertune.plan): pinned answers and monotonicity."""

from __future__ import annotations

import dataclasses

import pytest

from clustertune.plan import (DEFAULT_SAFETY_MARGIN, GIB, Option, PlanError, PlanInput, activation_bytes, all_options, gpu_memory,
                              host_memory, logits_bytes, plan, trainable_parameters)
from clustertune.shapes import SHAPES

R1_32B = SHAPES["deepseek-r1-distill-qwen-32b"]
QWEN_1_5B = SHAPES["qwen2.5-1.5b"]


def r1_32b_job(**changes) -> PlanInput:
    """The user's job: 2 nodes x 8 H20 (95.6 GiB visible), 4096 tokens, 1 TiB host RAM per node."""
    base = PlanInput(R1_32B, tokens_per_micro_batch=4096, seq_len=4096, world_size=16, gpus_per_node=8,
                     gpu_mem_gib=95.6, host_mem_gib=1024)
    return dataclasses.replace(base, **changes)


def by_label(result, label: str):
    return next(e for e in result.estimates if e.option.label == label)


# ------------------------------------------------------------------------------ the pinned answer

def test_r1_32b_on_2x8_h20_recommends_zero3_with_checkpointing_no_offload():
    result = plan(r1_32b_job())
    best = result.recommended
    assert best is not None
    assert best.option == Option(stage=3, offload_optimizer=False, offload_params=False, gradient_checkpointing=True)

    # 32.76B params x 16 B = 488 GiB of model states; ZeRO-3 over 16 ranks: 30.5 GiB per rank.
    assert result.parameters == 32_763_876_352
    g = best.gpu
    assert g.params == pytest.approx(3.81, abs=0.01)  # bf16, 1/16
    assert g.grads == pytest.approx(3.81, abs=0.01)  # bf16, 1/16
    assert g.optimizer == pytest.approx(22.89, abs=0.01)  # fp32 master + m + v, 1/16
    assert g.model_states == pytest.approx(30.5, abs=0.1)
    assert g.activations == pytest.approx(4.0, abs=0.1)  # layer inputs 2.5 + one recomputed layer 1.0 + ...
    assert g.logits == pytest.approx(1.56, abs=0.05)  # Liger: mostly the lm_head weight gradient
    # the optimizer step converts one sub-group at a time: 2.05e9 params per rank cut into
    # sub-groups of >= 1e9, the largest 1.04e9 elements x (2 B flattened + 4 B fp32)
    assert g.step_transient == pytest.approx(1_041_530_880 * 6 / GIB)
    # the loss, the backward and the step peak within 0.1 GiB of each other at ~37.3 GiB
    assert g.allocated_peak == pytest.approx(37.35, abs=0.1)
    assert max(g.loss_peak, g.backward_peak, g.step_peak) - min(g.loss_peak, g.backward_peak, g.step_peak) < 0.1
    # + CUDA context and NCCL 1.5, 2% allocator slack and ZeRO-3's gather slack, 10 layers of bf16 weights
    assert g.total == pytest.approx(48.1, abs=0.3)
    assert best.host.load == pytest.approx(64, abs=1)  # zero.Init: one shard per rank, 8 ranks
    assert best.max_tokens > 4 * 4096  # room to grow the micro-batch

    # Why not faster options: ZeRO-2 keeps the whole bf16 model (61 GiB) on every GPU.
    zero2 = by_label(result, "ZeRO-2 + ckpt")
    assert zero2.gpu.params == pytest.approx(61.0, abs=0.1)
    assert zero2.gpu.total > result.gpu_budget_gib and not zero2.fits
    # ZeRO-3 without checkpointing: 64 layers of full activations (~64 GiB) do not fit.
    zero3 = by_label(result, "ZeRO-3")
    assert zero3.gpu.activations > 60 and not zero3.fits
    assert "every faster option is over budget" in result.why()

    # DeepSpeed checkpoint: 2 B weights + 12 B optimizer states per param; export: bf16 weights.
    assert result.checkpoint.deepspeed == pytest.approx(32_763_876_352 * 14 / GIB)
    assert result.checkpoint.export == pytest.approx(61.0, abs=0.1)


def test_r1_32b_without_liger_still_zero3_ckpt_with_fp32_logits():
    result = plan(r1_32b_job(liger=False))
    best = result.recommended
    assert best.option.label == "ZeRO-3 + ckpt"
    # 4096 tokens x 152064 vocab x 12 B: log_softmax's backward holds its saved fp32 output, the
    # incoming fp32 gradient and the outgoing one (measured: HF baselines within 0.3%, see
    # test_plan_validation.py)
    assert best.gpu.logits == pytest.approx(4096 * 152064 * 12 / GIB)


def test_r1_32b_on_fewer_gpus():
    # one node of 8: ZeRO-3 states are 61 GiB/rank, + ~10 GiB still under 86 GiB
    one_node = plan(r1_32b_job(world_size=8)).recommended
    assert one_node.option.label == "ZeRO-3 + ckpt"
    assert 65 < one_node.gpu.total < 86
    # 4 GPUs: 122 GiB of states per rank -> the optimizer must go to host RAM
    assert plan(r1_32b_job(world_size=4, gpus_per_node=4)).recommended.option.offload_optimizer


def test_small_model_on_one_h100_fits_without_zero3():
    inp = PlanInput(QWEN_1_5B, tokens_per_micro_batch=8192, seq_len=8192, world_size=1, gpus_per_node=1,
                    gpu_mem_gib=79.6, host_mem_gib=256)
    result = plan(inp)
    assert by_label(result, "ZeRO-2").fits
    assert by_label(result, "ZeRO-2 + ckpt").fits
    best = result.recommended
    # one rank: ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, measured faster than
    # ZeRO-0), its fp32 buffer counted in place of ZeRO-0's bf16 gradients (immediate_grad_update frees
    # each bf16 gradient once added): 2 B/param more; ZeRO-0's memory is ZeRO-1's with bf16 accumulation
    assert best.option == Option(1, False, False, False)
    assert best.gpu.grads - by_label(result, "ZeRO-0").gpu.grads == pytest.approx(2 * 1.54e9 / 2**30, rel=0.01)
    keeping = plan(dataclasses.replace(inp, immediate_grad_update=False))  # DeepSpeed's default: both live
    assert by_label(keeping, "ZeRO-1").gpu.grads - best.gpu.grads == pytest.approx(2 * 1.54e9 / 2**30, rel=0.01)
    bf16_accumulation = plan(dataclasses.replace(inp, grad_accum_dtype="bf16"))
    assert by_label(result, "ZeRO-0").gpu.total == pytest.approx(by_label(bf16_accumulation, "ZeRO-1").gpu.total)
    # several ranks: no ZeRO-0 among the options (not measured there)
    assert all(e.option.stage for e in plan(dataclasses.replace(inp, world_size=2, gpus_per_node=2)).estimates)


def test_calibration_against_measured_hf_baseline():
    """gpu/README.md, H100, HF Trainer + DeepSpeed, qwen2.5-1.5b, 4 x 2048 tokens, no Liger:
    ZeRO-2 ckpt 34.9, ZeRO-2 no ckpt 56.3, ZeRO-3 ckpt 38.7 GiB max_memory_allocated.
    The estimate must stay within +-15% (and preferably above: it guards against OOM).
    HF Trainer ran one micro-batch per step (no accumulation). More runs: test_plan_validation.py."""
    inp = PlanInput(QWEN_1_5B, tokens_per_micro_batch=8192, seq_len=2048, world_size=1, gpus_per_node=1,
                    gpu_mem_gib=79.6, host_mem_gib=256, liger=False, grad_accumulation=False)
    for option, measured in ((Option(2, False, False, True), 34.9), (Option(2, False, False, False), 56.3),
                             (Option(3, False, False, True), 38.7)):
        assert gpu_memory(inp, option).allocated_peak == pytest.approx(measured, rel=0.15), option.label


# ----------------------------------------------------------------------------- monotonicity

@pytest.mark.parametrize("ckpt", [False, True])
def test_more_ranks_less_memory_at_stage3(ckpt):
    totals = [gpu_memory(r1_32b_job(world_size=n), Option(3, False, False, ckpt)).total for n in (8, 16, 32, 64)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]


def test_stage_order_of_model_states():
    inp = r1_32b_job()
    states = [gpu_memory(inp, Option(s, False, False, True)).model_states for s in (1, 2, 3)]
    assert states[0] > states[1] > states[2]


def test_checkpointing_reduces_activations():
    inp = r1_32b_job()
    for tokens in (512, 4096, 32768):
        assert activation_bytes(inp, True, tokens) < activation_bytes(inp, False, tokens) / 5
    # linear in tokens
    assert activation_bytes(inp, True, 8192) == pytest.approx(2 * activation_bytes(inp, True, 4096))


def test_offload_moves_memory_from_gpu_to_host():
    inp = r1_32b_job()
    for stage in (1, 2, 3):
        on, off = Option(stage, True, False, True), Option(stage, False, False, True)
        assert gpu_memory(inp, on).total < gpu_memory(inp, off).total
        assert host_memory(inp, on).train > host_memory(inp, off).train
    plain, params = Option(3, True, False, True), Option(3, True, True, True)
    assert gpu_memory(inp, params).total < gpu_memory(inp, plain).total
    assert host_memory(inp, params).train > host_memory(inp, plain).train


def test_zero_init_avoids_full_model_in_host_ram_at_load():
    inp = r1_32b_job()
    # stage 1/2: each of the 8 processes loads 61 GiB of bf16 weights
    assert host_memory(inp, Option(2, False, False, True)).load == pytest.approx(8 * (3 + 61.0), abs=1)
    assert host_memory(inp, Option(3, False, False, True)).load < 100


def test_liger_shrinks_logits_and_activations():
    with_liger, without = r1_32b_job(), r1_32b_job(liger=False)
    assert logits_bytes(with_liger, 4096) < logits_bytes(without, 4096) / 3
    assert activation_bytes(with_liger, False, 4096) < activation_bytes(without, False, 4096)


def test_more_gpu_memory_never_loses_options():
    small, large = plan(r1_32b_job(gpu_mem_gib=79.6)), plan(r1_32b_job(gpu_mem_gib=140.4))
    for a, b in zip(small.estimates, large.estimates):
        assert a.option == b.option and (not a.fits or b.fits)
    # on H200 the faster ZeRO-2 + ckpt fits (61 GiB of weights + the rest < 126 GiB)
    assert large.recommended.option.label == "ZeRO-2 + ckpt"


def test_nothing_fits_returns_none_with_reason():
    result = plan(r1_32b_job(world_size=1, gpus_per_node=1, gpu_mem_gib=22.5, host_mem_gib=64))
    assert result.recommended is None
    assert result.why().startswith("nothing fits")


# ------------------------------------------------------------------------------ options, LoRA

def test_speed_order_ends_points():
    options = all_options()
    assert len(options) == 16
    assert options[0] == Option(1, False, False, False)
    assert options[-1] == Option(3, True, True, True)
    # ZeRO-2 + ckpt is ranked faster than ZeRO-3 without ckpt (measured 1.17x vs 1.86x costs)
    assert options.index(Option(2, False, False, True)) < options.index(Option(3, False, False, False))
    # one rank: ZeRO-0 among the options, after ZeRO-1 (fp32 accumulation measured faster), before ZeRO-2;
    # never with offload, never for LoRA
    single = all_options(single_rank=True)
    assert len(single) == 18 and single[:2] == [Option(1, False, False, False), Option(0, False, False, False)]
    assert single.index(Option(1, False, False, True)) < single.index(Option(0, False, False, True)) \
        < single.index(Option(2, False, False, True))
    assert all(o.stage for o in all_options(lora=True, single_rank=True))


def test_lora_trains_few_params_and_skips_param_offload():
    inp = r1_32b_job(lora_rank=16)
    trainable = trainable_parameters(R1_32B, 16)
    # r * (in + out) summed over q,k,v,o,gate,up,down, x 64 layers
    h, i, kv = 5120, 27648, 1024
    assert trainable == 64 * 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    result = plan(inp)
    assert all(not e.option.offload_params for e in result.estimates)
    assert result.checkpoint.adapter == pytest.approx(2 * trainable / GIB)
    # frozen bf16 weights stay whole at ZeRO-1/2 (61 GiB) and fit in 86 GiB next to few optimizer
    # states, with checkpointing (without it, 64 GiB of activations do not)
    assert result.recommended.option == Option(1, False, False, True)


def test_invalid_inputs_are_clear_errors():
    with pytest.raises(PlanError, match="world_size"):
        r1_32b_job(world_size=0)
    with pytest.raises(PlanError, match="unknown LoRA target"):
        r1_32b_job(lora_rank=8, lora_targets=("qkv",))


def test_unknown_host_ram_is_not_checked_and_said():
    """Host RAM of other machines unknown (no --host-mem): every option passes the host check and
    the reason says so, instead of judging the nodes by the launching machine."""
    result = plan(r1_32b_job(host_mem_gib=None))
    assert result.host_budget_gib is None
    assert all(e.fits_host for e in result.estimates)
    assert "host RAM not checked" in result.why()


def test_selective_checkpointing_memory_lies_between_full_and_none():
    """train.checkpoint_every_n_layers = n: ceil(L/n) layers keep only their input, the rest keep
    all they save; the planner's saved activations follow that exactly."""
    from clustertune.plan import layer_activation_bytes_per_token, saved_activation_bytes
    shape = SHAPES["qwen2.5-1.5b"]  # 28 layers
    def inp(n):
        return PlanInput(shape, tokens_per_micro_batch=32768, seq_len=4096, world_size=1, gpus_per_node=1,
                         gpu_mem_gib=80, host_mem_gib=None, checkpoint_every_n_layers=n)
    full, half = saved_activation_bytes(inp(1), True, 1000), saved_activation_bytes(inp(2), True, 1000)
    none = saved_activation_bytes(inp(1), False, 1000)
    assert full < half < none
    per_layer, kept = layer_activation_bytes_per_token(inp(2)), 2 * shape.hidden_size
    assert half - full == pytest.approx(1000 * 14 * (per_layer - kept))
    option = Option(1, False, False, True)
    assert gpu_memory(inp(1), option).allocated_peak < gpu_memory(inp(2), option).allocated_peak


def test_fewest_recomputed_layers_is_the_largest_n_that_still_fits():
    """W1 (no lean MLP) on an 80 GB card: every 3rd layer fits 32k-token rows, every 4th does not;
    smaller rows leave room for fewer recomputes; an option without checkpointing, or a card where
    only full checkpointing fits, gets None."""
    from clustertune.plan import fewest_recomputed_layers
    def inp(gib):  # packed rows on a GPU: flash varlen attention
        return PlanInput(SHAPES["qwen2.5-1.5b"], tokens_per_micro_batch=32768, seq_len=4096, world_size=1,
                         gpus_per_node=1, gpu_mem_gib=gib, host_mem_gib=None, attention="varlen")
    ckpt = Option(1, False, False, True)
    assert fewest_recomputed_layers(inp(79.6), ckpt, 32768) == 3
    assert fewest_recomputed_layers(inp(79.6), ckpt, 16384) > 3
    assert fewest_recomputed_layers(inp(40.0), ckpt, 32768) is None
    assert fewest_recomputed_layers(inp(79.6), Option(1, False, False, False), 32768) is None
    n = fewest_recomputed_layers(inp(79.6), ckpt, 16384)
    fits = lambda every: gpu_memory(dataclasses.replace(inp(79.6), checkpoint_every_n_layers=every), ckpt,
                                    16384).total <= 79.6 * (1 - DEFAULT_SAFETY_MARGIN)
    assert fits(n) and (n == 28 or not fits(n + 1))


def test_speed_choice_never_takes_zero3_or_offload_just_for_larger_rows():
    """Packed: when the fast kind of option (no offload, not ZeRO-3) runs only smaller rows than the
    planned micro-batch and ZeRO-3 fits it whole, the choice stays with the fast kind and its largest
    rows; ZeRO-3 is taken only when nothing faster runs a row at all."""
    from clustertune.plan import speed_choice
    inp = PlanInput(QWEN_1_5B, tokens_per_micro_batch=32768, seq_len=4096, world_size=1, gpus_per_node=1,
                    gpu_mem_gib=79.6, host_mem_gib=None)
    result = plan(inp)
    fast = lambda e: e.option.stage != 3 and not e.option.offload_optimizer  # noqa: E731

    def with_fast_rows(tokens: int):
        return dataclasses.replace(result, estimates=[
            dataclasses.replace(e, fits_gpu=False, max_tokens=tokens) if fast(e) else e for e in result.estimates])
    smaller = speed_choice(with_fast_rows(8192), shortest_row=4096, packing=True)
    assert smaller.estimate.option.stage == 1 and smaller.row_tokens == 8192
    none_fast = speed_choice(with_fast_rows(2048), shortest_row=4096, packing=True)
    assert none_fast.estimate.option.stage == 3 and none_fast.row_tokens == 32768
    # padded batches have no smaller row to fall back to: the fastest option that fits them
    assert speed_choice(with_fast_rows(8192), shortest_row=4096, packing=False).estimate.option.stage == 3


def test_flash_varlen_keeps_k_v_at_gqa_width_and_no_separate_o_proj_input():
    """Packed rows on a GPU run flash varlen: per layer and token it saves a*(3h + 2kv) for attention
    where the sdpa count (k/v repeated, o_proj's own input copy) saves a*6h; everything else equal."""
    from clustertune.plan import layer_activation_bytes_per_token
    shape = QWEN_1_5B
    def per_layer(attention):
        return layer_activation_bytes_per_token(PlanInput(shape, tokens_per_micro_batch=8192, seq_len=4096,
                                                          world_size=1, gpus_per_node=1, gpu_mem_gib=79.6,
                                                          host_mem_gib=None, attention=attention))
    h, kv = shape.hidden_size, shape.num_key_value_heads * shape.head_dim
    assert per_layer("sdpa") - per_layer("varlen") == 2 * (3 * h - 2 * kv)


def test_plan_input_plans_packed_auto_attention_as_varlen():
    from clustertune.config import recipe_from_dict
    from clustertune.plan_cli import attention_kind
    def recipe(**model_and_data):
        return recipe_from_dict({"run": {"output_dir": "/runs/x"}, "model": {"path": "tiny", **model_and_data.get("model", {})},
                                 "data": {"train_files": ["/d.jsonl"], **model_and_data.get("data", {})},
                                 "train": {"max_steps": 1}})
    assert attention_kind(recipe()) == "varlen"  # packing is the default
    assert attention_kind(recipe(data={"packing": False})) == "sdpa"
    assert attention_kind(recipe(model={"attn_implementation": "sdpa"})) == "sdpa"
    assert attention_kind(recipe(model={"attn_implementation": "eager"})) == "eager"


def test_allocator_mode_comes_from_the_forwarded_alloc_conf():
    from clustertune.plan import FRAGMENTATION, FRAGMENTATION_FIXED_BLOCKS, expandable_segments_on
    assert expandable_segments_on(None)  # unset: the worker's default
    assert expandable_segments_on("expandable_segments:True")
    assert expandable_segments_on("max_split_size_mb:512, expandable_segments:true")
    assert not expandable_segments_on("")  # set, even empty: torch's own default
    assert not expandable_segments_on("expandable_segments:False")
    assert not expandable_segments_on("max_split_size_mb:512")
    inp = PlanInput(QWEN_1_5B, tokens_per_micro_batch=32768, seq_len=4096, world_size=1, gpus_per_node=1,
                    gpu_mem_gib=79.6, host_mem_gib=None)
    blocks = dataclasses.replace(inp, expandable_segments=False)
    option = Option(1, False, False, True)
    grown, fixed = gpu_memory(inp, option), gpu_memory(blocks, option)
    assert grown.allocated_peak == fixed.allocated_peak
    assert fixed.fragmentation / grown.fragmentation == pytest.approx(FRAGMENTATION_FIXED_BLOCKS / FRAGMENTATION)


def test_a_step_that_fits_one_row_has_no_accumulation_and_its_gradients_come_in_backward():
    """16 samples of 2048 tokens in 32k rows: one row per step, so ZeRO-0's gradients (freed by every
    step) appear in backward as the activations go; 16k rows: two rows, the first row's gradients are
    there for the whole second one."""
    inp = PlanInput(QWEN_1_5B, tokens_per_micro_batch=32768, seq_len=2048, world_size=1, gpus_per_node=1,
                    gpu_mem_gib=79.6, host_mem_gib=None, step_tokens=16 * 2048, attention="varlen")
    assert not inp.accumulates(32768) and inp.accumulates(16384)
    assert dataclasses.replace(inp, step_tokens=None).accumulates(32768)  # unknown: assume several rows
    zero0 = Option(0, False, False, True)
    one_row, two_rows = gpu_memory(inp, zero0, 32768), gpu_memory(inp, zero0, 16384)
    assert one_row.grads == two_rows.grads == pytest.approx(2 * QWEN_1_5B.parameter_count() / GIB)
    assert two_rows.grads_with_activations == two_rows.grads
    assert one_row.grads_with_activations < 0.2 * one_row.grads  # the lm_head's and one layer's
    # ZeRO-2 keeps its gradient partition allocated: counted whole either way
    zero2 = gpu_memory(inp, Option(2, False, False, True), 32768)
    assert zero2.grads_with_activations == zero2.grads
