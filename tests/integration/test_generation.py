"""GRPO groundwork: HFGenerator on the training engine, 2 CPU processes (gloo) under ZeRO-2 and
ZeRO-3. Greedy completions equal a plain HF model's with the same weights; seeded sampling is
repeatable and leaves the global RNG alone; after a rollout (ZeRO-3: whole model gathered once,
hooks off) training steps still work.

    python -m pytest tests/integration/test_generation.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    import torch._dynamo  # noqa: F401  imported before zero.Init patches tensor constructors (the worker's
    # imports do this early; a first import inside zero.Init fails on a polyfill signature check)
    import torch.distributed as dist
    from clustertune.batch_math import batch_layout
    from clustertune.config import ModelSection, TrainSection, ZeroSection
    from clustertune.worker import batching, engine
    from clustertune.worker.generation import HFGenerator
    from clustertune.worker.model import TokenLossModel, build_causal_lm, hf_config, load_tokenizer
    from clustertune.data.types import Sample

    stage, out = int(sys.argv[1]), sys.argv[2]
    engine.init_distributed(on_gpu=False)
    torch.manual_seed(0)
    train = TrainSection(max_steps=1, global_batch_size=2, micro_batch_size=1, lr=1e-2)
    layout = batch_layout(train, world_size=2, packing=False)
    config = engine.build_deepspeed_config(train, ZeroSection(stage=stage), layout=layout, precision="fp32",
                                           hidden_size=128)
    hf_ds, zero_init = engine.zero3_init_context(config) if stage == 3 else (None, None)
    model = ModelSection(path="tiny", attn_implementation="sdpa")
    lm = build_causal_lm(model, dtype=torch.float32, zero3_context=zero_init)
    ds = engine.initialize(TokenLossModel(lm), ds_config=config, train=train, on_gpu=False)
    tok = load_tokenizer(ModelSection(path="tiny"))
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("reverse: abc", "reverse: hello")]

    with engine.gathered(list(lm.parameters()), zero_stage=stage):
        weights = {n: p.detach().clone() for n, p in lm.named_parameters()}
    if dist.get_rank() == 0:  # the plain HF model's greedy completions are computed by the test itself
        torch.save(weights, out + ".weights.pt")
    greedy = HFGenerator(ds, lm, zero_stage=stage, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id],
                         max_new_tokens=6, temperature=0.0)
    sampler = HFGenerator(ds, lm, zero_stage=stage, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id],
                          max_new_tokens=6, temperature=1.0)
    rng_before = torch.get_rng_state()
    got = greedy.generate(prompts, num_return_sequences=1, seed=0)
    sampled = sampler.generate(prompts, num_return_sequences=3, seed=5)
    again = sampler.generate(prompts, num_return_sequences=3, seed=5)
    rng_untouched = bool(torch.equal(rng_before, torch.get_rng_state()))

    losses = []
    for _ in range(2):  # training after a rollout: the ZeRO-3 hooks are back
        ids = prompts[dist.get_rank()]
        sample = Sample(ids, ids[1:] + [-100])
        loss = ds(**batching.collate([sample], packing=False, pad_id=tok.pad_token_id))
        engine.backward(ds, loss, is_last_micro_batch=True)
        engine.optimizer_step(ds)
        losses.append(float(loss))
    after = greedy.generate(prompts, num_return_sequences=1, seed=0)
    if dist.get_rank() == 0:
        json.dump({"prompts": prompts, "got": got, "sampled": sampled, "again": again, "losses": losses,
                   "rng_untouched": rng_untouched, "after": after}, open(out, "w"))
''')


def plain_greedy(weights_file, prompts):
    """Greedy completions of a plain HF model (no DeepSpeed) holding the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from clustertune.config import ModelSection
    from clustertune.worker.model import hf_config, load_tokenizer
    tok = load_tokenizer(ModelSection(path="tiny"))
    plain = AutoModelForCausalLM.from_config(hf_config(ModelSection(path="tiny")), attn_implementation="sdpa")
    plain.load_state_dict(torch.load(weights_file), strict=False)
    plain.float().eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        new = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])[0, len(p):].tolist()
        out.append(new[:new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_generate_on_the_training_engine(tmp_path, stage):
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(29400 + stage), str(script),
                           str(stage), str(out)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["got"] == plain_greedy(str(out) + ".weights.pt", result["prompts"])
    assert len(result["sampled"]) == 6 and all(1 <= len(c) <= 6 for c in result["sampled"])
    assert result["sampled"] == result["again"]  # seeded
    assert result["rng_untouched"]
    assert all(loss == loss for loss in result["losses"])  # finite: training steps ran after the rollout
    assert result["after"] != result["got"] or result["losses"][1] != result["losses"][0]
