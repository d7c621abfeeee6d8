"""train.micro_batch_tokens / train.gradient_checkpointing "auto" (clustertune.auto): what the
launcher resolves them to (planner on a GPU, the former defaults on the CPU, a fallback when the GPU
memory is unknown, the run's previous values on --resume), and that ranks only get values.

    python -m pytest -q tests/unit/test_auto.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from clustertune.auto import launched_train_section, require_resolved, resolve_auto
from clustertune.config import RecipeError, recipe_from_dict
from clustertune.plan import ROW_TOKENS_FOR_SPEED, plan
from clustertune.plan_cli import Job, plan_input
from clustertune.shapes import lookup_shape

ROOT = Path(__file__).resolve().parents[2]


def w1(**train) -> dict:
    """The W1 recipe of benchmarks/cli_vs_harness.py without its packing / micro_batch_tokens /
    gradient_checkpointing lines: Qwen2.5-1.5B shape, lengths to 4096, 32 samples per step, ZeRO-2."""
    return {"run": {"output_dir": "/runs/w1"}, "model": {"path": "qwen2.5-1.5b"},
            "data": {"train_files": ["/data/w1.jsonl"], "max_length": 4096},
            "train": {"max_steps": 30, "global_batch_size": 32, **train}, "zero": {"stage": 2}}


def resolve(tree: dict, *, gpu_mem_gib: float | None = 79.6, on_gpu: bool = True, **kw):
    return resolve_auto(recipe_from_dict(tree), on_gpu=on_gpu, gpu_mem_gib=gpu_mem_gib, gpu_source="test",
                        nodes=1, gpus_per_node=1, **kw)


def test_the_defaults_are_packing_and_auto():
    train = recipe_from_dict(w1()).train
    assert recipe_from_dict(w1()).data.packing is True
    assert train.micro_batch_tokens == "auto" and train.gradient_checkpointing == "auto"


def test_an_h100_gets_the_planners_32k_row_with_checkpointing():
    """W1 on 80 GiB: 32k-token rows do not fit without checkpointing (the planner's own table), so
    the fast path measured in benchmarks/RESULTS.md: one 32k row, checkpointing on."""
    out = resolve(w1(), gpu_mem_gib=80.0)
    assert out.recipe.train.micro_batch_tokens == ROW_TOKENS_FOR_SPEED == 32768
    assert out.recipe.train.gradient_checkpointing is True
    assert out.note.startswith("auto: train.micro_batch_tokens = 32,768, train.gradient_checkpointing = true "
                               "(planner: ZeRO-2 + ckpt on 80.0 GiB GPUs [test], 1 rank(s)")
    # the planner's own numbers agree: ZeRO-2 without checkpointing does not fit 32k rows, with it does
    job = Job(80.0, "test", 1, 1, "test", None, "")
    estimates = {e.option: e for e in plan(plan_input(recipe_from_dict(w1()), lookup_shape("qwen2.5-1.5b"), job)).estimates}
    z2 = {o.gradient_checkpointing: e for o, e in estimates.items() if o.stage == 2 and not o.offload_optimizer}
    assert not z2[False].fits and z2[True].fits and z2[True].max_tokens >= 32768


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
    # a DPO pair shares a row: never below 2 x max_length
    dpo = resolve({**w1(objective="dpo"), "data": {"train_files": ["/d.jsonl"], "max_length": 8192}}, on_gpu=False)
    assert dpo.recipe.train.micro_batch_tokens == 16384


def test_explicit_values_are_never_changed():
    both = w1(micro_batch_tokens=16384, gradient_checkpointing=True)
    out = resolve(both)
    assert out.note is None and out.recipe == recipe_from_dict(both)
    # one explicit: kept; the other planned for it (16k rows fit without checkpointing on an H100)
    out = resolve(w1(micro_batch_tokens=16384))
    assert (out.recipe.train.micro_batch_tokens, out.recipe.train.gradient_checkpointing) == (16384, False)
    assert out.note.startswith("auto: train.gradient_checkpointing = false (planner: ZeRO-2 on")
    out = resolve(w1(gradient_checkpointing=False))
    assert out.recipe.train.gradient_checkpointing is False
    assert out.recipe.train.micro_batch_tokens < 32768  # the largest row without checkpointing


def test_unknown_gpu_memory_falls_back_and_says_so():
    out = resolve(w1(), gpu_mem_gib=None)
    assert (out.recipe.train.micro_batch_tokens, out.recipe.train.gradient_checkpointing) == (8192, True)
    assert "GPU memory unknown (test)" in out.note and "clustertune plan" in out.note


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
    first = recipe_from_dict(w1(micro_batch_tokens=20480, gradient_checkpointing=False))
    (run_dir / "launch" / "recipe.toml").write_text(recipe_to_toml(first))
    started = launched_train_section(run_dir)
    out = resolve(w1(), gpu_mem_gib=80.0, started_with=started)
    assert (out.recipe.train.micro_batch_tokens, out.recipe.train.gradient_checkpointing) == (20480, False)
    assert "--resume" in out.note
    assert launched_train_section(tmp_path / "none") is None


def test_a_worker_refuses_auto():
    with pytest.raises(RecipeError, match="train.micro_batch_tokens, train.gradient_checkpointing = \"auto\" "
                                          "reached a worker"):
        require_resolved(recipe_from_dict(w1()).train)
    require_resolved(resolve(w1(), on_gpu=False).recipe.train)


@pytest.mark.parametrize("key, value, message", [
    ("micro_batch_tokens", "fast", 'expected a whole number >= 8 or "auto"'),
    ("micro_batch_tokens", 4, 'must be >= 8 (or "auto")'),
    ("micro_batch_tokens", True, 'expected a whole number >= 8 or "auto"'),
    ("gradient_checkpointing", "fast", 'expected true, false or "auto"'),
    ("gradient_checkpointing", 1, 'expected true, false or "auto"'),
])
def test_junk_is_an_error_naming_the_key(key, value, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(w1(**{key: value}))
    assert f"train.{key}: {message}" in str(err.value)


@pytest.mark.parametrize("key, value", [("micro_batch_tokens", "auto"), ("micro_batch_tokens", 4096),
                                        ("micro_batch_tokens", 32768), ("gradient_checkpointing", "auto"),
                                        ("gradient_checkpointing", True), ("gradient_checkpointing", False)])
def test_auto_ints_and_bools_validate(key, value):
    assert getattr(recipe_from_dict(w1(**{key: value})).train, key) == value


def test_plan_prints_what_auto_resolves_to(tmp_path, capsys):
    from clustertune.cli import main
    from clustertune.config import recipe_to_toml
    path = tmp_path / "w1.toml"
    path.write_text(recipe_to_toml(recipe_from_dict(w1())))
    assert main(["plan", str(path), "--gpu-mem", "80", "--nodes", "1", "--gpus-per-node", "1",
                 "--samples", "1400", "--tokens-per-sample", "1500", "--write"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("auto: train.micro_batch_tokens = 32,768, train.gradient_checkpointing = true")
    assert "32768 tokens per micro-batch" in out
    written = recipe_from_dict(__import__("tomllib").loads(path.read_text())).train  # --write: explicit values
    assert written.micro_batch_tokens == 32768 and written.gradient_checkpointing is True


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
    assert "auto: train.micro_batch_tokens = 8,192, train.gradient_checkpointing = true (GPU memory unknown " \
           "(the doctor, which reads every node's GPUs, did not run" in capsys.readouterr().err
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
