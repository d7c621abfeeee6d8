"""GPU catalog: memory a process can see, and the dense bf16 peak that MFU is measured against.

The one table of per-GPU peaks: the planner (`--gpu`), the worker (the CUDA device name, through
`peak_flops_for_device`) and the benchmarks all read it, so an MFU printed anywhere means the same.

Units. Vendors sell HBM cards as "80 GB", "96 GB", ...; those stacks are binary-sized, so the
number is really GiB, and the driver shows a little less of it. We keep the vendor's number for
display and plan against `mem_gib`: the total nvidia-smi reports (MiB / 1024), which is what the
CUDA context, torch's allocator and our estimates all have to fit into.

    >>> lookup_gpu("NVIDIA H100 80GB HBM3").mem_gib
    79.6

Imported by the launcher side: never imports torch (this machine's GPUs come from nvidia-smi).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    name: str
    vendor_gb: int  # the marketing number ("H20 96 GB")
    mem_gib: float  # nvidia-smi memory.total in MiB / 1024: what the process can use at most
    bf16_tflops: float  # dense bf16 tensor-core peak (no sparsity), for MFU (clustertune.flops)

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def description(self) -> str:
        return f"{self.name} {self.vendor_gb} GB ({self.mem_gib:.1f} GiB visible)"


GPUS: dict[str, GpuSpec] = {
    "h20": GpuSpec("h20", 96, 95.6, 148.0),  # 97871 MiB
    "h100": GpuSpec("h100", 80, 79.6, 989.0),  # 81559 MiB (SXM)
    # Same memory, lower clocks and power: 756 TFLOP/s dense bf16, so its own entry for MFU.
    "h100-pcie": GpuSpec("h100-pcie", 80, 79.6, 756.0),  # 81559 MiB
    "h200": GpuSpec("h200", 141, 140.4, 989.0),  # 143771 MiB
    "a100": GpuSpec("a100", 80, 80.0, 312.0),  # 81920 MiB
    "a100-40": GpuSpec("a100-40", 40, 40.0, 312.0),  # 40960 MiB (SXM4)
    "l40s": GpuSpec("l40s", 48, 45.0, 362.0),  # 46068 MiB
    "a10": GpuSpec("a10", 24, 22.5, 125.0),  # 23028 MiB
    "rtx4090": GpuSpec("rtx4090", 24, 24.0, 165.0),  # 24564 MiB
}

# Other spellings users type or nvidia-smi prints, after _normalize().
_ALIASES = {
    "h100-80": "h100", "h100-sxm": "h100", "h100-80gb-hbm3": "h100", "h100-sxm5-80gb": "h100",
    "h100-pcie-80gb": "h100-pcie",
    "h20-96": "h20", "h200-141": "h200", "h200-141gb": "h200",
    "a100-80": "a100", "a100-80gb": "a100", "a100-sxm4-80gb": "a100", "a100-pcie-80gb": "a100", "a100-80gb-pcie": "a100",
    "a100-40gb": "a100-40", "a100-sxm4-40gb": "a100-40", "a100-pcie-40gb": "a100-40",
    "4090": "rtx4090", "rtx-4090": "rtx4090", "geforce-rtx-4090": "rtx4090",
}


def _normalize(name: str) -> str:
    key = name.strip().lower().removeprefix("nvidia").strip()
    return re.sub(r"[\s_]+", "-", key)


def lookup_gpu(name: str) -> GpuSpec | None:
    """Catalog entry for a short name ("h20") or an nvidia-smi name ("NVIDIA H100 80GB HBM3")."""
    key = _normalize(name)
    # No fuzzy matching: "h100-nvl" (94 GB) must not silently become an 80 GB h100.
    return GPUS.get(_ALIASES.get(key, key))


def peak_flops_for_device(device_name: str) -> float | None:
    """Dense bf16 peak (FLOP/s) of a CUDA device name as torch.cuda.get_device_name() or
    nvidia-smi print it ("NVIDIA H100 80GB HBM3"); None for a card not in the catalog (an
    H100 NVL or an unknown card gets no MFU rather than a wrong one)."""
    spec = lookup_gpu(device_name)
    return spec.peak_flops if spec is not None else None


def known_gpu_names() -> str:
    return ", ".join(GPUS)


def local_gpu_ids() -> list[str]:
    """GPUs visible here as CUDA_VISIBLE_DEVICES entries, without importing torch: the caller's
    CUDA_VISIBLE_DEVICES when set, else 0..N-1 for the N GPUs `nvidia-smi -L` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i in range(sum(1 for line in out.splitlines() if line.startswith("GPU ")))]


def local_gpu_count() -> int:
    """GPUs visible here, without importing torch (nvidia-smi, honouring CUDA_VISIBLE_DEVICES)."""
    return len(local_gpu_ids())
