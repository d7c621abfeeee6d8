"""The most layers of a built-in shape that `clustertune plan` says fit one option on this host:
the GPU's memory from nvidia-smi (or --gpu-mem), the host's RAM from /proc/meminfo (or --host-mem).

    python3 benchmarks/plan_layers.py --shape deepseek-r1-distill-qwen-32b --world 4 --stage 3 --offload --gc
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from clustertune.plan import Option, PlanInput, estimate  # noqa: E402
from clustertune.shapes import lookup_shape  # noqa: E402


def gpu_mem_gib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def host_mem_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no MemTotal in /proc/meminfo")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", required=True); p.add_argument("--world", type=int, required=True)
    p.add_argument("--stage", type=int, default=3); p.add_argument("--offload", action="store_true")
    p.add_argument("--gc", action="store_true"); p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--gpu-mem", type=float, default=None); p.add_argument("--host-mem", type=float, default=None)
    a = p.parse_args()
    base = lookup_shape(a.shape)
    gpu, host = a.gpu_mem or gpu_mem_gib(), a.host_mem or host_mem_gib()
    option = Option(stage=a.stage, offload_optimizer=a.offload, offload_params=False, gradient_checkpointing=a.gc)
    best = None
    for layers in range(1, base.num_hidden_layers + 1):
        inp = PlanInput(dataclasses.replace(base, num_hidden_layers=layers), tokens_per_micro_batch=a.tokens,
                        seq_len=a.tokens, world_size=a.world, gpus_per_node=a.world, gpu_mem_gib=gpu, host_mem_gib=host)
        e = estimate(inp, option)
        if e.fits:
            best = (layers, e)
    if best is None:
        print("PLAN 0 layers fit")
        return 1
    layers, e = best
    print(f"PLAN {layers} layers of {base.num_hidden_layers} fit {option.label} on {a.world} x {gpu:.1f} GiB GPUs, "
          f"{host:.0f} GiB host: GPU {e.gpu.total:.1f} GiB (peak at {e.gpu.peak_phase}), host {e.host.peak:.1f} GiB/node")
    print(layers, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
