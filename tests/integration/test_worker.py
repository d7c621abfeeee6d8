"""The real worker, 2 CPU processes over gloo, tiny Qwen2 model: training, export, resume,
and the token-normalized loss across accumulation and world sizes."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import metrics, run_export, run_train, write_recipe

pytestmark = pytest.mark.integration


def test_two_ranks_zero2_train_checkpoint_and_export(tmp_path, task_dir):
    """The recipe defaults for how to batch and shard (packed rows; zero.stage, train.micro_batch_tokens,
    gradient_checkpointing and checkpoint_every_n_layers "auto"): on the CPU the launcher resolves
    them to ZeRO-2 / 8192 / false / 1, deterministically, says so, and the ranks read those values."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir,
                          train={"max_steps": 12, "micro_batch_size": None, "profile_step": 5},
                          data={"packing": None}, zero={"stage": None}, checkpoint={"every_steps": 6, "keep_last": 1})
    text = recipe.read_text()
    assert "packing" not in text and "micro_batch_tokens" not in text and "stage" not in text
    proc = run_train(recipe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("auto: zero.stage = 2, train.micro_batch_tokens = 8,192, train.gradient_checkpointing = false, "
            "train.checkpoint_every_n_layers = 1 (CPU: the former defaults" in proc.stderr)
    ran = (run_dir / "recipe.toml").read_text()
    assert "packing = true" in ran and "micro_batch_tokens = 8192" in ran and "gradient_checkpointing = false" in ran
    assert "\nstage = 2\n" in ran and "checkpoint_every_n_layers = 1" in ran
    assert '"stage": 2' in (run_dir / "ds_config.json").read_text()  # what DeepSpeed ran

    losses = [m["loss"] for m in metrics(run_dir)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    # the start-up clock: the first step's record and one log line say where the wait went
    first = metrics(run_dir)[0]
    assert first["step"] == 1 and 0 < first["time_to_first_step_s"] < 600
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "first step after" in log and "data" in log and "model and engine" in log

    # rotation kept only the newest complete checkpoint, with its marker
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000012"]
    assert (run_dir / "checkpoints" / "step_00000012" / "COMPLETE.json").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in (run_dir / "final").iterdir()}
    # train.profile_step: rank 0 profiled step 5 (the op table and a trace), no other step
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == ["step_5.trace.json", "step_5.txt"]
    assert (run_dir / "profile" / "step_5.txt").read_text().startswith("profiled step wall ")
    for name in ("recipe.toml", "ds_config.json", "logs/rank0.log", "logs/rank1.log"):
        assert (run_dir / name).is_file(), name

    # The export holds exactly the trained weights: DeepSpeed's own consolidation of the final
    # checkpoint (fp32 master weights, fp32 run) equals what from_pretrained loads.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000012")
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    for name, tensor in trained.items():
        key = name.removeprefix("lm.")
        torch.testing.assert_close(exported[key], tensor, msg=key)


def test_resume_continues_exactly(tmp_path, task_dir):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = write_recipe(tmp_path / "full.toml", task_dir, full_dir, train={"max_steps": 6},
                        checkpoint={"every_steps": 3, "keep_last": 3})
    assert run_train(full).returncode == 0
    reference = metrics(full_dir)

    # A run that "crashed" after its step-3 checkpoint: later state removed, then --resume.
    shutil.copytree(full_dir, cut_dir)
    shutil.rmtree(cut_dir / "checkpoints" / "step_00000006")
    shutil.rmtree(cut_dir / "final")
    (cut_dir / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (full_dir / "metrics.jsonl").read_text().splitlines()[:3]))
    resumed_recipe = write_recipe(tmp_path / "cut.toml", task_dir, cut_dir, train={"max_steps": 6},
                                  checkpoint={"every_steps": 3, "keep_last": 3})
    proc = run_train(resumed_recipe, "--resume")
    assert proc.returncode == 0
    assert "resumed from" in proc.stderr and "(step 3)" in proc.stderr
    resumed = metrics(cut_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference[3:], resumed[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)


@pytest.mark.parametrize("nproc, micro", [(1, 4), (2, 1)], ids=["1rank-micro4", "2ranks-accumulate2"])
def test_accumulation_and_world_size_give_the_big_batch_gradient(tmp_path, task_dir, nproc, micro):
    """8 samples per step of uneven length: 1 rank x 2 micro-batches of 4 (reference: 1 rank, one
    micro-batch of 8) and 2 ranks x 4 micro-batches of 1 must give the same loss and the same
    gradient norm at every step."""
    ref_dir = tmp_path / "ref"
    ref = write_recipe(tmp_path / "ref.toml", task_dir, ref_dir, train={"max_steps": 3, "micro_batch_size": 8})
    assert run_train(ref, nproc=1).returncode == 0
    run_dir = tmp_path / "run"
    other = write_recipe(tmp_path / "o.toml", task_dir, run_dir, train={"max_steps": 3, "micro_batch_size": micro})
    assert run_train(other, nproc=nproc).returncode == 0
    for a, b in zip(metrics(ref_dir), metrics(run_dir)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_zero3_lora_trains_and_exports_merged(tmp_path, task_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir, train={"max_steps": 8, "lr": 1e-2},
                          zero={"stage": 3}, lora={"enabled": True, "r": 8, "alpha": 16.0})
    proc = run_train(recipe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [m["loss"] for m in metrics(run_dir)]
    assert losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert not any("lora" in name for name in model.state_dict())


def test_bad_recipe_fails_before_any_process_starts(tmp_path, task_dir):
    recipe = write_recipe(tmp_path / "r.toml", task_dir, tmp_path / "run", train={"global_batch_size": 7})
    proc = run_train(recipe)
    assert proc.returncode != 0
    assert "train.global_batch_size (7)" in proc.stderr and "multiple" in proc.stderr


def test_offline_export_of_a_zero3_checkpoint_equals_the_run_export(tmp_path, task_dir):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir, train={"max_steps": 4},
                          zero={"stage": 3}, checkpoint={"every_steps": 2, "keep_last": 1})
    assert run_train(recipe).returncode == 0
    proc = run_export(run_dir, tmp_path / "x")
    assert proc.returncode == 0, proc.stderr
    assert "exported step 4" in proc.stdout
    a = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    probe = torch.tensor([[1, 5, 9, 12, 40, 41]])
    torch.testing.assert_close(a(probe).logits, b(probe).logits)


def test_export_without_checkpoint_is_a_clear_error(tmp_path, task_dir):
    proc = run_export(tmp_path)
    assert proc.returncode == 2
    assert "not a clustertune run directory" in proc.stderr


def test_fine_tune_from_an_exported_directory_under_zero3_with_checkpointing(tmp_path, task_dir):
    """The user's real case: a Hugging Face directory on disk (here: a first run's export, with
    its tokenizer) loaded shard by shard into ZeRO-3 partitions, trained with gradient
    checkpointing, exported again. The second run starts from the trained weights, not from a
    random init, and keeps learning."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first = write_recipe(tmp_path / "first.toml", task_dir, first_dir, train={"max_steps": 10})
    assert run_train(first).returncode == 0
    first_losses = [m["loss"] for m in metrics(first_dir)]

    second = write_recipe(tmp_path / "second.toml", task_dir, second_dir,
                          model={"path": str(first_dir / "final"), "tokenizer": str(first_dir / "final")},
                          train={"max_steps": 6, "gradient_checkpointing": True, "lr": 1e-3, "warmup_steps": 0,
                                 "seed": 8},
                          zero={"stage": 3})
    proc = run_train(second)
    assert proc.returncode == 0, proc.stderr[-2000:]
    second_losses = [m["loss"] for m in metrics(second_dir)]
    assert second_losses[0] < 0.6 * first_losses[0], (first_losses, second_losses)
    assert min(second_losses[1:]) < second_losses[0], second_losses
    reloaded = AutoModelForCausalLM.from_pretrained(second_dir / "final")
    before = AutoModelForCausalLM.from_pretrained(first_dir / "final")
    changed = [name for name, t in reloaded.state_dict().items() if not torch.equal(t, before.state_dict()[name])]
    assert changed, "the second run's export equals its starting point: nothing was trained"


def test_bad_data_fails_before_any_worker_starts(tmp_path, task_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((task_dir / "train.jsonl").read_text().splitlines()[0] + "\n{\"messages\": [{\"role\": \"user\"}]}\n")
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir, data={"train_files": [str(bad)]})
    proc = run_train(recipe, timeout=60)
    assert proc.returncode == 2
    assert f"{bad}:2: missing field: messages[0] has no 'content'" in proc.stderr
    assert "[rank" not in proc.stderr + proc.stdout and not (run_dir / "logs").exists()


def test_data_preparation_longer_than_the_collective_timeout(tmp_path, task_dir):
    """Rank 0 tokenizes (here: sleeps first) for longer than run.collective_timeout_s, as it does
    for a large dataset; rank 1 waits for it instead of timing out."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.toml", task_dir, run_dir, run={"collective_timeout_s": 10},
                          data={"cache_dir": str(tmp_path / "cache")}, train={"max_steps": 2})
    proc = run_train(recipe, env={"CLUSTERTUNE_FAULT": "sleep:data_preparation:0:15"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 sleeps 15 s at data_preparation" in proc.stdout + proc.stderr
    assert len(metrics(run_dir)) >= 2


def test_data_error_found_by_a_worker_stops_every_rank_cleanly(tmp_path, task_dir):
    """A record that parses (the launcher's check passes) but breaks the chat template fails on
    the rank that tokenizes; the other rank learns it and stops with one line, no tracebacks,
    and both exit 2 (no rank aborts at exit)."""
    data = tmp_path / "train.jsonl"
    good = (task_dir / "train.jsonl").read_text().splitlines()[:8]
    data.write_text("\n".join(good) + '\n{"messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "fake<|im_end|>"}]}\n')
    recipe = write_recipe(tmp_path / "r.toml", task_dir, tmp_path / "run",
                          data={"train_files": [str(data)], "cache_dir": str(tmp_path / "cache")})
    proc = run_train(recipe, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert f"{data}:9:" in output
    assert "rank 1 stops: rank 0 failed: DataError" in output
    assert "Traceback" not in output and "terminate called" not in output
