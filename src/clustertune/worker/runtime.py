"""This rank's runtime: device, process group, precision and seeds (set up once, first), the
run directory's record of what ran, and the RNG state a checkpoint saves and resume restores.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clustertune.config import Recipe, TrainSection, recipe_to_toml
from clustertune.worker import distributed, engine


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    on_gpu: bool
    device: torch.device
    precision: str  # "bf16" or "fp32", resolved from train.precision

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(train: TrainSection, *, collective_timeout_s: float | None) -> Runtime:
    """Pick the device, join the process group (DeepSpeed's), seed everything. Collective."""
    rank, local_rank, world = distributed.world_info()
    on_gpu = torch.cuda.is_available() if train.device == "auto" else train.device == "cuda"
    if on_gpu:
        torch.cuda.set_device(local_rank)
    engine.init_distributed(on_gpu=on_gpu, timeout_s=collective_timeout_s)
    seed_everything(train.seed, deterministic=train.deterministic or not on_gpu)
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    return Runtime(rank, local_rank, world, on_gpu, device, resolve_precision(train, on_gpu=on_gpu))


def resolve_precision(train: TrainSection, *, on_gpu: bool) -> str:
    if train.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    if train.precision == "bf16" and not on_gpu:
        # DeepSpeed's CPU accelerator runs bf16, but slowly and with gloo reductions in bf16;
        # allow it (users may want parity checks) rather than refuse.
        return "bf16"
    return train.precision


def seed_everything(seed: int, *, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def write_run_files(run_dir: Path, recipe: Recipe, ds_config: dict[str, Any], rt: Runtime) -> None:
    """What ran: the resolved recipe, DeepSpeed's JSON, the world, versions (rank 0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    (run_dir / "world.json").write_text(json.dumps(
        {"world_size": rt.world_size, "device": str(rt.device.type), "precision": rt.precision}, indent=2))
    from clustertune.manifest import write_manifest  # versions, git commit, environment (no secrets)
    write_manifest(run_dir, world_size=rt.world_size,
                   extra={"device": str(rt.device.type), "precision": rt.precision})


# ------------------------------------------------------------------------------ RNG state

def rng_file(rank: int) -> str:
    return f"rng_state_rank{rank:05d}.pt"


def rng_state(rt: Runtime) -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if rt.on_gpu:
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    return state


def restore_rng(state: dict[str, Any], rt: Runtime) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if rt.on_gpu and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], rt.device)
