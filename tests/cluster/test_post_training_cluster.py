"""DPO and GRPO across nodes (issue 15 item 1: the same loop, engine, checkpoints, exact resume,
metrics and export as SFT), on a real 2-node cluster made of network namespaces: `clustertune
launch` (DeepSpeed launcher over pdsh/ssh, gloo over the namespaces' eth0), 2 nodes x 1 rank, the
built-in tiny model with the bundled demo data (src/clustertune/demo_assets):

  * DPO, ZeRO-2, on the demo's preference pairs: the reference stage runs across the nodes (the
    first step's loss is log 2: the policy is the reference), preference metrics are logged,
    checkpoints and the export are written; then the newest checkpoint is dropped and `launch
    --resume` continues from step 2 with the stored reference and redoes steps 3-4 with the same
    losses as the uninterrupted run (exact resume across nodes); once more on node1 alone (world
    size 1, the checkpoint converted): the same losses within 1e-4;
  * GRPO, ZeRO-3, on the demo's prompts: every rollout gathers the whole model once across the
    nodes, rewards and advantages are shared, rollout metrics are logged, checkpoints and the
    export are written; `launch --resume` from step 2 samples the same rollouts and redoes steps
    3-4 with the same rewards and losses; once more on node1 alone (world size 1, the ZeRO-3
    checkpoint converted), which finishes (rollouts are seeded per rank: other samples, not compared).

The first launch of each test runs the pre-flight doctor (the default), the others skip it.

    python -m pytest tests/cluster/test_post_training_cluster.py -q     (as root: namespaces, sshd)

Every sandbox (namespaces, sshd, keys) is torn down by the make_cluster fixture, even on failure;
every launch has a wall-clock limit.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from clusterlib import needs_sandbox, run_pids
from clustertune.cluster.inventory import cluster_to_toml, load_cluster
from clustertune.demo import DEMO_DPO_HELDOUT_FILE, DEMO_DPO_TRAIN_FILE, DEMO_TRAIN_FILE

pytestmark = [pytest.mark.cluster, needs_sandbox]

# One thread per rank on a 2-core machine; gloo over the nodes' eth0 (the sandbox's cluster file names
# no NIC, and gloo would otherwise bind to the address of this machine's hostname, loopback); DeepSpeed's
# CPU ops compiled once into a cache shared by the nodes (each node has its own $HOME).
ENV = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0",
       "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))}
LAUNCH_TIMEOUT_S = 240


def recipe_text(sections: dict[str, dict]) -> str:
    return "".join(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
                   for section, values in sections.items())


def one_node_cluster(h, tmp_path: Path) -> Path:
    """A cluster file of node1 alone (its 1 slot): a world size of 1."""
    cluster = load_cluster(h.sb.cluster_file)
    path = tmp_path / "node1-only.toml"
    path.write_text(cluster_to_toml(cluster.model_copy(update={"nodes": cluster.nodes[:1]})))
    return path


def launch(h, recipe: Path, *extra: str, cluster_file: Path | None = None, doctor: bool = False):
    """`clustertune launch` on node1; the pre-flight doctor only where asked (the first launch of a
    test: a user's default path; it is covered in depth by test_doctor.py)."""
    out = h.clustertune("launch", str(recipe), "--cluster", str(cluster_file or h.sb.cluster_file),
                        *([] if doctor else ["--skip-doctor"]), *extra, env=ENV, timeout=LAUNCH_TIMEOUT_S)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert ("doctor: OK" in out.stdout + out.stderr) == doctor
    return out


def step_records(run: Path) -> list[dict]:
    """metrics.jsonl's training-step records (the last one of each step: a resumed run logs the
    redone steps again)."""
    by_step = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "loss" in record:
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def check_ranks_ran_on_their_nodes(run: Path) -> None:
    logs = {n: (run / "logs" / f"{n}.log").read_text() for n in ("node1", "node2")}
    assert "clustertune-rank-exit rank=0 node=0 code=0" in logs["node1"]
    assert "clustertune-rank-exit rank=1 node=1 code=0" in logs["node2"]
    assert json.loads((run / "world.json").read_text())["world_size"] == 2
    assert run_pids(json.loads((run / "launch" / "run.json").read_text())["run_id"]) == []


def check_export_loads(run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    enc = tok.apply_chat_template([{"role": "user", "content": "reverse: abc"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    logits = model(enc["input_ids"]).logits
    assert logits.shape[-1] == 128 and bool(logits.isfinite().all())


def complete_steps(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[-1]) for p in (run / "checkpoints").glob("step_*/COMPLETE.json"))


def resume_from_step_2(h, recipe: Path, run: Path, tmp_path: Path, *, one_rank: bool = False) -> str:
    """Drop what came after step 2's checkpoint (the step-4 checkpoint, the export) and `launch
    --resume`, on both nodes or on node1 alone (world size 1: the checkpoint is converted).
    Returns the launcher's output after checking it resumed from step 2."""
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "final")
    cluster = {"cluster_file": one_node_cluster(h, tmp_path)} if one_rank else {}
    out = launch(h, recipe, "--resume", **cluster)
    text = out.stdout + out.stderr
    if one_rank:
        assert "converting it to a universal checkpoint for world size 1" in text, text[-4000:]
        assert json.loads((run / "world.json").read_text())["world_size"] == 1
    assert "(step 2)" in [line for line in text.splitlines() if "resumed from" in line][0], text[-4000:]
    return text


def test_dpo_zero2_across_nodes_then_exact_resume(make_cluster, tmp_path):
    h = make_cluster(2)
    h.setup_ssh()
    run = tmp_path / "runs" / "dpo"
    recipe = tmp_path / "dpo.toml"
    recipe.write_text(recipe_text({
        "run": {"name": "dpo", "output_dir": str(run)},
        "model": {"path": "tiny"},
        "data": {"train_files": [str(DEMO_DPO_TRAIN_FILE)], "eval_files": [str(DEMO_DPO_HELDOUT_FILE)],
                 "max_length": 64, "packing": False},  # padded micro-batches of 8, as written and checked
        "train": {"objective": "dpo", "max_steps": 4, "global_batch_size": 16, "micro_batch_size": 8,
                  "lr": 2e-3, "schedule": "constant", "seed": 3},
        "zero": {"stage": 2},
        "dpo": {"beta": 0.5},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
    }))
    out = launch(h, recipe, doctor=True)
    check_ranks_ran_on_their_nodes(run)
    assert "node2 r1" in out.stdout

    records = step_records(run)
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    # Step 1: the policy is the reference the two ranks computed together, so every logit is 0.
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for m in records:
        assert math.isfinite(m["loss"]) and m["pairs"] == 16
        for key in ("pref_accuracy", "reward_margin", "logps_chosen", "logps_rejected"):
            assert math.isfinite(m[key]), key
        assert 0 <= m["pref_accuracy"] <= 1
    assert records[-1]["loss"] < math.log(2)
    assert any(math.isfinite(m["eval_loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "eval_loss" in m)
    reference = (run / "reference_logps" / "logps.jsonl").read_text().splitlines()
    assert len({json.loads(line)["key"] for line in reference}) == 3200  # 3000 train + 200 held-out pairs
    assert complete_steps(run) == [2, 4]
    check_export_loads(run)
    first = {m["step"]: m["loss"] for m in records}

    # Interrupted after step 2's checkpoint: the resumed run loads the stored reference (it cannot
    # recompute it from moved weights) and redoes steps 3-4 exactly.
    text = resume_from_step_2(h, recipe, run, tmp_path)
    assert "reference log-probs of 3200 pairs loaded" in text
    resumed = {m["step"]: m["loss"] for m in step_records(run)}
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(first[step], rel=1e-5, abs=1e-7), step
    assert complete_steps(run) == [2, 4]
    check_ranks_ran_on_their_nodes(run)
    check_export_loads(run)

    # Resumed on another world size: node1 alone, one rank (2 micro-batches of 8 pairs per step
    # instead of 1 per rank): the 2-rank checkpoint is converted, the stored reference loaded, and the
    # step's loss, normalized over the whole step, stays on the uninterrupted trajectory.
    text = resume_from_step_2(h, recipe, run, tmp_path, one_rank=True)
    assert "reference log-probs of 3200 pairs loaded" in text
    on_one_rank = {m["step"]: m["loss"] for m in step_records(run)}
    for step in (3, 4):
        assert on_one_rank[step] == pytest.approx(first[step], rel=1e-4), step
    check_export_loads(run)


def test_grpo_zero3_across_nodes_then_exact_resume(make_cluster, tmp_path):
    h = make_cluster(2)
    h.setup_ssh()
    run = tmp_path / "runs" / "grpo"
    recipe = tmp_path / "grpo.toml"
    # operator:lt rewards a completion that sorts before the reference answer: about half of a random
    # model's, so groups have reward spread and the gradient is not zero.
    recipe.write_text(recipe_text({
        "run": {"name": "grpo", "output_dir": str(run)},
        "model": {"path": "tiny"},
        "data": {"train_files": [str(DEMO_TRAIN_FILE)], "max_length": 64, "packing": False},  # as checked
        "train": {"objective": "grpo", "max_steps": 4, "global_batch_size": 16, "micro_batch_size": 8,
                  "lr": 1e-3, "schedule": "constant", "seed": 3},
        "zero": {"stage": 3},
        "grpo": {"group_size": 4, "max_new_tokens": 8, "rewards": ["operator:lt", "format"]},
        "checkpoint": {"every_steps": 2, "keep_last": 5},
    }))
    out = launch(h, recipe, doctor=True)
    check_ranks_ran_on_their_nodes(run)
    assert "node2 r1" in out.stdout
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3

    records = step_records(run)
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    for m in records:
        for key in ("loss", "grad_norm", "reward_mean", "reward_std", "generation_time_s"):
            assert math.isfinite(m[key]), key
        assert m["generation_time_s"] > 0 and 1 <= m["completion_len_mean"] <= 8
        assert 0 <= m["groups_without_spread"] <= 1
    assert any(m["grad_norm"] > 0 for m in records)  # some group had reward spread: a real update
    assert complete_steps(run) == [2, 4]
    check_export_loads(run)
    first = {m["step"]: m for m in records}

    # Interrupted after step 2's checkpoint: the resumed run samples the same rollouts (seeded by
    # step, dataset index and number in the group) from the same weights, so steps 3-4 give the
    # same rewards and losses.
    resume_from_step_2(h, recipe, run, tmp_path)
    resumed = {m["step"]: m for m in step_records(run)}
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward_mean", "completion_tokens", "loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(first[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert complete_steps(run) == [2, 4]
    check_ranks_ran_on_their_nodes(run)
    check_export_loads(run)

    # Resumed on node1 alone, one rank: the ZeRO-3 checkpoint of 2 ranks is converted, and the one
    # rank samples every prompt's completions from the same per-completion seeds as the two did:
    # step 3 (weights of the step-2 checkpoint) has the same rollouts and rewards; the update then
    # differs only by the reduction order of one rank instead of two.
    resume_from_step_2(h, recipe, run, tmp_path, one_rank=True)
    on_one_rank = step_records(run)
    assert [m["step"] for m in on_one_rank] == [1, 2, 3, 4]
    for m in on_one_rank[2:]:
        assert math.isfinite(m["loss"]) and math.isfinite(m["reward_mean"]) and m["generation_time_s"] > 0
    step3 = on_one_rank[2]
    assert step3["completion_tokens"] == first[3]["completion_tokens"]
    assert step3["reward_mean"] == pytest.approx(first[3]["reward_mean"], abs=1e-9)
    assert step3["grad_norm"] == pytest.approx(first[3]["grad_norm"], rel=1e-3)
    assert complete_steps(run) == [2, 4]
    check_export_loads(run)
