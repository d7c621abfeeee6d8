"""HF export: LoRA folded into the base weights equals PEFT's own merge; shards load back."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from clustertune.worker.export import _iter_full_parameters, _merge_lora, _write_safetensors_shards
from clustertune.shapes import SHAPES


def tiny_lm() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SHAPES["tiny"].hf_config_dict()))


def test_lora_merge_matches_peft_merge_and_unload(tmp_path):
    lm = get_peft_model(tiny_lm(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():  # LoRA B starts at zero; make the update non-trivial
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_()
    merged = dict(_merge_lora(_iter_full_parameters(lm, zero_stage=0), scaling=8 / 4))
    reference = lm.merge_and_unload().state_dict()
    assert set(merged) == {k for k in reference if k != "lm_head.weight"}  # tied head stored once
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], msg=name)


def test_sharded_safetensors_load_with_from_pretrained(tmp_path, monkeypatch):
    import clustertune.worker.export as export
    monkeypatch.setattr(export, "SHARD_BYTES", 64 * 1024)  # force several shards from a tiny model
    lm = tiny_lm()
    _write_safetensors_shards(_iter_full_parameters(lm, zero_stage=0), tmp_path, dtype=torch.float32)
    lm.config.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), b in zip(lm.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
