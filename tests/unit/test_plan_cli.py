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
# a comment that --write drops (the .bak keeps it)
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
    assert "recommended: ZeRO-3 + ckpt: zero.stage=3 zero.offload_optimizer=false" in out
    assert "<- recommended  (recipe now)" in out
    assert "95.6 GiB" in out and "budget 86.0 GiB" in out
    assert "checkpoint on disk (DeepSpeed, per save): 427 GiB" in out


def test_write_puts_recommendation_into_recipe_with_backup(tmp_path, capsys):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_RECIPE)
    assert main(["plan", str(path), "--gpu", "h100", "--nodes", "1", "--gpus-per-node", "1",
                 "--host-mem", "256", "--write"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "small.toml.bak").read_text() == SMALL_RECIPE
    written = load_recipe(path)
    assert (written.zero.stage, written.zero.offload_optimizer, written.zero.offload_params) == (1, False, False)
    assert written.train.gradient_checkpointing is False
    # everything else is unchanged
    before = load_recipe(tmp_path / "small.toml.bak")
    assert written.model == before.model and written.data == before.data
    assert written.train.micro_batch_tokens == 8192 and written.train.max_steps == 10


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
