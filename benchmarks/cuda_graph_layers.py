"""Issue 13's CUDA-graphs lever, measured where it can pay most: the decoder stack of a fixed-shape row.

W3's rows are static (16 samples of 2048 tokens in one 32k row, the same cu_seqlens every step), so the
forward and backward of its decoder layers can be captured once (torch.cuda.make_graphed_callables) and
replayed. This times the stack as `clustertune train` builds it (worker/model.build_causal_lm: Liger
kernels, the lean MLP, varlen flash attention; no recompute, what auto resolves W3 to on one H100),
eager against graphed, on the same weights and the same row, and reports what the graph saves per step
against call 2's measured W3 step (0.916 s, benchmarks/RESULTS.md 2026-11-27). DeepSpeed, the
embedding, the fused loss and the optimizer stay outside (their hooks and host work are not
capturable); the saving measured here is the most the lever can give the whole step.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/cuda_graph_layers.py            # one GPU
    PYTHONPATH=src python3 benchmarks/cuda_graph_layers.py --smoke                    # CPU: eager only
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from clustertune.config import ModelSection
from clustertune.worker.model import attention_implementation, base_causal_lm, build_causal_lm, decoder_layers


class DecoderStack(torch.nn.Module):
    """The decoder layers over one packed row whose cu_seqlens are fixed: positional tensors in and
    out, as make_graphed_callables needs."""

    def __init__(self, layers, *, position_ids, row_kwargs):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.position_ids = position_ids
        self.row_kwargs = row_kwargs

    def forward(self, hidden, cos, sin):
        for layer in self.layers:
            out = layer(hidden, attention_mask=None, position_ids=self.position_ids,
                        position_embeddings=(cos, sin), use_cache=False, **self.row_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def fixed_row(samples: int, length: int, device) -> tuple[torch.Tensor, dict]:
    position_ids = torch.arange(length, device=device).repeat(samples).unsqueeze(0)
    cu = torch.arange(0, (samples + 1) * length, length, dtype=torch.int32, device=device)
    return position_ids, {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": length, "max_length_k": length}


def seconds_per_iteration(step, iterations: int, on_gpu: bool) -> float:
    step()  # warm: autotuning, allocator
    if on_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iterations):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / iterations


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen2.5-7b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--step-s", type=float, default=0.916, help="the measured training step this stack is part of")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, eager only (checks the script)")
    a = p.parse_args()
    on_gpu = torch.cuda.is_available() and not a.smoke
    if a.smoke:
        a.shape, a.layers, a.samples, a.length, a.iterations = "tiny", 2, 2, 16, 2
    device = torch.device("cuda" if on_gpu else "cpu")
    section = ModelSection(path=a.shape, num_layers=a.layers)
    attn = attention_implementation(section, on_gpu=on_gpu, packing=True)
    lm = build_causal_lm(section, dtype=torch.bfloat16 if on_gpu else torch.float32, attn=attn,
                         liger=on_gpu, lean_mlp=on_gpu, init_device=device).to(device)
    inner = base_causal_lm(lm).model
    position_ids, row_kwargs = fixed_row(a.samples, a.length, device)
    if not on_gpu:  # sdpa takes the packing from restarting position ids
        row_kwargs = {}
    stack = DecoderStack(decoder_layers(lm), position_ids=position_ids, row_kwargs=row_kwargs)
    tokens = a.samples * a.length
    ids = torch.randint(0, lm.config.vocab_size, (1, tokens), device=device)
    with torch.no_grad():
        hidden0 = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(hidden0, position_ids)
    grad_out = torch.randn_like(hidden0) / 100

    def run(module):
        def step():
            hidden = hidden0.detach().requires_grad_()
            module(hidden, cos, sin).backward(grad_out)
        return step

    result = {"shape": a.shape, "layers": a.layers, "tokens": tokens, "attn": attn,
              "gpu": torch.cuda.get_device_name() if on_gpu else "cpu"}
    result["eager_s"] = seconds_per_iteration(run(stack), a.iterations, on_gpu)
    if on_gpu:
        try:
            sample = hidden0.detach().clone().requires_grad_()
            graphed = torch.cuda.make_graphed_callables(stack, (sample, cos, sin))
            result["graphed_s"] = seconds_per_iteration(run(graphed), a.iterations, on_gpu)
            saved = result["eager_s"] - result["graphed_s"]
            result["saved_s"] = saved
            result["saved_share_of_step"] = saved / a.step_s
        except Exception as err:  # a capture that fails is the measurement: say why
            result["graph_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
