"""No shared filesystem: every node keeps its own ranks' checkpoint shards in its own directory
(CLUSTERTUNE_NODE_LOCAL_DIR, set per node; here through each sandbox node's sshd environment, as
a real node would set it in its login environment). The sandbox nodes share this machine's disk,
so the node-local directories are simply different paths.

2 nodes x 1 rank, ZeRO-3, DeepSpeed's use_node_local_storage: each node's directory holds a complete
checkpoint of its own (its ZeRO shard, the model-states file, its RNG state and its marker) and
the shared run directory holds none. Then node2 "dies" before its step-4 marker: a resume must take
step 2, the newest step complete on EVERY node, and train on to the end; the final export (gathered
by rank 0 from the live engine) loads with transformers.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from clusterlib import needs_sandbox
from tinytask import make_task, tiny_recipe

pytestmark = [pytest.mark.cluster, needs_sandbox]


def test_node_local_checkpoints_save_resume_on_the_common_step_and_export(make_cluster, tmp_path):
    local = {n: tmp_path / f"{n}-local" for n in ("node1", "node2")}
    h = make_cluster(2, node_env={n: {"CLUSTERTUNE_NODE_LOCAL_DIR": str(d)} for n, d in local.items()})
    n1, n2 = h.sb.nodes
    tokenizer, _ = make_task(tmp_path)
    cfile = tmp_path / "cluster.toml"
    out = h.clustertune("cluster", "init", "--out", str(cfile), "--name", h.sb.name, "--accelerator", "cpu",
                        "--node", f"node1=root@{n1.address}:22:1", "--node", f"node2=root@{n2.address}:22:1")
    assert out.returncode == 0, out.stderr
    h.setup_ssh(cfile)
    env = {"OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  os.path.expanduser("~/.cache/torch_extensions"))}
    recipe = tmp_path / "r.toml"

    recipe.write_text(tiny_recipe("nofs", tokenizer, steps=4, stage=3,
                                   checkpoint={"every_steps": 2, "keep_last": 5}))
    out = h.clustertune("launch", str(recipe), "--cluster", str(cfile), env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]

    run = tmp_path / "runs" / "nofs"
    assert not (run / "checkpoints").exists()  # nothing in the shared run directory
    for rank, (node, d) in enumerate(local.items()):
        for step in (2, 4):
            ckpt = d / "checkpoints" / f"step_{step:08d}"
            names = {p.name for p in ckpt.iterdir()}
            assert "COMPLETE.json" in names, (node, names)
            assert f"rng_state_rank{rank:05d}.pt" in names and f"rng_state_rank{1 - rank:05d}.pt" not in names
            # each node's local rank 0 wrote the model-states file (use_node_local_storage)
            assert any(n.endswith("model_states.pt") for n in names), (node, names)
            assert any(f"rank_{rank}_" in n and n.endswith("optim_states.pt") for n in names), (node, names)
            assert not any(f"rank_{1 - rank}_" in n and n.endswith("optim_states.pt") for n in names)
            marker = json.loads((ckpt / "COMPLETE.json").read_text())
            assert marker["world_size"] == 2 and marker["nodes"] == 2 and marker["step"] == step
    first = {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in m}

    # node2 died after its step-4 shards, before its marker: step 4 is complete on node1 only.
    (local["node2"] / "checkpoints" / "step_00000004" / "COMPLETE.json").unlink()
    shutil.rmtree(run / "final")
    recipe.write_text(tiny_recipe("nofs", tokenizer, steps=6, stage=3,
                                   checkpoint={"every_steps": 2, "keep_last": 5}))
    out = h.clustertune("launch", str(recipe), "--cluster", str(cfile), "--resume", env=env,
                        timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "step 4 is not complete on every node; taking step 2" in text
    assert "(step 2)" in text
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    resumed = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    # steps 3-4 redone from step 2's state: the same losses as the first time (same data, same state)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(first[step], rel=1e-5)
    for d in local.values():
        assert (d / "checkpoints" / "step_00000006" / "COMPLETE.json").is_file()

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 2
