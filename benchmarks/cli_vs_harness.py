"""The product path against the benchmark harness on the same work: `clustertune train` on a
JSONL file whose samples have the workload's lengths, then benchmarks/bench_clustertune.py with
the same shape, lengths and settings. Prints both and fails (exit 1) when their tokens/s differ
by more than --tolerance. --profile writes each side's profile of the same step.

    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/cli_vs_harness.py --shape qwen2.5-1.5b --stage 2 \
        --seq 4096 --batch 32 --budget 16384 --gc --steps 30 --out /tmp/cvh --profile
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload import sample_lengths  # noqa: E402


def write_jsonl(path: Path, lengths: list[int]) -> None:
    """Chat records that the bundled character-level tokenizer turns into samples of exactly the
    workload's lengths (the ChatML frame's tokens included)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(HERE.parent / "src/clustertune/demo_assets/tokenizer"))

    def frame(user: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    rendered = tok.apply_chat_template(frame("u", "a"), tokenize=False)
    overhead = len(tok(rendered, add_special_tokens=False)["input_ids"]) - 2
    letters = "abcdefghijklmnopqrstuvwxyz "
    with path.open("w") as f:
        for i, n in enumerate(lengths):
            body = max(2, n - overhead)
            user = max(1, body // 5)
            text = "".join(letters[(i * 7 + k * 13) % len(letters)] for k in range(body))
            f.write(json.dumps({"messages": frame(text[:user], text[user:])}) + "\n")


def write_recipe(a, data: Path, run_dir: Path) -> Path:
    """The recipe a user would write for this work (every other key at its default, except
    checkpoint_every_n_layers = 1: the harness recomputes every layer, and "auto" would take 2 on an
    H100; --set train.checkpoint_every_n_layers=N overrides it). With --plain,
    packing, the row size, checkpointing and the ZeRO stage are left to their defaults too (what
    `clustertune train` resolves them to is in the RESULT line's "resolved")."""
    speed_keys = not getattr(a, "plain", False)
    text = f"""[run]
output_dir = {json.dumps(str(run_dir))}

[model]
path = {json.dumps(a.shape)}
{f"num_layers = {a.layers}" if a.layers else ""}

[data]
train_files = [{json.dumps(str(data))}]
max_length = {a.seq}
{"packing = true" if speed_keys else ""}

[train]
max_steps = {a.steps}
global_batch_size = {a.batch}
{f"micro_batch_tokens = {max(a.budget, a.seq)}" if speed_keys else ""}
{f'gradient_checkpointing = {"true" if a.gc else "false"}' if speed_keys else ""}
{"checkpoint_every_n_layers = 1" if speed_keys else ""}
schedule = "constant"
lr = 1e-5
adam_beta2 = 0.999
{f"profile_step = {a.steps - 2}" if a.profile else ""}

[zero]
{f"stage = {a.stage}" if speed_keys else ""}
"""
    path = run_dir.parent / "cli_recipe.toml"
    path.write_text(text)
    return path


def run_cli(a, data: Path, run_dir: Path) -> dict:
    recipe = write_recipe(a, data, run_dir)
    cmd = [sys.executable, "-m", "clustertune.cli", "train", str(recipe), "--nproc", str(a.nproc)]
    for override in a.set:
        cmd += ["--set", override]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=subprocess.DEVNULL if not a.verbose else None)
    wall_s = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open() if '"loss"' in line]
    measured = [r for r in records if r["step"] > 5]
    return {"step_s": statistics.median(r["step_time_s"] for r in measured),
            "tok_per_s": sum(r["tokens"] for r in measured) / sum(r["step_time_s"] for r in measured),
            # total FLOPs over total time (per-step MFU weighted by step time): the median of per-step
            # MFU overstated W1 by up to 3 points (its steps range from 15k to 29k tokens)
            "mfu": sum(r["mfu"] * r["step_time_s"] for r in measured) / sum(r["step_time_s"] for r in measured), "peak_gib": max(r.get("mem_gib", 0) for r in records),
            "peak_reserved_gib": max(r.get("mem_reserved_gib", 0) for r in records),
            "resident_gib": max(r.get("mem_resident_gib") or 0 for r in records),
            "alloc_retries": max(r.get("alloc_retries") or 0 for r in records),
            "time_to_first_step_s": records[0].get("time_to_first_step_s"), "command_wall_s": round(wall_s, 1),
            "resolved": resolved_speed_keys(run_dir)}


