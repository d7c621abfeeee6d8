"""Checkpoint lifecycle on fabricated directories: discovery ignores partial checkpoints, rotation
keeps the last K complete ones (never the only one, never the protected best), the newest step
common to every node, the marker's recipe hash and the resume warnings."""

from __future__ import annotations

import json

import pytest

from clustertune.worker import checkpoint
from clustertune.config import recipe_from_dict


def make(run_dir, step, *, complete=True):
    d = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        checkpoint.write_marker(d, {"step": step})
    return d


def recipe(**train):
    return recipe_from_dict({"data": {"train_files": ["train.jsonl"]}, "train": {"max_steps": 10, **train}}, "<test>")


@pytest.fixture(autouse=True)
def shared_fs(monkeypatch):
    monkeypatch.delenv(checkpoint.NODE_LOCAL_ENV, raising=False)


def test_discovery_ignores_partial_and_foreign_directories(tmp_path):
    make(tmp_path, 2)
    make(tmp_path, 4)
    make(tmp_path, 6, complete=False)  # died mid-save: newest, but partial
    (checkpoint.checkpoint_root(tmp_path) / "step_00000008.tmp").mkdir()
    (checkpoint.checkpoint_root(tmp_path) / "other").mkdir()
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2, 4]
    assert checkpoint.newest_complete(tmp_path)[0] == 4
    assert checkpoint.newest_complete(tmp_path / "nothing") is None


def test_a_marker_tmp_file_is_not_a_marker(tmp_path):
    d = make(tmp_path, 2, complete=False)
    (d / (checkpoint.MARKER + ".tmp")).write_text("{}")
    assert checkpoint.newest_complete(tmp_path) is None


def test_rotation_keeps_last_k_complete_and_never_the_only_one(tmp_path):
    for s in (2, 4, 6, 8):
        make(tmp_path, s)
    make(tmp_path, 10, complete=False)  # newer partial: could still be being written, kept
    make(tmp_path, 5, complete=False)   # older partial: a dead save, removed
    checkpoint.rotate(tmp_path, keep_last=2)
    names = sorted(p.name for p in checkpoint.checkpoint_root(tmp_path).iterdir())
    assert names == ["step_00000006", "step_00000008", "step_00000010"]
    checkpoint.rotate(tmp_path, keep_last=1)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [8]
    checkpoint.rotate(tmp_path, keep_last=1)  # the only complete one stays
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [8]


def test_rotation_with_only_partial_checkpoints_deletes_nothing(tmp_path):
    make(tmp_path, 2, complete=False)
    make(tmp_path, 4, complete=False)
    assert checkpoint.rotate(tmp_path, keep_last=1) == []
    assert len(list(checkpoint.checkpoint_root(tmp_path).iterdir())) == 2


def test_rotation_protects_the_best(tmp_path):
    for s in (2, 4, 6):
        make(tmp_path, s)
    checkpoint.rotate(tmp_path, keep_last=1, protect={2})
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2, 6]


def test_newest_common_step_over_nodes():
    assert checkpoint.newest_common_step([[2, 4, 6], [2, 4, 6]]) == 6
    # node 2 died before writing step 6's marker
    assert checkpoint.newest_common_step([[2, 4, 6], [2, 4]]) == 4
    assert checkpoint.newest_common_step([[2, 4], []]) is None
    assert checkpoint.newest_common_step([]) is None


def test_node_local_directory_moves_the_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoint.NODE_LOCAL_ENV, str(tmp_path / "node2"))
    assert checkpoint.checkpoint_root(tmp_path / "run") == tmp_path / "node2" / "checkpoints"
    monkeypatch.setenv(checkpoint.NODE_LOCAL_ENV, "")
    assert checkpoint.checkpoint_root(tmp_path / "run") == tmp_path / "run" / "checkpoints"


def test_recipe_hash_ignores_what_may_change_on_resume():
    base = recipe()
    same = recipe_from_dict({"data": {"train_files": ["train.jsonl"]}, "train": {"max_steps": 99, "log_every": 5},
                             "run": {"output_dir": "elsewhere", "name": "x"},
                             "checkpoint": {"every_steps": 3, "keep_last": 5}, "eval": {"every_steps": 4}}, "<t>")
    h = checkpoint.recipe_hash(checkpoint.recipe_fingerprint(base))
    assert checkpoint.recipe_hash(checkpoint.recipe_fingerprint(same)) == h
    for changed in (recipe(lr=1e-3), recipe(seed=1), recipe_from_dict({"data": {"train_files": ["train.jsonl"]}, "train": {"max_steps": 10},
                                                                       "zero": {"stage": 3}}, "<t>")):
        assert checkpoint.recipe_hash(checkpoint.recipe_fingerprint(changed)) != h


def test_marker_content_and_resume_problems(tmp_path):
    r = recipe(schedule="cosine")
    info = checkpoint.marker_info(step=5, world_size=2, zero_stage=2, recipe=r, total_steps=10, num_samples=24,
                                  global_batch_size=8, steps_per_epoch=3, nodes=1, deepspeed_version="0.0")
    assert info["data"] == {"samples_consumed": 40, "epoch": 1, "step_in_epoch": 2, "num_samples": 24}
    d = make(tmp_path, 5, complete=False)
    checkpoint.write_marker(d, info)
    marker = checkpoint.read_marker(d)
    assert json.loads((d / checkpoint.MARKER).read_text()) == marker
    assert checkpoint.resume_problems(marker, recipe=r, total_steps=10, num_samples=24) == []
    problems = checkpoint.resume_problems(marker, recipe=recipe(schedule="cosine", lr=1e-3), total_steps=20,
                                          num_samples=30)
    assert len(problems) == 3
    assert "train.lr" in problems[0] and "30 samples" in problems[1] and "20 steps" in problems[2]
    # a constant schedule does not care about the run's length
    marker_c = checkpoint.marker_info(step=5, world_size=2, zero_stage=2, recipe=recipe(schedule="constant"),
                                      total_steps=10, num_samples=24, global_batch_size=8, steps_per_epoch=3,
                                      nodes=1, deepspeed_version="0.0")
    assert checkpoint.resume_problems(marker_c, recipe=recipe(schedule="constant"), total_steps=20,
                                      num_samples=24) == []


def test_deepspeed_checkpoint_switches():
    from clustertune.batch_math import batch_layout
    from clustertune.worker import engine
    r = recipe()
    layout = batch_layout(r.train, world_size=2, packing=False)
    plain = engine.build_deepspeed_config(r.train, r.zero, layout=layout, precision="fp32", hidden_size=64)
    assert "checkpoint" not in plain
    both = engine.build_deepspeed_config(r.train, r.zero, layout=layout, precision="fp32", hidden_size=64,
                                         load_universal=True, node_local_storage=True)
    assert both["checkpoint"] == {"load_universal": True, "use_node_local_storage": True}
