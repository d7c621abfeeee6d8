"""End to end, the way a user does it, on a real multi-node cluster made of network namespaces:

    clustertune cluster init   (flags, on the master node1)
    clustertune cluster ssh    (from NO passwordless access: a one-time bootstrap key, then revoked)
    clustertune cluster doctor
    clustertune launch         (DeepSpeed launcher over pdsh/ssh, ZeRO-3, gloo over eth0)

on the tiny Qwen2 model with a small generated chat dataset and tokenizer. Checks that every
node's rank trained (per-node logs written from each namespace), that the loss went down, and
that the export in final/ loads with transformers.
"""

from __future__ import annotations

import json
import os

import pytest

from clusterlib import needs_sandbox, run_pids
from tinytask import make_task, tiny_recipe

pytestmark = [pytest.mark.cluster, needs_sandbox]


def test_init_ssh_doctor_launch_zero3_across_nodes(make_cluster, tmp_path):
    h = make_cluster(2)
    n1, n2 = h.sb.nodes
    tokenizer, _ = make_task(tmp_path)
    recipe = tmp_path / "sft.toml"
    recipe.write_text(tiny_recipe("e2e", tokenizer, steps=8, stage=3))
    cfile = tmp_path / "cluster.toml"
    out = h.clustertune("cluster", "init", "--out", str(cfile), "--name", h.sb.name, "--accelerator", "cpu",
                        "--node", f"node1=root@{n1.address}:22:1", "--node", f"node2=root@{n2.address}:22:1")
    assert out.returncode == 0, out.stderr
    h.setup_ssh(cfile)  # bootstrap credential used once, then revoked

    out = h.clustertune("cluster", "doctor", "--cluster", str(cfile), "--recipe", str(recipe))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "doctor: OK" in out.stdout

    # One thread per rank on this 2-core machine; DeepSpeed's CPU ops are compiled once into a
    # cache shared by the nodes (each node has its own $HOME).
    env = {"OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  os.path.expanduser("~/.cache/torch_extensions")),
           "HF_TOKEN": "hf_e2eSecretValue123"}
    out = h.clustertune("launch", str(recipe), "--cluster", str(cfile), env=env, timeout=420)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]

    run = tmp_path / "runs" / "e2e"
    logs = {n: (run / "logs" / f"{n}.log").read_text() for n in ("node1", "node2")}
    # each node's rank ran there and finished cleanly (rank 0 on the master, rank 1 on node2)
    assert "clustertune-rank-exit rank=0 node=0 code=0" in logs["node1"]
    assert "clustertune-rank-exit rank=1 node=1 code=0" in logs["node2"]
    assert "[rank 1]" not in logs["node1"] and "[rank 0]" not in logs["node2"]
    assert "node2 r1" in out.stdout and "node1 r0" in out.stdout
    assert "hf_e2eSecretValue123" not in out.stdout + out.stderr + "".join(logs.values())

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses

    # world size 2 across the two namespaces, ZeRO-3
    world = json.loads((run / "world.json").read_text())
    assert world["world_size"] == 2
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.config.num_hidden_layers == 2 and model.num_parameters() > 0
    enc = tok.apply_chat_template([{"role": "user", "content": "2+3"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model(enc["input_ids"]).logits.shape[-1] == 128

    info = json.loads((run / "launch" / "run.json").read_text())
    assert run_pids(info["run_id"]) == []