def resolved_speed_keys(run_dir: Path) -> dict:
    """The speed keys the run trained with (the launcher's resolved recipe handed to the ranks)."""
    import tomllib
    path = run_dir / "launch" / "recipe.toml"
    if not path.exists():
        return {}
    r = tomllib.loads(path.read_text())
    train, zero, data = r.get("train", {}), r.get("zero", {}), r.get("data", {})
    return {"packing": data.get("packing"), "micro_batch_tokens": train.get("micro_batch_tokens"),
            "gradient_checkpointing": train.get("gradient_checkpointing"),
            "checkpoint_every_n_layers": train.get("checkpoint_every_n_layers"), "zero_stage": zero.get("stage")}


def run_harness(a, out: Path) -> dict:
    launcher = [sys.executable] if a.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.nproc)]
    cmd = launcher + [str(HERE / "bench_clustertune.py"), "--shape", a.shape, "--stage", str(a.stage),
           "--mode", a.mode, "--order", "shuffled", "--seq", str(a.seq), "--batch", str(a.batch), "--budget", str(a.budget),
           "--steps", str(a.steps)] + (["--layers", str(a.layers)] if a.layers else []) + (["--gc"] if a.gc else []) + (["--profile", str(out / "harness_profile")]
                                                                   if a.profile else [])
    text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
    return {"step_s": result["step_s"], "tok_per_s": result["tok_per_s"], "mfu": result["mfu"],
            "peak_gib": result["peak_mem_gb"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen2.5-1.5b"); p.add_argument("--stage", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096); p.add_argument("--batch", type=int, default=32)
    p.add_argument("--budget", type=int, default=16384); p.add_argument("--steps", type=int, default=30)
    p.add_argument("--gc", action="store_true"); p.add_argument("--profile", action="store_true")
    p.add_argument("--tolerance", type=float, default=0.05); p.add_argument("--out", default="/tmp/cli_vs_harness")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (ranks) on this host")
    p.add_argument("--layers", type=int, default=None, help="model.num_layers: the shape cut to N layers")
    p.add_argument("--mode", default="var", help="sample lengths: var (SFT-like, capped at --seq) or fixed")
    p.add_argument("--set", action="append", default=[], help="recipe override for the CLI run (repeatable)")
    p.add_argument("--cli-only", action="store_true", help="skip the harness and the check")
    p.add_argument("--plain", action="store_true", help="the CLI's recipe leaves packing, micro_batch_tokens, "
                   "gradient checkpointing and zero.stage at their defaults (issue 13 item 5: the fast path by default)")
    a = p.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    lengths = sample_lengths(a.mode, a.steps * a.batch, a.seq)
    data = out / "w1.jsonl"
    write_jsonl(data, lengths)
    cli = run_cli(a, data, out / "cli_run")
    if a.cli_only:
        print("RESULT " + json.dumps({"cli": cli, "set": a.set}), flush=True)
        return 0
    harness = run_harness(a, out)
    ratio = cli["tok_per_s"] / harness["tok_per_s"]
    print("RESULT " + json.dumps({"cli": cli, "harness": harness, "cli_over_harness": round(ratio, 4)}), flush=True)
    if abs(ratio - 1) > a.tolerance:
        print(f"FAIL: clustertune train runs at {ratio:.2f}x the harness's tokens/s (tolerance {a.tolerance:.0%})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
