"""`clustertune plan`: the shipped 32B/H20 recipe, --write, --cluster, clear errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from clustertune.cli import main
from clustertune.config import load_recipe
from clustertune.gpus import lookup_gpu
from clustertune.plan_cli import tokens_per_micro_batch

ROOT = Path(__file__).resolve().parents[2]
R1_RECIPE = ROOT / "configs" / "r1-distill-32b-2x8-h20.toml"
H20_JOB = ["--nodes", "2", "--gpus-per-node", "8", "--gpu", "h20", "--host-mem", "1024"]

SMALL_RECIPE = """\
# a comment that --write keeps
[model]
path = "qwen2.5-1.5b"
[data]
train_files = ["train.jsonl"]
max_length = 2048
packing = true
[train]
max_steps = 10
micro_batch_tokens = 8192
gradient_checkpointing = true
[zero]
stage = 3
"""


def test_shipped_r1_recipe_plans_zero3_ckpt(capsys):
    recipe = load_recipe(R1_RECIPE)
    assert tokens_per_micro_batch(recipe) == 4096
    assert main(["plan", str(R1_RECIPE), *H20_JOB]) == 0
    out = capsys.readouterr().out
    # the model directory is not on this machine: the built-in shape of the same name is used
    assert "planned with the built-in shape deepseek-r1-distill-qwen-32b" in out
    # the table's first that fits is ZeRO-3 without checkpointing (the lean MLP's memory, session 7) on the
    # recipe's 4k rows; the recommendation (what --write takes) is 32k rows with checkpointing: fewer,
    # larger micro-batches first (plan.speed_choice)
    assert ("recommended: ZeRO-3 + ckpt: zero.stage=3 zero.offload_optimizer=false zero.offload_params=false "
            "train.gradient_checkpointing=true train.checkpoint_every_n_layers=1") in out
    assert "<- recommended  (recipe now)" in out
    assert "ahead of ZeRO-3, the table's first that fits" in out
    assert "train.micro_batch_tokens = 32,768 (now 4,096)" in out
    assert "95.6 GiB" in out and "budget 90.8 GiB" in out
    assert "checkpoint on disk (DeepSpeed, per save): 427 GiB" in out


def test_write_puts_recommendation_into_recipe_with_backup(tmp_path, capsys):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_RECIPE)
    assert main(["plan", str(path), "--gpu", "h100", "--nodes", "1", "--gpus-per-node", "1",
                 "--host-mem", "256", "--write"]) == 0
    out = capsys.readouterr().out
    # one GPU: ZeRO-1 (what "auto" resolves to there) on full-size 32k rows with checkpointing (rather
    # than smaller rows without: speed_choice), checkpoint_every_n_layers ("auto" in the file) written as
    # the fewest recomputed layers that fit
    assert ("wrote zero.stage = 1, train.micro_batch_tokens = 32768, train.checkpoint_every_n_layers = 28 into"
            in out)
    assert (tmp_path / "small.toml.bak").read_text() == SMALL_RECIPE
    # only the changed values changed: the comment and every other line stay as written
    assert path.read_text() == SMALL_RECIPE.replace(
        "gradient_checkpointing = true", "gradient_checkpointing = true\ncheckpoint_every_n_layers = 28"
    ).replace("stage = 3", "stage = 1").replace("micro_batch_tokens = 8192", "micro_batch_tokens = 32768")
    written = load_recipe(path)
    assert (written.zero.stage, written.zero.offload_optimizer, written.zero.offload_params) == (1, False, False)
    assert written.train.gradient_checkpointing is True and written.train.checkpoint_every_n_layers == 28
    # everything else is unchanged
    before = load_recipe(tmp_path / "small.toml.bak")
    assert written.model == before.model and written.data == before.data
    assert written.train.micro_batch_tokens == 32768 and written.train.max_steps == 10


def test_nothing_fits_returns_1_and_writes_nothing(tmp_path, capsys):
    path = tmp_path / "big.toml"
    path.write_text(SMALL_RECIPE.replace("qwen2.5-1.5b", "qwen2.5-72b"))
    assert main(["plan", str(path), "--gpu", "a10", "--nodes", "1", "--gpus-per-node", "1",
                 "--host-mem", "64", "--write"]) == 1
    assert "recommendation: none -- nothing fits" in capsys.readouterr().out
    assert not (tmp_path / "big.toml.bak").exists()


def test_cluster_file_gives_topology(monkeypatch, tmp_path, capsys):
    fake = types.ModuleType("clustertune.cluster.inventory")
    node = types.SimpleNamespace(slots=8)
    fake.load_cluster = lambda path: types.SimpleNamespace(nodes=[node, node])
    monkeypatch.setitem(sys.modules, "clustertune.cluster.inventory", fake)
    assert main(["plan", str(R1_RECIPE), "--cluster", "cluster.toml", "--gpu", "h20", "--host-mem", "1024"]) == 0
    assert "2 node(s) x 8 GPU = 16 ranks [cluster.toml]" in capsys.readouterr().out


def test_cluster_without_inventory_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "clustertune.cluster.inventory", None)  # import fails
    assert main(["plan", str(R1_RECIPE), "--cluster", "cluster.toml", "--gpu", "h20", "--host-mem", "1024"]) == 2
    assert "pass --nodes N --gpus-per-node G instead" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--gpu", "h999", "--host-mem", "64", "--gpus-per-node", "1"], "unknown GPU"),
    (["--gpu-mem", "-1", "--host-mem", "64", "--gpus-per-node", "1"], "--gpu-mem must be > 0"),
    (["--gpu", "h20", "--host-mem", "64", "--gpus-per-node", "0"], "must be >= 1"),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, extra, message):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_RECIPE)
    assert main(["plan", str(path), *extra]) == 2
    assert message in capsys.readouterr().err


def test_unpacked_recipe_plans_padded_tokens(tmp_path):
    path = tmp_path / "padded.toml"
    path.write_text(SMALL_RECIPE.replace("packing = true", "packing = false"))
    recipe = load_recipe(path, ["train.micro_batch_size=3"])
    assert tokens_per_micro_batch(recipe) == 3 * 2048


def test_gpu_catalog_names():
    assert lookup_gpu("H20").mem_gib == pytest.approx(95.6)
    assert lookup_gpu("NVIDIA H100 80GB HBM3").name == "h100"
    assert lookup_gpu("NVIDIA A100-SXM4-40GB").name == "a100-40"
    assert lookup_gpu("NVIDIA GeForce RTX 4090").name == "rtx4090"
    assert lookup_gpu("h100-nvl") is None  # 94 GB: no silent fallback to the 80 GB entry


def test_launcher_side_modules_do_not_import_torch():
    import subprocess
    code = ("import sys, clustertune.plan_cli, clustertune.report, clustertune.gpus; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_recipe_sub_group_size_shrinks_the_planned_zero3_step(tmp_path):
    """W2's case (one 1.5B rank): DeepSpeed's 1e9-element sub-groups step the whole partition at
    once; the recipe's zero.sub_group_size reaches the planner and caps the step's gradient
    copies at one sub-group (the 233M-element embedding is the largest parameter)."""
    from clustertune.plan import Option, gpu_memory
    from clustertune.plan_cli import Job, plan_input
    from clustertune.shapes import SHAPES

    path = tmp_path / "small.toml"
    path.write_text(SMALL_RECIPE)
    job = Job(gpu_mem_gib=79.6, gpu_source="test", nodes=1, gpus_per_node=1, topology_source="test",
              host_mem_gib=512, host_source="test")
    option = Option(3, offload_optimizer=False, offload_params=False, gradient_checkpointing=True)
    shape = SHAPES["qwen2.5-1.5b"]
    default, small = (gpu_memory(plan_input(load_recipe(path, overrides), shape, job), option)
                      for overrides in ([], ["zero.sub_group_size=230000000"]))
    assert default.step_transient > 4 * small.step_transient
    assert small.allocated_peak < default.allocated_peak - 3


def plan_main(*argv: str) -> int:
    return main(["plan", *argv])


def test_write_twice_keeps_every_backup_and_the_users_text(tmp_path, capsys):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_RECIPE)
    one_gpu = ["--nodes", "1", "--gpus-per-node", "1", "--host-mem", "256"]
    assert plan_main(str(path), "--gpu", "h100", *one_gpu, "--write") == 0
    first = path.read_text()
    # the same plan again: nothing to change, nothing written, no backup made
    assert plan_main(str(path), "--gpu", "h100", *one_gpu, "--write") == 0
    assert "already has the recommended settings: not written" in capsys.readouterr().out
    assert path.read_text() == first and not (tmp_path / "small.toml.bak.1").exists()
    # a larger GPU changes the recommendation: the second write makes .bak.1, .bak stays the original
    assert plan_main(str(path), "--gpu-mem", "141", *one_gpu, "--write") == 0
    assert "previous version in" in capsys.readouterr().out and "small.toml.bak.1" in str(list(tmp_path.iterdir()))
    assert (tmp_path / "small.toml.bak").read_text() == SMALL_RECIPE
    assert (tmp_path / "small.toml.bak.1").read_text() == first
    assert path.read_text().startswith("# a comment that --write keeps\n[model]\npath = \"qwen2.5-1.5b\"\n")
    assert "lr =" not in path.read_text()  # defaults are not spelled out


@pytest.mark.parametrize("flags, named", [
    (["--cluster", "c.toml", "--nodes", "4", "--gpu", "h20"], ["--cluster c.toml", "--nodes 4"]),
    (["--cluster", "c.toml", "--gpus-per-node", "4", "--gpu", "h20"], ["--cluster c.toml", "--gpus-per-node 4"]),
    (["--gpu", "h100", "--gpu-mem", "40", "--nodes", "1"], ["--gpu h100", "--gpu-mem 40"]),
])
def test_conflicting_flags_are_errors_naming_both(capsys, flags, named):
    assert plan_main(str(R1_RECIPE), *flags) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in named) and "Traceback" not in err


TINY_RECIPE = SMALL_RECIPE.replace("qwen2.5-1.5b", "tiny").replace("max_length = 2048", "max_length = 256").replace(
    "micro_batch_tokens = 8192", "micro_batch_tokens = 1024")


@pytest.mark.parametrize("topology", [["--cluster", "CLUSTER"], ["--nodes", "2", "--gpus-per-node", "8"]])
def test_host_ram_of_other_machines_is_not_the_launchers(tmp_path, capsys, monkeypatch, topology):
    """README's `plan ... --cluster cluster.toml --gpu h20` without --host-mem: the launching
    machine's RAM says nothing about the nodes; the host check is skipped and the plan says so."""
    fake = types.ModuleType("clustertune.cluster.inventory")
    node = types.SimpleNamespace(slots=8)
    fake.load_cluster = lambda path: types.SimpleNamespace(nodes=[node, node])
    monkeypatch.setitem(sys.modules, "clustertune.cluster.inventory", fake)
    # a launcher with 4 GiB of RAM: 8 ranks of the tiny model would "not fit" it
    monkeypatch.setattr("os.sysconf", lambda name: {"SC_PHYS_PAGES": 1 << 20, "SC_PAGE_SIZE": 4096}[name])
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    flags = [str(tmp_path / "c.toml") if f == "CLUSTER" else f for f in topology]
    assert plan_main(str(path), *flags, "--gpu", "h20") == 0
    out = capsys.readouterr().out
    assert "host RAM: NOT CHECKED" in out and "pass --host-mem" in out
    assert "no: host" not in out and "recommended: ZeRO-1" in out


