"""The lean MLP (worker/kernels.py SwiGLUDown): down_proj(silu(gate) * up) that keeps gate and up for
backward and recomputes the product. Same loss and gradients as HF's MLP, less saved memory, the
planner counts it, and it stays out of the way where it cannot apply (LoRA on down_proj, compile)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from clustertune import plan
from clustertune.config import LoraSection
from clustertune.shapes import SHAPES
from clustertune.worker import kernels
from clustertune.worker.model import apply_lora, base_causal_lm, build_causal_lm
from clustertune.config import ModelSection

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_pair(dtype=torch.float64, device="cpu"):
    torch.manual_seed(0)
    reference = Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict())).to(device=device, dtype=dtype)
    reference.train()
    lean = copy.deepcopy(reference)
    assert kernels.install_lean_mlp(lean) == SHAPES["tiny"].num_hidden_layers
    return reference, lean


def loss_and_grads(lm, ids):
    loss = lm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


def test_lean_mlp_trains_exactly_like_hf_mlp_in_float64():
    reference, lean = tiny_pair()
    ids = torch.randint(0, reference.config.vocab_size, (2, 24))
    ref_loss, ref_grads = loss_and_grads(reference, ids)
    lean_loss, lean_grads = loss_and_grads(lean, ids)
    assert torch.equal(ref_loss, lean_loss)
    assert ref_grads.keys() == lean_grads.keys() and any("down_proj" in n for n in lean_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_down_gradients_match_autograd_of_the_plain_expression(device):
    """On CUDA this runs the Triton backward (bf16, overwriting gate and up in place)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float64
    torch.manual_seed(1)
    gate, up = (torch.randn(3, 37, 1100, device=device, dtype=dtype) for _ in range(2))
    weight = torch.randn(64, 1100, device=device, dtype=dtype) / 30
    grad_out = torch.randn(3, 37, 64, device=device, dtype=dtype)

    leaves = [t.clone().requires_grad_() for t in (gate, up, weight)]
    (torch.nn.functional.linear(torch.nn.functional.silu(leaves[0]) * leaves[1], leaves[2]) * grad_out).sum().backward()
    lean = [t.clone().requires_grad_() for t in (gate, up, weight)]
    (kernels.SwiGLUDown.apply(*lean) * grad_out).sum().backward()
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-10, atol=1e-12)
    for ref, got in zip(leaves, lean):
        torch.testing.assert_close(got.grad, ref.grad, **tolerance)


def test_frozen_down_proj_gets_no_weight_gradient_and_inputs_still_do():
    gate, up = (torch.randn(5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(4, 8, dtype=torch.float64)  # frozen
    kernels.SwiGLUDown.apply(gate, up, weight).sum().backward()
    assert weight.grad is None and gate.grad is not None and up.grad is not None


def test_lean_mlp_saves_less_for_backward_than_hf_mlp():
    """One intermediate-sized tensor less per layer: what the planner counts (a*(h + 2i))."""
    reference, lean = tiny_pair(torch.float32)
    ids = torch.randint(0, reference.config.vocab_size, (1, 64))

    def saved_bytes(lm):
        total = []
        def pack(t):
            total.append(t.numel() * t.element_size() if not isinstance(t, torch.nn.Parameter) else 0)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm(input_ids=ids, labels=ids).loss
        return sum(total)

    shape = SHAPES["tiny"]
    saved_less = saved_bytes(reference) - saved_bytes(lean)
    # HF's MLP saves silu's input and output and both products' inputs: 4 i-sized tensors, lean 2
    assert saved_less >= shape.num_hidden_layers * 64 * shape.intermediate_size * 4 * 2


def test_build_causal_lm_installs_it_and_lora_on_down_proj_keeps_it_out():
    assert plan.lean_mlp_applies(False, None)
    assert plan.lean_mlp_applies(False, ("q_proj", "v_proj"))
    assert not plan.lean_mlp_applies(False, ("down_proj",))
    assert not plan.lean_mlp_applies(False, ("all-linear",))
    assert not plan.lean_mlp_applies(True, None)  # train.compile

    lm = build_causal_lm(ModelSection(path="tiny", attn_implementation="sdpa"), dtype=torch.float32, lean_mlp=True)
    assert all(getattr(layer.mlp.down_proj, kernels.LEAN_MLP_MARK, False) for layer in lm.model.layers)
    # LoRA on q/v only: the lean MLP stays and only the adapters train
    peft_model = apply_lora(lm, LoraSection(enabled=True, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, lm.config.vocab_size, (2, 16))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(getattr(layer.mlp.down_proj, kernels.LEAN_MLP_MARK, False)
               for layer in base_causal_lm(peft_model).model.layers)


def test_planner_counts_the_lean_mlp():
    shape = SHAPES["qwen2.5-1.5b"]
    common = dict(tokens_per_micro_batch=4096, seq_len=4096, world_size=1, gpus_per_node=1, gpu_mem_gib=80,
                  host_mem_gib=None)
    hf = plan.layer_activation_bytes_per_token(plan.PlanInput(shape, **common))
    lean = plan.layer_activation_bytes_per_token(plan.PlanInput(shape, lean_mlp=True, **common))
    assert hf - lean == 2 * shape.intermediate_size  # bf16: the product, a*i
