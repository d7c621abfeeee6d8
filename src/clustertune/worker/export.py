"""The Hugging Face export of trained weights: safetensors shards (LoRA merged or the adapter
alone), config, generation config and tokenizer, loadable by `from_pretrained`.

Two sources: the live model at the end of a run (`export_hf_model`, collective under ZeRO-3:
parameters are gathered one at a time), and a finished or interrupted run's newest (or best)
complete checkpoint (`export_from_checkpoint`, one process: `clustertune export RUN_DIR`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from clustertune.worker.checkpoint import (BEST, MARKER, NODE_LOCAL_ENV, CheckpointError, best_checkpoint,
                                           checkpoint_root, newest_complete, read_marker)

SHARD_BYTES = 2 * 1024**3  # safetensors shard size of an export


def _iter_full_parameters(lm, *, zero_stage: int) -> Iterator[tuple[str, Any]]:
    """(name, full tensor on CPU) for every parameter, gathering one at a time under ZeRO-3
    so host and GPU memory stay bounded by the largest parameter."""
    from clustertune.worker import engine
    for name, param in lm.named_parameters():
        with engine.gathered([param], zero_stage=zero_stage):
            yield name, param.detach().to("cpu", copy=True)


def _merge_lora(named: Iterator[tuple[str, Any]], *, scaling: float) -> Iterator[tuple[str, Any]]:
    """PEFT names -> plain HF names, with W = W0 + scaling * B @ A folded into each base weight."""
    pending: dict[str, dict[str, Any]] = {}
    for name, tensor in named:
        name = name.removeprefix("base_model.model.")
        if ".lora_A." in name or ".lora_B." in name or ".base_layer.weight" in name:
            module = re.sub(r"\.(lora_A|lora_B)\.[^.]+\.weight$|\.base_layer\.weight$", "", name)
            kind = "A" if ".lora_A." in name else "B" if ".lora_B." in name else "W"
            parts = pending.setdefault(module, {})
            parts[kind] = tensor
            if len(parts) == 3:
                merged = (parts["W"].float() + scaling * parts["B"].float() @ parts["A"].float()).to(parts["W"].dtype)
                del pending[module]
                yield f"{module}.weight", merged
            continue
        yield name.replace(".base_layer.", "."), tensor
    if pending:
        raise RuntimeError(f"LoRA merge: incomplete modules {sorted(pending)[:3]}")


def _write_safetensors_shards(named: Iterator[tuple[str, Any]], out: Path, *, dtype) -> None:
    from safetensors.torch import save_file
    shard: dict[str, Any] = {}
    shard_bytes = 0
    files: list[list[str]] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            files.append(list(shard))
            save_file(shard, str(out / f"model-{len(files):05d}.safetensors.tmp"), metadata={"format": "pt"})
            shard, shard_bytes = {}, 0

    for name, tensor in named:
        tensor = tensor.to(dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > SHARD_BYTES:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total += size
    flush()
    count = len(files)
    for i, names in enumerate(files, start=1):
        final = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        os.replace(out / f"model-{i:05d}.safetensors.tmp", out / final)
        weight_map.update({n: final for n in names})
    if count > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _check_all_shards(directory: Path) -> None:
    """The consolidation needs every rank's ZeRO shard (not a BF16_Optimizer checkpoint's: its model
    file holds the whole model). Without a shared filesystem each node holds only its own ranks'
    shards: say how to gather them instead of failing deep inside."""
    from clustertune.worker import engine
    world = read_marker(directory).get("world_size")
    if not world or not engine.export_needs_every_rank(directory):
        return
    ranks = {int(m.group(1)) for f in directory.glob("*optim_states.pt")
             if (m := re.search(r"_rank_(\d+)_", f.name))}
    missing = sorted(set(range(int(world))) - ranks)
    if missing:
        raise CheckpointError(
            f"{directory}: shards of rank(s) {missing[:8]} of {world} are missing (checkpoints kept per node, "
            f"{NODE_LOCAL_ENV}?). Copy {directory.name}/ from every node into one directory D/checkpoints/"
            f"{directory.name}/ (shard file names do not collide; a node's copy of mp_rank_00_model_states.pt "
            f"is the same on all), then run {NODE_LOCAL_ENV}=D clustertune export RUN_DIR")


def export_from_checkpoint(run_dir: Path, out: Path, *, model_section, lora_section, precision: str,
                           best: bool = False) -> int:
    """Offline export of the newest complete checkpoint (best: the one with the best eval loss) as
    a Hugging Face model (LoRA merged). Returns the checkpoint's step."""
    import torch

    from clustertune.worker import engine
    from clustertune.worker.model import hf_config, load_tokenizer

    if best:
        found = best_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"{run_dir}: no best checkpoint recorded ({checkpoint_root(run_dir) / BEST} with "
                                  "a complete checkpoint; the run needs checkpoint.keep_best = true and an eval set)")
    else:
        found = newest_complete(run_dir)
    if found is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint (directories with {MARKER}) to export")
    step, directory = found
    _check_all_shards(directory)
    config = hf_config(model_section)
    # Parameter names are those of the trained module: TokenLossModel keeps the HF model as `lm`.
    named = ((name.removeprefix("lm."), tensor) for name, tensor in
             engine.consolidated_parameters(directory.parent, directory.name))
    if lora_section.enabled:
        named = _merge_lora(named, scaling=lora_section.alpha / lora_section.r)
    if config.tie_word_embeddings:
        named = ((n, t) for n, t in named if n != "lm_head.weight")
    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors_shards(named, out, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    config.use_cache = True
    config.save_pretrained(str(out))
    load_tokenizer(model_section).save_pretrained(str(out))
    return step


def export_hf_model(lm, tokenizer, out: Path, *, zero_stage: int, is_writer: bool, lora_merge: bool,
                    dtype) -> None:
    """Write `lm` (HF causal LM, maybe PEFT-wrapped, maybe ZeRO-3 partitioned) as a Hugging Face
    model directory loadable by from_pretrained. Collective under ZeRO-3: call on every rank."""
    from clustertune.worker.model import base_causal_lm

    is_peft = hasattr(lm, "peft_config")
    named = _iter_full_parameters(lm, zero_stage=zero_stage)
    if is_writer:
        out.mkdir(parents=True, exist_ok=True)
    if is_peft and not lora_merge:
        adapter = {n: t for n, t in named if "lora_" in n}
        if is_writer:
            lm.save_pretrained(str(out), state_dict=adapter)
    else:
        if is_peft:
            cfg = lm.peft_config["default"]
            named = _merge_lora(named, scaling=cfg.lora_alpha / cfg.r)
        if is_writer:
            _write_safetensors_shards(named, out, dtype=dtype)
        else:
            for _ in named:  # take part in every gather
                pass
    if is_writer:
        config = base_causal_lm(lm).config
        config.use_cache = True
        config.save_pretrained(str(out))
        base_causal_lm(lm).generation_config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