def test_host_ram_of_this_machine_is_used_when_the_plan_is_for_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("clustertune.plan_cli.local_gpu_memory", lambda: (79.6, "H100 (this machine)", "h100"))
    monkeypatch.setattr("clustertune.plan_cli.local_gpu_count", lambda: 1)
    monkeypatch.setattr("os.sysconf", lambda name: {"SC_PHYS_PAGES": 1 << 20, "SC_PAGE_SIZE": 4096}[name])
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    assert plan_main(str(path)) == 0
    assert "host: 4 GiB/node [this machine's RAM]" in capsys.readouterr().out


def test_nothing_fits_with_lora_on_does_not_advise_lora(tmp_path, capsys):
    path = tmp_path / "lora72.toml"
    path.write_text(SMALL_RECIPE.replace("qwen2.5-1.5b", "qwen2.5-72b") + "[lora]\nenabled = true\n")
    assert plan_main(str(path), "--gpu", "h100", "--nodes", "1", "--gpus-per-node", "1", "--host-mem", "1024") == 1
    out = capsys.readouterr().out
    assert "recommendation: none -- nothing fits" in out
    assert "use LoRA" not in out
    assert "LoRA is already on: its frozen bf16 base weights alone are 135 GiB" in out
    assert "4 GPUs = 4 nodes x 1 of this size would fit (now 1)" in out


