"""Built-in model shapes: the real config.json values of the Qwen2.5 and DeepSeek-R1-Distill-Qwen
families, so a model can be built with random weights (throughput tests, planning) or planned
without the checkpoint on disk. Pure data: imported by the launcher side, never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

# The linear layers of a Qwen2 decoder layer, in module order: LoRA's default targets and what
# the planner counts adapters for.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    model_type: str = "qwen2"

    def hf_config_dict(self) -> dict:
        d = asdict(self)
        d["architectures"] = ["Qwen2ForCausalLM"]
        d["hidden_act"] = "silu"
        d["attention_dropout"] = 0.0
        d["use_sliding_window"] = False
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def parameter_count(self) -> int:
        """Exact parameter count of Qwen2ForCausalLM with this shape (q/k/v carry biases)."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        attn = h * h + h + 2 * (h * kv + kv) + h * h  # q(+bias), k,v(+bias), o
        mlp = 3 * h * i
        norms = 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + layers * (attn + mlp + norms) + h + head

    def matmul_parameter_count(self) -> int:
        """Parameters that take part in matmuls per token: all but the input embedding, with
        lm_head counted even when tied (the MFU convention of clustertune.flops)."""
        tied_head = self.vocab_size * self.hidden_size if self.tie_word_embeddings else 0
        return self.parameter_count() - self.vocab_size * self.hidden_size + tied_head


_QWEN_VOCAB_SMALL = 151936  # 0.5B / 1.5B / 3B and the 1.5B distill
_QWEN_VOCAB_LARGE = 152064  # 7B and up

SHAPES: dict[str, Shape] = {
    "qwen2.5-0.5b": Shape(896, 4864, 24, 14, 2, _QWEN_VOCAB_SMALL, True),
    "qwen2.5-1.5b": Shape(1536, 8960, 28, 12, 2, _QWEN_VOCAB_SMALL, True),
    "qwen2.5-3b": Shape(2048, 11008, 36, 16, 2, _QWEN_VOCAB_SMALL, True),
    "qwen2.5-7b": Shape(3584, 18944, 28, 28, 4, _QWEN_VOCAB_LARGE, False),
    "qwen2.5-14b": Shape(5120, 13824, 48, 40, 8, _QWEN_VOCAB_LARGE, False, rms_norm_eps=1e-5),
    "qwen2.5-32b": Shape(5120, 27648, 64, 40, 8, _QWEN_VOCAB_LARGE, False, rms_norm_eps=1e-5),
    "qwen2.5-72b": Shape(8192, 29568, 80, 64, 8, _QWEN_VOCAB_LARGE, False, rms_norm_eps=1e-5),
    # DeepSeek-R1-Distill-Qwen: 1.5B/7B start from Qwen2.5-Math (rope_theta 1e4), 14B/32B from Qwen2.5.
    "deepseek-r1-distill-qwen-1.5b": Shape(1536, 8960, 28, 12, 2, _QWEN_VOCAB_SMALL, False,
                                           rope_theta=10_000.0, max_position_embeddings=131072),
    "deepseek-r1-distill-qwen-7b": Shape(3584, 18944, 28, 28, 4, _QWEN_VOCAB_LARGE, False,
                                         rope_theta=10_000.0, max_position_embeddings=131072),
    "deepseek-r1-distill-qwen-14b": Shape(5120, 13824, 48, 40, 8, _QWEN_VOCAB_LARGE, False,
                                          rms_norm_eps=1e-5, max_position_embeddings=131072),
    "deepseek-r1-distill-qwen-32b": Shape(5120, 27648, 64, 40, 8, _QWEN_VOCAB_LARGE, False,
                                          rms_norm_eps=1e-5, max_position_embeddings=131072),
    # Tests and the demo: vocab matches the bundled demo tokenizer (demo_assets/tokenizer).
    "tiny": Shape(128, 256, 2, 4, 2, 128, True, rope_theta=10_000.0, max_position_embeddings=2048),
}

ALIASES = {
    "qwen2.5-32b-instruct": "qwen2.5-32b",
    "deepseek-r1-distill-qwen-32b-shape": "deepseek-r1-distill-qwen-32b",
}


def lookup_shape(name: str) -> Shape | None:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return SHAPES.get(key)


def shape_from_model_path(path: str, num_layers: int | None = None) -> Shape:
    """The shape of `model.path`: a built-in name (cut to `num_layers` decoder layers when
    given: model.num_layers), or read from a local directory's config.json."""
    shape = lookup_shape(path)
    if shape is not None:
        return dataclasses.replace(shape, num_hidden_layers=num_layers) if num_layers else shape
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        names = ", ".join(sorted(SHAPES))
        from clustertune.config import RecipeError  # here: config.py may come to import this module
        raise RecipeError(
            f"model.path {path!r} is neither a built-in shape ({names}) nor a directory with config.json")
    cfg = json.loads(config_file.read_text())
    fields = Shape.__dataclass_fields__
    kwargs = {k: cfg[k] for k in fields if k in cfg}
    kwargs.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    kwargs.setdefault("tie_word_embeddings", False)
    return Shape(**kwargs)
