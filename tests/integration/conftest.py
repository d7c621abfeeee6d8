"""Shared fixtures for the 2-process CPU tests of the real worker (`clustertune train`)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from data_helpers import chatml_tokenizer  # noqa: E402

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """A char-level ChatML tokenizer (fits the `tiny` shape's 128-token vocabulary) and an
    uppercase task with uneven lengths, so token-weighting matters."""
    root = tmp_path_factory.mktemp("task")
    tok = chatml_tokenizer()
    assert len(tok) <= 128
    tok.save_pretrained(root / "tokenizer")
    write_uppercase_task(root / "train.jsonl", count=256, seed=0)
    return root


def write_uppercase_task(path: Path, *, count: int, seed: int) -> Path:
    """`count` chat samples "up abc" -> "ABC" with 2-9 letter words (uneven lengths)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9)))
            f.write(json.dumps({"messages": [{"role": "user", "content": "up " + word},
                                             {"role": "assistant", "content": word.upper()}]}) + "\n")
    return path


def write_recipe(path: Path, task_dir: Path, run_dir: Path, **sections) -> Path:
    """A tiny-model recipe; `sections` override/extend e.g. train={"max_steps": 4}; a value None
    removes the key (its default applies). The base recipe is unpacked (data.packing = false,
    micro_batch_size 2): these tests were written and checked for padded micro-batches; a test of
    the recipe defaults passes data={"packing": None}."""
    base = {
        "run": {"output_dir": str(run_dir)},
        "model": {"path": "tiny", "tokenizer": str(task_dir / "tokenizer")},
        "data": {"train_files": [str(task_dir / "train.jsonl")], "max_length": 128,
                 "cache_dir": str(task_dir / "cache"), "packing": False},
        "train": {"max_steps": 8, "global_batch_size": 8, "micro_batch_size": 2, "lr": 3e-3,
                  "warmup_steps": 2, "seed": 7},
        "zero": {"stage": 2},
    }
    for name, values in sections.items():
        section = base.setdefault(name, {})
        section.update(values)
        for key in [k for k, v in section.items() if v is None]:
            del section[key]
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_train(recipe: Path, *args: str, nproc: int = 2, timeout: int = 420,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "clustertune.cli", "train", str(recipe), "--nproc", str(nproc), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def run_export(run_dir: Path, out: Path | None = None) -> subprocess.CompletedProcess:
    """`clustertune export RUN_DIR [--out OUT]` (offline, from the newest complete checkpoint)."""
    proc = subprocess.run([sys.executable, "-m", "clustertune.cli", "export", str(run_dir),
                           *(["--out", str(out)] if out else [])],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