def test_nothing_fits_without_lora_advises_it_and_the_gpu_count(tmp_path, capsys):
    path = tmp_path / "full72.toml"
    path.write_text(SMALL_RECIPE.replace("qwen2.5-1.5b", "qwen2.5-72b"))
    assert plan_main(str(path), "--gpu", "h100", "--nodes", "1", "--gpus-per-node", "8", "--host-mem", "256") == 1
    out = capsys.readouterr().out
    assert "use LoRA (lora.enabled = true)" in out
    assert "24 GPUs = 3 nodes x 8 of this size would fit (now 8)" in out
    assert "GiB of host RAM per node for ZeRO-3 + opt offload + ckpt (now 256" in out


def test_seed_job_prints_a_time_estimate_with_its_assumptions(capsys):
    assert plan_main(str(R1_RECIPE), *H20_JOB, "--samples", "100000", "--tokens-per-sample", "2000") == 0
    out = capsys.readouterr().out
    text = out[out.index("time estimate (ZeRO-3 + ckpt, 16 x h20):"):]
    for expected in ("100,000 train samples [--samples]", "128,000 tokens (64 samples)",
                     "no MFU measured on h20: borrowed from H100", "100 Gb/s between nodes [ASSUMED",
                     "50% overlap ASSUMED", "3,124 steps (2 epochs x 100,000 samples / 64 per step)", "wall time: "):
        assert expected in text, expected
    faster = plan_main(str(R1_RECIPE), *H20_JOB, "--samples", "100000", "--tokens-per-sample", "2000",
                       "--inter-node-gbps", "800")
    assert faster == 0
    fast_out = capsys.readouterr().out
    assert "800 Gb/s between nodes [--inter-node-gbps]" in fast_out


