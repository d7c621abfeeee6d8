"""build_causal_lm hands the trainer a model that really trains as configured, whether it is
built from a shape or loaded from a saved Hugging Face directory (which from_pretrained returns
in eval mode, where HF's gradient checkpointing does nothing)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from clustertune.config import LoraSection, ModelSection
from clustertune.worker.model import apply_lora, base_causal_lm, build_causal_lm
from clustertune.shapes import SHAPES


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_hf")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict())).save_pretrained(directory)
    return directory


def layer_forward_calls(lm, layers=None) -> list[int]:
    """Forward calls per decoder layer (its MLP; transformers checkpoints the layer's `forward`,
    inside the layer's own hooks) over one forward + backward: 2 when checkpointing recomputes
    the layer in backward, 1 when it does not."""
    layers = lm.model.layers if layers is None else layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, lm.config.vocab_size, (2, 16))
    lm(input_ids=ids, labels=ids).loss.backward()
    return calls


@pytest.mark.parametrize("source", ["shape", "directory"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_built_model_trains_and_checkpoints_as_configured(saved_tiny, source, checkpointing):
    path = "tiny" if source == "shape" else str(saved_tiny)
    lm = build_causal_lm(ModelSection(path=path, attn_implementation="sdpa"), dtype=torch.float32,
                         gradient_checkpointing=checkpointing)
    assert lm.training
    expected = 2 if checkpointing else 1
    assert layer_forward_calls(lm) == [expected] * SHAPES["tiny"].num_hidden_layers


def test_lora_with_checkpointing_recomputes_and_trains_only_the_adapters(saved_tiny):
    """configs/qwen2.5-7b-lora-zero3.toml's combination: frozen base, checkpointed layers."""
    lm = build_causal_lm(ModelSection(path=str(saved_tiny), attn_implementation="sdpa"), dtype=torch.float32,
                         gradient_checkpointing=True)
    peft_model = apply_lora(lm, LoraSection(enabled=True, r=4, alpha=8.0))
    assert layer_forward_calls(peft_model, base_causal_lm(peft_model).model.layers) == [2, 2]
    with_grad = {name for name, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all("lora_" in name for name in with_grad)
    # lora_B starts at zero, so only B has a gradient at the first step; the first layer gets one too
    assert any("lora_B" in name and "layers.0." in name for name in with_grad)


def test_selective_checkpointing_recomputes_every_nth_layer_only():
    """train.checkpoint_every_n_layers = 2 on a 4-layer model: layers 0 and 2 recompute in
    backward, 1 and 3 keep their activations; the gradients equal those of full checkpointing."""
    import dataclasses
    shape = dataclasses.replace(SHAPES["tiny"], num_hidden_layers=4)
    grads = {}
    for every in (1, 2):
        torch.manual_seed(0)
        lm = Qwen2ForCausalLM(Qwen2Config(**shape.hf_config_dict()))
        lm.train()
        from clustertune.worker.model import decoder_layers, enable_activation_checkpointing
        enable_activation_checkpointing(lm, every_n_layers=every)
        torch.manual_seed(1)
        flagged = [i for i, layer in enumerate(decoder_layers(lm)) if layer.gradient_checkpointing]
        assert flagged == ([0, 1, 2, 3] if every == 1 else [0, 2])
        assert layer_forward_calls(lm) == ([2, 2, 2, 2] if every == 1 else [2, 1, 2, 1])
        grads[every] = torch.cat([p.grad.flatten() for p in lm.parameters()])
    torch.testing.assert_close(grads[1], grads[2])


def test_num_layers_cuts_a_built_in_shape_and_is_refused_for_a_directory(saved_tiny):
    from pydantic import ValidationError
    lm = build_causal_lm(ModelSection(path="qwen2.5-0.5b", num_layers=1, attn_implementation="sdpa"),
                         dtype=torch.bfloat16)
    assert len(lm.model.layers) == 1 and lm.config.hidden_size == SHAPES["qwen2.5-0.5b"].hidden_size
    with pytest.raises(ValidationError, match="needs a built-in shape"):
        ModelSection(path=str(saved_tiny), num_layers=1)
    with pytest.raises(ValidationError, match="has only 24 layers"):
        ModelSection(path="qwen2.5-0.5b", num_layers=99)


def test_compiled_blocks_train_like_eager_under_checkpointing():
    """train.compile: the attention and MLP blocks are compiled, the checkpointed layer around
    them is not; one forward + backward gives eager's loss and gradients."""
    from clustertune.worker.kernels import compile_decoder_layers
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        lm = build_causal_lm(ModelSection(path="tiny", attn_implementation="sdpa"), dtype=torch.float32,
                             gradient_checkpointing=True)
        if compiled:
            assert compile_decoder_layers(lm) == SHAPES["tiny"].num_hidden_layers
        ids = torch.randint(0, lm.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in lm.parameters()])))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-5)
