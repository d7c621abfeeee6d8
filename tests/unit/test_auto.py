"""zero.stage, train.micro_batch_tokens, train.gradient_checkpointing and train.checkpoint_every_n_layers
"auto" (clustertune.auto): what the launcher resolves them to (planner on a GPU, the former defaults on
the CPU, a fallback when the GPU memory is unknown, the run's previous values on --resume), and that
ranks only get values.

    python -m pytest -q tests/unit/test_auto.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from clustertune.auto import launched_recipe, require_resolved, resolve_auto
from clustertune.config import RecipeError, recipe_from_dict
from clustertune.plan import (ROW_TOKENS_FOR_SPEED, Option, fewest_recomputed_layers, plan, speed_choice,
                              step_cost_share)
from clustertune.plan_cli import Job, plan_input
from clustertune.shapes import lookup_shape

ROOT = Path(__file__).resolve().parents[2]


def w1(**train) -> dict:
    """The W1 recipe of benchmarks/cli_vs_harness.py without its packing / micro_batch_tokens /
    gradient_checkpointing lines: Qwen2.5-1.5B shape, lengths to 4096, 32 samples per step, ZeRO-2."""
    return {**plain_w1(**train), "zero": {"stage": 2}}


def plain_w1(**train) -> dict:
    """W1 with every "auto" key at its default: nothing but the model, the data and the batch."""
    return {"run": {"output_dir": "/runs/w1"}, "model": {"path": "qwen2.5-1.5b"},
            "data": {"train_files": ["/data/w1.jsonl"], "max_length": 4096},
            "train": {"max_steps": 30, "global_batch_size": 32, **train}}


def resolve(tree: dict, *, gpu_mem_gib: float | None = 79.6, on_gpu: bool = True, nodes: int = 1,
            gpus_per_node: int = 1, **kw):
    return resolve_auto(recipe_from_dict(tree), on_gpu=on_gpu, gpu_mem_gib=gpu_mem_gib, gpu_source="test",
                        nodes=nodes, gpus_per_node=gpus_per_node, **kw)


def resolved_keys(out) -> tuple:
    r = out.recipe
    return (r.zero.stage, r.train.micro_batch_tokens, r.train.gradient_checkpointing, r.train.checkpoint_every_n_layers)


def test_the_defaults_are_packing_and_auto():
    recipe = recipe_from_dict(plain_w1())
    assert recipe.data.packing is True
    assert (recipe.zero.stage, recipe.train.micro_batch_tokens, recipe.train.gradient_checkpointing,
            recipe.train.checkpoint_every_n_layers) == ("auto",) * 4


def test_a_gpu_too_small_for_32k_rows_without_checkpointing_gets_them_with_it():
    """W1 at ZeRO-2 on 72 GiB: 32k-token rows do not fit without checkpointing (the planner's own
    table), so the fast path measured in benchmarks/RESULTS.md: one 32k row, checkpointing on, as few
    layers recomputed as fit. (On 80 GiB they fit without: session 8's measured allocator slack.)"""
    out = resolve(w1(), gpu_mem_gib=72.0)
    assert out.recipe.train.micro_batch_tokens == ROW_TOKENS_FOR_SPEED == 32768
    assert out.recipe.train.gradient_checkpointing is True
    assert out.recipe.zero.stage == 2  # explicit: kept
    # the planner's own numbers agree: ZeRO-2 without checkpointing does not fit 32k rows, with it does,
    # and n is the largest that still fits them (the fewest layers recomputed)
    job = Job(72.0, "test", 1, 1, "test", None, "")
    inp = plan_input(recipe_from_dict(w1()), lookup_shape("qwen2.5-1.5b"), job)
    estimates = {e.option: e for e in plan(inp).estimates}
    z2 = {o.gradient_checkpointing: e for o, e in estimates.items() if o.stage == 2 and not o.offload_optimizer}
    assert not z2[False].fits and z2[True].fits and z2[True].max_tokens >= 32768
    every = fewest_recomputed_layers(inp, Option(2, False, False, True), 32768)
    assert every > 2 and out.recipe.train.checkpoint_every_n_layers == every
    assert out.note.startswith("auto: train.micro_batch_tokens = 32,768, train.gradient_checkpointing = true, "
                               f"train.checkpoint_every_n_layers = {every} (planner: ZeRO-2 + ckpt on 72.0 GiB GPUs "
                               "[test], 1 rank(s)")


def test_a_plain_recipe_on_one_h100_gets_zero1_and_the_fewest_recomputed_layers_that_fit():
    """The measured fast path of W1 on one H100 (benchmarks/RESULTS.md, issue 13): ZeRO-1 with fp32
    gradient accumulation (DeepSpeed's BF16_Optimizer, +4.2% over ZeRO-0), one 32k-token row, and as
    few recomputed layers as fit (the lean MLP, session 7: every layer not recomputed pays) -- from a
    recipe that names none of these keys; the line names each key it set."""
    out = resolve(plain_w1(), gpu_mem_gib=80.0)
    job = Job(80.0, "test", 1, 1, "test", None, "")
    inp = plan_input(recipe_from_dict(plain_w1()), lookup_shape("qwen2.5-1.5b"), job)
    assert inp.lean_mlp
    every = fewest_recomputed_layers(inp, Option(1, False, False, True), 32768)
    # 1 of 28 layers (session 8: measured allocator slack, immediate_grad_update); session 7 fitted 7 of
    # 28, session 6 (no lean MLP) every 2nd; without checkpointing it does not fit
    assert every == 28
    assert not next(e for e in plan(inp).estimates if e.option == Option(1, False, False, False)).fits
    assert resolved_keys(out) == (1, 32768, True, every)
    assert out.note.startswith("auto: zero.stage = 1, train.micro_batch_tokens = 32,768, "
                               f"train.gradient_checkpointing = true, train.checkpoint_every_n_layers = {every} "
                               "(planner: ZeRO-1 + ckpt on 80.0 GiB GPUs [test], 1 rank(s)")
    # ZeRO-0 would fit fewer recomputed layers, but not enough fewer to pay for its slower optimizer
    z0_every = fewest_recomputed_layers(inp, Option(0, False, False, True), 32768)
    assert z0_every >= every
    assert step_cost_share(inp, Option(1, False, False, True), every) <= \
        step_cost_share(inp, Option(0, False, False, True), z0_every)
    # on 2 x 80 GiB ZeRO-1 (half the optimizer states) needs no recompute at all
    assert resolved_keys(resolve(plain_w1(), gpu_mem_gib=80.0, gpus_per_node=2)) == (1, 32768, False, 1)
    # a row that only fits with every layer recomputed gets n = 1 (a 40 GiB GPU)
    small = resolve(plain_w1(), gpu_mem_gib=40.0)
    assert small.recipe.train.gradient_checkpointing is True and small.recipe.train.checkpoint_every_n_layers == 1


@pytest.mark.parametrize("nodes, gpus_per_node", [(1, 2), (2, 8)])
def test_several_ranks_get_the_planners_stage(nodes, gpus_per_node):
    """Several ranks: no ZeRO-0 (not offered there); the stage `clustertune plan` recommends for the
    job (its fastest fitting option, ZeRO-1 before ZeRO-2 with accumulation), with its rows and n."""
    out = resolve(plain_w1(), gpu_mem_gib=80.0, nodes=nodes, gpus_per_node=gpus_per_node)
    job = Job(80.0, "test", nodes, gpus_per_node, "test", None, "")
    result = plan(plan_input(recipe_from_dict(plain_w1()), lookup_shape("qwen2.5-1.5b"), job))
    best = speed_choice(result, shortest_row=4096, packing=True)
    assert out.recipe.zero.stage == best.estimate.option.stage == 1
    # 2 ranks: 2 of 28 layers recomputed fit; 16 ranks (ZeRO-1 states over 16): none
    assert resolved_keys(out) == (1, 32768, best.estimate.option.gradient_checkpointing,
                                  best.checkpoint_every_n_layers)
    assert best.checkpoint_every_n_layers > 2 or not best.estimate.option.gradient_checkpointing
    assert f"{nodes * gpus_per_node} rank(s)" in out.note


@pytest.mark.parametrize("zero", [{"offload_params": True}, {"param_persistence_threshold": 0},
                                  {"hpz_partition_size": 8}, {"quantized_weights": True},
                                  {"quantized_gradients": True}, {"sub_group_size": 100_000_000},
                                  {"prefetch_bucket_size": 1000}])
def test_a_zero3_only_key_makes_auto_stage_3(zero):
    tree = {**plain_w1(), "zero": zero}
    assert recipe_from_dict(tree).zero.stage == "auto"  # accepted with stage "auto"
    one_gpu = [] if "hpz_partition_size" in zero else [{"gpu_mem_gib": 80.0}]  # hpz: a node's 8 GPUs
    for kw in [{"gpu_mem_gib": 80.0, "nodes": 2, "gpus_per_node": 8}, *one_gpu, {"gpu_mem_gib": None},
               {"on_gpu": False}]:
        assert resolve(tree, **kw).recipe.zero.stage == 3, kw
    key = next(iter(zero))
    with pytest.raises(RecipeError, match=f'zero.{key} needs zero.stage = 3 or "auto" \\(got stage 2\\)'):
        recipe_from_dict({**plain_w1(), "zero": {**zero, "stage": 2}})


def test_optimizer_offload_keeps_a_partitioning_stage():
    """zero.offload_optimizer with stage "auto": never ZeRO-0 (which cannot offload); the fastest
    stage >= 1 that fits, i.e. the lowest one here."""
    tree = {**plain_w1(), "zero": {"offload_optimizer": True}}
    for kw in ({"nodes": 1, "gpus_per_node": 1}, {"nodes": 2, "gpus_per_node": 8}):
        out = resolve(tree, gpu_mem_gib=80.0, **kw)
        assert out.recipe.zero.stage == 1 and out.recipe.zero.offload_optimizer, kw
        assert "ZeRO-1 + opt offload" in out.note
    with pytest.raises(RecipeError, match="offload_optimizer needs zero.stage >= 1"):
        recipe_from_dict({**plain_w1(), "zero": {"offload_optimizer": True, "stage": 0}})


def test_lora_dpo_and_grpo_resolve_sensibly():
    # LoRA: no ZeRO-0 (its optimizer states are small, that path not run here): ZeRO-1 on one GPU, and
    # the small states leave room for 32k rows without recompute on 80 GiB, not on 40
    lora = {**plain_w1(), "lora": {"enabled": True}}
    assert resolved_keys(resolve(lora, gpu_mem_gib=80.0)) == (1, 32768, False, 1)
    assert resolved_keys(resolve(lora, gpu_mem_gib=40.0))[:3] == (1, 32768, True)
    # DPO: a pair per row (2 x max_length), ZeRO-1 on one GPU like SFT
    dpo = resolve(plain_w1(objective="dpo"), gpu_mem_gib=80.0)
    assert dpo.recipe.zero.stage == 1 and dpo.recipe.train.micro_batch_tokens >= 2 * 4096
    # GRPO (the shipped 32B LoRA recipe, its stage left to "auto"): the rollout is planned too; the base
    # stays whole on each of 8 H100s at ZeRO-1; one H100 holds no option: ZeRO-3, the least memory
    from clustertune.config import load_recipe
    grpo = load_recipe(ROOT / "configs" / "r1-distill-32b-grpo-lora.toml", ['zero.stage="auto"'])
    eight = resolve_auto(grpo, on_gpu=True, gpu_mem_gib=79.6, gpu_source="test", nodes=1, gpus_per_node=8)
    assert eight.recipe.zero.stage == 1 and eight.recipe.train.gradient_checkpointing is True
    one = resolve_auto(grpo, on_gpu=True, gpu_mem_gib=79.6, gpu_source="test", nodes=1, gpus_per_node=1)
    assert one.recipe.zero.stage == 3 and "no option of this recipe fits" in one.note


def test_a_small_model_fits_the_32k_row_without_checkpointing():
    out = resolve({**w1(), "model": {"path": "tiny"}}, gpu_mem_gib=80.0)
    assert (out.recipe.train.micro_batch_tokens, out.recipe.train.gradient_checkpointing) == (32768, False)


def test_a_small_gpu_gets_a_smaller_row():
    out = resolve(w1(), gpu_mem_gib=24.0)
    tokens = out.recipe.train.micro_batch_tokens
    assert 4096 <= tokens < 32768 and tokens % 1024 == 0 and out.recipe.train.gradient_checkpointing is True


def test_the_cpu_keeps_the_former_defaults():
    out = resolve(w1(), on_gpu=False)
    assert (out.recipe.train.micro_batch_tokens, out.recipe.train.gradient_checkpointing) == (8192, False)
    assert "CPU" in out.note
    # the plain recipe: ZeRO-2 (the former default), every layer (none: checkpointing is off)
    assert resolved_keys(resolve(plain_w1(), on_gpu=False, gpus_per_node=2)) == (2, 8192, False, 1)
    # checkpointing asked for on the CPU: n = 1, nothing to plan with
    assert resolved_keys(resolve(plain_w1(gradient_checkpointing=True), on_gpu=False)) == (2, 8192, True, 1)
    # a DPO pair shares a row: never below 2 x max_length
    dpo = resolve({**w1(objective="dpo"), "data": {"train_files": ["/d.jsonl"], "max_length": 8192}}, on_gpu=False)
    assert dpo.recipe.train.micro_batch_tokens == 16384


def test_explicit_values_are_never_changed():
    every = w1(micro_batch_tokens=16384, gradient_checkpointing=True, checkpoint_every_n_layers=3)
    out = resolve(every)
    assert out.note is None and out.recipe == recipe_from_dict(every)
    # one explicit: kept; the other planned for it (16k rows fit without checkpointing on an H100;
    # without checkpointing n is 1)
    out = resolve(w1(micro_batch_tokens=16384))
    assert (out.recipe.train.micro_batch_tokens, out.recipe.train.gradient_checkpointing) == (16384, False)
    assert out.recipe.train.checkpoint_every_n_layers == 1
    assert out.note.startswith("auto: train.gradient_checkpointing = false, train.checkpoint_every_n_layers = 1 "
                               "(planner: ZeRO-2 on")
    # explicit stage and n on a plain recipe: kept, the rest planned around them (n = 8 keeps more
    # activations: on 72 GiB a smaller row than 32k fits)
    assert resolved_keys(resolve(plain_w1(checkpoint_every_n_layers=8) | {"zero": {"stage": 1}},
                                 gpu_mem_gib=72.0)) == (1, 30720, True, 8)
    out = resolve(w1(gradient_checkpointing=False), gpu_mem_gib=72.0)
    assert out.recipe.train.gradient_checkpointing is False
    assert out.recipe.train.micro_batch_tokens < 32768  # the largest row without checkpointing


def test_unknown_gpu_memory_falls_back_and_says_so():
    out = resolve(w1(), gpu_mem_gib=None)
    assert (out.recipe.train.micro_batch_tokens, out.recipe.train.gradient_checkpointing) == (8192, True)
    assert "GPU memory unknown (test)" in out.note and "clustertune plan" in out.note
    assert resolved_keys(resolve(plain_w1(), gpu_mem_gib=None, nodes=2, gpus_per_node=8)) == (2, 8192, True, 1)
    # a model whose size is unknown here: the same values
    unknown = {**plain_w1(), "model": {"path": "/nowhere/my-model"}}
    out = resolve(unknown, gpu_mem_gib=80.0)
    assert resolved_keys(out) == (2, 8192, True, 1) and "model size unknown here" in out.note


def test_selective_checkpointing_makes_auto_checkpoint():
    for kw in ({"on_gpu": False}, {"gpu_mem_gib": 80.0}, {"gpu_mem_gib": None}):
        out = resolve(w1(checkpoint_every_n_layers=2), **kw)
        assert out.recipe.train.gradient_checkpointing is True, kw
    with pytest.raises(RecipeError, match="needs train.gradient_checkpointing = true or \"auto\""):
        recipe_from_dict(w1(checkpoint_every_n_layers=2, gradient_checkpointing=False))


def test_resume_takes_the_previous_launch_values(tmp_path):
    from clustertune.config import recipe_to_toml
    run_dir = tmp_path / "run"
    (run_dir / "launch").mkdir(parents=True)
    first = recipe_from_dict(plain_w1(micro_batch_tokens=20480, gradient_checkpointing=False,
                                      checkpoint_every_n_layers=1) | {"zero": {"stage": 1}})
    (run_dir / "launch" / "recipe.toml").write_text(recipe_to_toml(first))
    started = launched_recipe(run_dir)
    # an H100 would plan ZeRO-0 and n = 2 for the plain recipe: the run keeps what it started with
    out = resolve(plain_w1(), gpu_mem_gib=80.0, started_with=started)
    assert resolved_keys(out) == (1, 20480, False, 1)
    assert out.note.startswith("auto: zero.stage = 1, train.micro_batch_tokens = 20,480") and "--resume" in out.note
    assert launched_recipe(tmp_path / "none") is None


def test_a_worker_refuses_auto():
    with pytest.raises(RecipeError, match="train.micro_batch_tokens, train.gradient_checkpointing, "
                                          "train.checkpoint_every_n_layers = \"auto\" reached a worker"):
        require_resolved(recipe_from_dict(w1()))
    with pytest.raises(RecipeError, match="^zero.stage = \"auto\" reached a worker"):
        require_resolved(recipe_from_dict(plain_w1(micro_batch_tokens=8192, gradient_checkpointing=False,
                                                   checkpoint_every_n_layers=1)))
    require_resolved(resolve(plain_w1(), on_gpu=False).recipe)
    require_resolved(resolve(plain_w1(), gpu_mem_gib=80.0).recipe)


@pytest.mark.parametrize("key, value, message", [
    ("micro_batch_tokens", "fast", 'expected a whole number >= 8 or "auto"'),
    ("micro_batch_tokens", 4, 'must be >= 8 (or "auto")'),
    ("micro_batch_tokens", True, 'expected a whole number >= 8 or "auto"'),
    ("gradient_checkpointing", "fast", 'expected true, false or "auto"'),
    ("gradient_checkpointing", 1, 'expected true, false or "auto"'),
    ("checkpoint_every_n_layers", "some", 'expected a whole number >= 1 or "auto"'),
    ("checkpoint_every_n_layers", 0, 'must be >= 1 (or "auto")'),
    ("checkpoint_every_n_layers", 2.0, 'expected a whole number >= 1 or "auto"'),
])
def test_junk_is_an_error_naming_the_key(key, value, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(w1(**{key: value}))
    assert f"train.{key}: {message}" in str(err.value)


@pytest.mark.parametrize("value", ["fast", 4, -1, True, 2.0, "2"])
def test_a_junk_stage_is_an_error_naming_the_key(value):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({**plain_w1(), "zero": {"stage": value}})
    assert 'zero.stage: expected 0, 1, 2, 3 or "auto"' in str(err.value)


@pytest.mark.parametrize("key, value", [("micro_batch_tokens", "auto"), ("micro_batch_tokens", 4096),
                                        ("micro_batch_tokens", 32768), ("gradient_checkpointing", "auto"),
                                        ("gradient_checkpointing", True), ("gradient_checkpointing", False),
                                        ("checkpoint_every_n_layers", "auto"), ("checkpoint_every_n_layers", 1),
                                        ("checkpoint_every_n_layers", 3)])
def test_auto_ints_and_bools_validate(key, value):
    assert getattr(recipe_from_dict(w1(**{key: value})).train, key) == value


def test_plan_prints_what_auto_resolves_to(tmp_path, capsys):
    from clustertune.cli import main
    from clustertune.config import recipe_to_toml
    path = tmp_path / "w1.toml"
    path.write_text(recipe_to_toml(recipe_from_dict(w1())))
    assert main(["plan", str(path), "--gpu-mem", "72", "--nodes", "1", "--gpus-per-node", "1",
                 "--samples", "1400", "--tokens-per-sample", "1500", "--write"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("auto: train.micro_batch_tokens = 32,768, train.gradient_checkpointing = true")
    assert "32768 tokens per micro-batch" in out
    written = recipe_from_dict(__import__("tomllib").loads(path.read_text())).train  # --write: explicit values
    assert written.micro_batch_tokens == 32768 and written.gradient_checkpointing is True


def test_plan_of_a_plain_recipe_shows_and_writes_what_train_resolves(tmp_path, capsys):
    from clustertune.cli import main
    path = tmp_path / "w1.toml"
    path.write_text('[model]\npath = "qwen2.5-1.5b"\n[data]\ntrain_files = ["/data/w1.jsonl"]\nmax_length = 4096\n'
                    '[train]\nmax_steps = 30\nglobal_batch_size = 32\n')
    flags = ["--gpu-mem", "80", "--samples", "1400", "--tokens-per-sample", "1500"]
    assert main(["plan", str(path), *flags, "--nodes", "1", "--gpus-per-node", "1", "--write"]) == 0
    out = capsys.readouterr().out
    every = resolve(plain_w1(), gpu_mem_gib=80.0).recipe.train.checkpoint_every_n_layers  # what train takes
    assert every > 2
    assert out.startswith("auto: zero.stage = 1, train.micro_batch_tokens = 32,768, train.gradient_checkpointing = "
                          f"true, train.checkpoint_every_n_layers = {every} (planner: ZeRO-1 + ckpt")
    assert "recommended: ZeRO-1 + ckpt: zero.stage=1" in out
    written = recipe_from_dict(__import__("tomllib").loads(path.read_text()))
    assert (written.zero.stage, written.train.micro_batch_tokens, written.train.gradient_checkpointing,
            written.train.checkpoint_every_n_layers) == (1, 32768, True, every)
    # 2 x 8 GPUs: the same line as a launch there
    path.write_text(path.with_name("w1.toml.bak").read_text())
    assert main(["plan", str(path), *flags, "--nodes", "2", "--gpus-per-node", "8"]) == 0
    # (ZeRO-1 states over 16 ranks leave room for 32k rows with no layer recomputed)
    assert capsys.readouterr().out.startswith(
        "auto: zero.stage = 1, train.micro_batch_tokens = 32,768, train.gradient_checkpointing = false, "
        "train.checkpoint_every_n_layers = 1 (planner: ZeRO-1 on 80.0 GiB GPUs [--gpu-mem 80 (GiB)], 16 rank(s)")


def test_a_launch_hands_ranks_values_and_resume_keeps_them(tmp_path, monkeypatch, capsys):
    """`launch --launcher slurm` (no doctor: GPU memory unknown) writes RUN/launch/recipe.toml with the
    fallback values; a --resume launch after the file says otherwise keeps the file's values."""
    from clustertune.cluster.launch import cmd_launch
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, '
                                          '{"role": "assistant", "content": "b"}]}\n')
    (tmp_path / "r.toml").write_text('[run]\noutput_dir = "runs/sft"\n[model]\npath = "tiny"\n'
                                     '[data]\ntrain_files = ["train.jsonl"]\n[train]\nmax_steps = 2\n')
    args = argparse.Namespace(recipe="r.toml", overrides=[], launcher="slurm", resume=False,
                              cluster=str(ROOT / "configs" / "cluster-example.toml"), skip_doctor=False)
    assert cmd_launch(args) == 0
    handed = tmp_path / "runs" / "sft" / "launch" / "recipe.toml"
    text = handed.read_text()
    assert "micro_batch_tokens = 8192" in text and "gradient_checkpointing = true" in text
    assert 'micro_batch_tokens = "auto"' not in text and 'gradient_checkpointing = "auto"' not in text
    assert "\nstage = 2\n" in text and "checkpoint_every_n_layers = 1" in text
    assert 'stage = "auto"' not in text and 'checkpoint_every_n_layers = "auto"' not in text
    assert "auto: zero.stage = 2, train.micro_batch_tokens = 8,192, train.gradient_checkpointing = true, " \
           "train.checkpoint_every_n_layers = 1 (GPU memory unknown (the doctor, which reads every node's GPUs, " \
           "did not run" in capsys.readouterr().err
    handed.write_text(text.replace("micro_batch_tokens = 8192", "micro_batch_tokens = 12288"))
    assert cmd_launch(argparse.Namespace(**{**vars(args), "resume": True})) == 0
    assert "micro_batch_tokens = 12288" in handed.read_text()
    assert "--resume: as the run's previous launch resolved them" in capsys.readouterr().err


def test_the_doctor_reads_each_nodes_smallest_gpu_and_launch_plans_for_the_smallest(tmp_path, monkeypatch):
    import os
    import sys
    from types import SimpleNamespace

    from clustertune.cluster import remote_snippets
    from clustertune.cluster.launch import smallest_gpu_memory
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(
        '#!/bin/sh\nif [ "$1" = "-L" ]; then echo "GPU 0: NVIDIA H100 (UUID: a)"; echo "GPU 1: NVIDIA H100 (UUID: b)";\n'
        'else echo "NVIDIA H100 80GB HBM3, 81559"; echo "NVIDIA H100 80GB HBM3, 81000"; fi\n')
    (fake / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = remote_snippets.probe({"python": sys.executable, "paths": [], "master_addr": "127.0.0.1",
                                 "output_dir": str(tmp_path)})
    assert out["gpus"] == 2 and out["gpu_memory"] == ["NVIDIA H100 80GB HBM3", 81000.0]
    report = SimpleNamespace(gpu_memory={"a": ("NVIDIA H100 80GB HBM3", 79.6), "b": ("NVIDIA A100-SXM4-40GB", 40.0)})
    (gib, source), _ = smallest_gpu_memory(report, local=False)
    assert gib == 40.0 and "on b" in source
    assert smallest_gpu_memory(SimpleNamespace(gpu_memory={}), local=False) == (
        None, "nvidia-smi on the nodes gave no GPU memory")
    assert "did not run" in smallest_gpu_memory(None, local=False)[1]
    # this machine (train, launch without --cluster): nvidia-smi here, the same stand-in
    (gib, source), _ = smallest_gpu_memory(None, local=True)
    assert gib == 81559 / 1024 and "this machine, nvidia-smi" in source


def test_explicit_fp32_accumulation_keeps_auto_stage_at_zero1():
    """zero.grad_accum_dtype = "fp32" is ZeRO-1's only: where the planner alone picks ZeRO-0 (a 64 GiB card:
    ZeRO-1's fp32 buffer costs more recompute than ZeRO-0's slower step) or nothing fits or nothing is
    planned, "auto" is 1."""
    assert resolve(plain_w1(), gpu_mem_gib=64.0).recipe.zero.stage == 0  # what "auto" alone picks there
    # 24 GiB: nothing fits (ZeRO-1 nevertheless, the note says so); no GPU memory known; the CPU
    for kw in ({"gpu_mem_gib": 80.0}, {"gpu_mem_gib": 64.0}, {"gpu_mem_gib": 24.0}, {"gpu_mem_gib": None},
               {"on_gpu": False}):
        out = resolve(plain_w1() | {"zero": {"grad_accum_dtype": "fp32"}}, **kw)
        assert out.recipe.zero.stage == 1, (kw, out.note)
    assert "no option of this recipe fits" in resolve(plain_w1() | {"zero": {"grad_accum_dtype": "fp32"}},
                                                      gpu_mem_gib=24.0).note