def test_time_estimate_says_what_is_missing(capsys):
    assert plan_main(str(R1_RECIPE), *H20_JOB) == 0
    assert "not made: tokens per sample unknown" in capsys.readouterr().out
    assert plan_main(str(R1_RECIPE), "--nodes", "2", "--gpus-per-node", "8", "--gpu-mem", "95", "--host-mem",
                     "1024", "--tokens-per-sample", "100") == 0
    assert "not made: the GPU's peak FLOP/s is unknown" in capsys.readouterr().out


def test_time_estimate_counts_and_measures_the_data_when_it_is_here(tmp_path, capsys):
    import json
    import shutil
    model = tmp_path / "model"
    model.mkdir()
    from clustertune.shapes import SHAPES
    (model / "config.json").write_text(json.dumps(SHAPES["tiny"].hf_config_dict()))
    shutil.copy(ROOT / "src" / "clustertune" / "demo_assets" / "tokenizer" / "tokenizer.json", model)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "hello there " * 5},
                                                        {"role": "assistant", "content": "general kenobi"}]})
                              for _ in range(200)) + "\n")
    path = tmp_path / "r.toml"
    path.write_text(TINY_RECIPE.replace('path = "tiny"', f'path = "{model}"').replace(
        '"train.jsonl"', f'"{data}"').replace("max_steps = 10", "epochs = 1.0"))
    assert plan_main(str(path), "--gpu", "h100", "--nodes", "1", "--gpus-per-node", "1", "--host-mem", "64") == 0
    out = capsys.readouterr().out
    assert "200 train samples [counted in data.train_files]" in out
    assert "records tokenized with" in out and "12 steps (1 epochs x 200 samples / 16 per step)" in out


def test_wall_time_needs_the_sample_count_and_says_so(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text(TINY_RECIPE.replace("max_steps = 10", "epochs = 1.0").replace(
        '"train.jsonl"', f'"{tmp_path / "missing.jsonl"}"'))
    assert plan_main(str(path), "--gpu", "h100", "--nodes", "1", "--gpus-per-node", "1", "--host-mem", "64",
                     "--tokens-per-sample", "100") == 0
    out = capsys.readouterr().out
    assert "wall time: unknown: the number of samples is unknown (" in out and "pass --samples N" in out
    assert "step: " in out  # the step time stands without it
    assert plan_main(str(path), "--gpu", "h100", "--nodes", "1", "--gpus-per-node", "1", "--host-mem", "64",
                     "--tokens-per-sample", "100", "--samples", "3") == 0
    assert "wall time: unknown: the training set has 3 samples, fewer than one global batch" in capsys.readouterr().out


def test_packed_rows_are_proposed_as_large_as_fit_up_to_the_measured_size():
    from clustertune.plan import ROW_TOKENS_FOR_SPEED, speed_row_tokens
    assert speed_row_tokens(19_840, max_length=2048) == 19_456  # a multiple of 1024 that fits
    assert speed_row_tokens(217_600, max_length=2048) == ROW_TOKENS_FOR_SPEED == 32_768  # not beyond measured
    assert speed_row_tokens(4_500, max_length=4096) == 4096  # at least one whole sample
    assert speed_row_tokens(3_000, max_length=4096) is None  # not even one sample fits
