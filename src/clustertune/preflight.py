"""Checks that need no worker, run by `validate`, `plan`, `train` and `launch` before any process
starts: the model directory and its tokenizer files, the batch arithmetic for the real world size,
a TORCH_CUDA_ARCH_LIST that DeepSpeed's JIT builder cannot parse (ZeRO++ quantized kernels), and a
run that would land on the CPU while GPUs are visible.

    from clustertune.preflight import check_before_workers
    check_before_workers(recipe, world_size=4, world_source="--nproc 4")   # files and arithmetic only

Launcher side: standard library and the torch-free config only.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from clustertune.config import ModelSection, Recipe, RecipeError, TrainSection, ZeroSection
from clustertune.shapes import SHAPES, lookup_shape

# What AutoTokenizer reads: a fast tokenizer (tokenizer.json), a sentencepiece model, a BPE/WordPiece
# vocabulary, or a tiktoken file. A directory with none of them cannot give a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json", "vocab.txt")
TOKENIZER_GLOBS = ("*.tiktoken",)
WEIGHT_GLOBS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def tokenizer_location(model: ModelSection) -> tuple[Path, str]:
    """The tokenizer directory the worker loads and the recipe key that chose it (for messages):
    model.tokenizer if set, the bundled demo tokenizer for a built-in shape, else model.path."""
    if model.tokenizer:
        return Path(model.tokenizer), "model.tokenizer"
    if lookup_shape(model.path) is not None:
        from clustertune.demo import demo_tokenizer_dir
        return demo_tokenizer_dir(), "model.path"
    return Path(model.path), "model.path"


def check_model_files(model: ModelSection) -> None:
    """model.path is a built-in shape or a Hugging Face model directory here (config.json and
    weights), and the tokenizer directory holds tokenizer files. Reads files only."""
    if lookup_shape(model.path) is None:
        _check_model_dir(Path(model.path))
    directory, key = tokenizer_location(model)
    if key == "model.tokenizer":
        if not directory.is_dir():
            what = "is a file, not a directory" if directory.exists() else "no such directory on this machine"
            raise RecipeError(f"model.tokenizer {str(directory)!r}: {what}; set it to the directory that holds "
                              "the tokenizer files, or leave it out to use the model directory's")
    if not _has_tokenizer_files(directory):
        fix = ("set model.tokenizer to the directory that holds them" if key == "model.path"
               else "point model.tokenizer at the directory that holds them")
        raise RecipeError(f"{key} {str(directory)!r}: no tokenizer files ({', '.join(TOKENIZER_FILES)} or "
                          f"*.tiktoken); {fix}")


def _check_model_dir(path: Path) -> None:
    shapes = ", ".join(sorted(SHAPES))
    if not path.exists():
        raise RecipeError(f"model.path {str(path)!r}: no such directory on this machine; set model.path to a "
                          f"local Hugging Face model directory (with config.json) or a built-in shape ({shapes})")
    if not path.is_dir():
        raise RecipeError(f"model.path {str(path)!r} is a file; set it to the model's directory (the one that "
                          "holds config.json and the weight files)")
    config = path / "config.json"
    if not config.is_file():
        raise RecipeError(f"model.path {str(path)!r} has no config.json, so it is not a Hugging Face model "
                          f"directory; set model.path to the directory that holds config.json and the weights, "
                          f"or to a built-in shape ({shapes})")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecipeError(f"model.path {str(path)!r}: config.json is not valid JSON ({err})") from None
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_GLOBS):
        raise RecipeError(f"model.path {str(path)!r} has a config.json but no weight files (*.safetensors or "
                          "pytorch_model*.bin); copy the complete model directory")


def _has_tokenizer_files(directory: Path) -> bool:
    return (any((directory / name).is_file() for name in TOKENIZER_FILES)
            or any(any(directory.glob(pattern)) for pattern in TOKENIZER_GLOBS))


def check_batch_arithmetic(train: TrainSection, *, packing: bool, world_size: int, world_source: str) -> None:
    """The worker's batch layout (batch_math.batch_layout) for this world size, before it starts.
    `world_source` says where the world size came from (`--nproc 4`, `cluster.toml: 2 nodes x 8`)."""
    from clustertune.batch_math import batch_layout
    where = f"world size {world_size} from {world_source}"
    if not packing and train.micro_batch_size > train.global_batch_size:
        raise RecipeError(f"train.micro_batch_size ({train.micro_batch_size}) > train.global_batch_size "
                          f"({train.global_batch_size}): a micro-batch cannot hold more samples than the "
                          f"whole step; lower train.micro_batch_size or raise train.global_batch_size")
    if not packing and train.global_batch_size % world_size:
        g = train.global_batch_size
        raise RecipeError(f"train.global_batch_size ({g}) must be a multiple of the world size: {g} % world size "
                          f"({world_size}) = {g % world_size} != 0 ({where}); every rank takes the same number of "
                          "samples per step")
    try:
        batch_layout(train, world_size=world_size, packing=packing)
    except RecipeError as err:
        raise RecipeError(f"{err} ({where})") from None


# What DeepSpeed 0.19's JIT op builder parses in TORCH_CUDA_ARCH_LIST: "9.0", "8.6+PTX" (its sort key
# int()s each dotted part). Arch-specific entries such as "9.0a" make every JIT build fail with
# "invalid literal for int() with base 10: '0a'" (seen on the GPU machines, 2026-11-26).
_DEEPSPEED_ARCH_RE = re.compile(r"^\d+\.\d+(\+PTX)?$")


def check_jit_arch_list(zero: ZeroSection, environ: Mapping[str, str]) -> None:
    """ZeRO++ quantized communication JIT-compiles DeepSpeed's CUDA quantizer on first use, on every
    rank, after the engine set-up: a TORCH_CUDA_ARCH_LIST it cannot parse fails the run there."""
    if not (zero.quantized_weights or zero.quantized_gradients):
        return
    value = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    entries = [e for e in value.replace(" ", ";").split(";") if e]
    bad = [e for e in entries if not _DEEPSPEED_ARCH_RE.match(e)]
    if bad:
        fixed = ";".join(dict.fromkeys(re.sub(r"[a-z]+$", "", e.split("+")[0]) for e in entries))
        raise RecipeError(f"zero.quantized_weights / zero.quantized_gradients JIT-compile DeepSpeed's CUDA "
                          f"quantizer, and DeepSpeed cannot parse TORCH_CUDA_ARCH_LIST={value!r} "
                          f"({', '.join(repr(b) for b in bad)}): export TORCH_CUDA_ARCH_LIST=\"{fixed}\" "
                          "before launching (it reaches every rank)")


def check_before_workers(recipe: Recipe, *, world_size: int, world_source: str, model_here: bool = True) -> None:
    """What can fail without a worker fails here, cheapest first: the model and tokenizer files,
    then the batch arithmetic for this world size (callers read the data next). `model_here`
    False (a cluster run whose model is only on the nodes): the doctor checks the files there."""
    if model_here:
        check_model_files(recipe.model)
    else:
        tokenizer = f" / model.tokenizer {recipe.model.tokenizer!r}" if recipe.model.tokenizer else ""
        print(f"note: model.path {recipe.model.path!r}{tokenizer} is not on this machine; `clustertune cluster "
              "doctor --recipe ...` checks the paths on every node", file=sys.stderr)
    check_batch_arithmetic(recipe.train, packing=recipe.data.packing, world_size=world_size,
                           world_source=world_source)
    check_jit_arch_list(recipe.zero, os.environ)


def model_on_this_machine(model: ModelSection) -> bool:
    """model.path (a built-in shape, or a path that exists here) and model.tokenizer (unset, or a
    path that exists here) are on this machine, so their files can be checked here."""
    path_here = lookup_shape(model.path) is not None or Path(model.path).exists()
    return path_here and (model.tokenizer is None or Path(model.tokenizer).exists())


def note_cpu_with_gpus(*, on_gpu: bool, visible_gpus: int, device: str) -> None:
    """A run that will use the CPU while GPUs are visible says so at start, never silently."""
    if on_gpu or visible_gpus == 0:
        return
    print(f"note: training on the CPU although {visible_gpus} GPU(s) are visible here, because "
          f"train.device = {device!r}; set train.device = \"auto\" (or \"cuda\") to use them", file=sys.stderr)
