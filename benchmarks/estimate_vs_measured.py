"""The planner's time estimate (clustertune.timing) against measured runs of bench_clustertune.py,
as the markdown table benchmarks/RESULTS.md keeps (issue 12: goal within 25%).

    python3 benchmarks/estimate_vs_measured.py bench_out/*.log            # RESULT lines of the runs
    python3 benchmarks/estimate_vs_measured.py OUT/*.log --gpus-per-node 4 --intra-node-gbps 2400

Reads every `RESULT {...}` line (or JSON list of such records) of clustertune's harness
(impl "clustertune"), rebuilds the workload's lengths (benchmarks/workload.py: same seed, so the
same T_eff) and prints, per run, the measured median step time, the estimate with the bundled
achieved-MFU table, and, when the same files hold a 1-GPU run of the same shape / stage /
checkpointing (same call: same card and software), the estimate with that run's MFU, which
isolates the communication model. Runs on any machine (no GPU needed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(__file__), "..", "src"))
from workload import sample_lengths  # noqa: E402

from clustertune import shapes, timing  # noqa: E402
from clustertune.flops import effective_context  # noqa: E402
from clustertune.gpus import lookup_gpu  # noqa: E402

HARNESS_STEPS = 30  # bench_clustertune.py's default --steps: the lengths T_eff is taken over


def read_results(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if text.lstrip().startswith("["):
            records += [r for r in json.loads(text) if isinstance(r, dict)]
            continue
        for line in text.splitlines():
            if line.startswith("RESULT "):
                records.append(json.loads(line[len("RESULT "):]))
    return [r for r in records if r.get("impl") == "clustertune" and "step_s" in r]


def resolve_shape(name: str) -> shapes.Shape | None:
    """A built-in shape, or one truncated by --layers (bench_clustertune names it NAME-<N>l)."""
    shape = shapes.lookup_shape(name)
    if shape is not None:
        return shape
    match = re.fullmatch(r"(.+)-(\d+)l", name)
    if match and shapes.lookup_shape(match.group(1)) is not None:
        return dataclasses.replace(shapes.lookup_shape(match.group(1)), num_hidden_layers=int(match.group(2)))
    return None


def gpu_name(record: dict) -> str:
    spec = lookup_gpu(record.get("gpu", "h100"))
    return spec.name if spec else "h100"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="files with RESULT lines (logs) or JSON lists of them")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: every run on one node")
    p.add_argument("--intra-node-gbps", type=float, default=timing.DEFAULT_INTRA_NODE_GBPS)
    p.add_argument("--inter-node-gbps", type=float, default=timing.DEFAULT_INTER_NODE_GBPS)
    a = p.parse_args()
    records = read_results(a.results)
    if not records:
        raise SystemExit("no clustertune RESULT lines in the given files")
    one_gpu = {(r["shape"], r["stage"], r["gc"], r["mode"]): r for r in records if r.get("world_size", 1) == 1}
    print("| run | card | GPUs | ZeRO | tokens/step | measured step s | estimate (table MFU) | error | "
          "estimate (same call's 1-GPU MFU) | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        world = int(r.get("world_size", 1))
        shape = resolve_shape(r["shape"])
        if shape is None:  # e.g. a model loaded from a directory of the GPU machine
            print(f"skipped {r.get('tag') or r['shape']}: shape {r['shape']!r} is not built in", file=sys.stderr)
            continue
        # T_eff: the record's own (runs on other data, e.g. the demo's), else the workload's lengths
        t_eff = r.get("t_eff") or effective_context(sample_lengths(r["mode"], r["batch"] * HARNESS_STEPS, r["seq"]))
        # a record may carry its own topology and measured bandwidths (the GPU sandbox's 2 nodes x 2 GPUs)
        kwargs = dict(gpu=gpu_name(r), world_size=world, gpus_per_node=r.get("gpus_per_node") or a.gpus_per_node or world,
                      zero_stage=r["stage"], gradient_checkpointing=r["gc"], tokens_per_step=r["tokens_per_step"],
                      t_eff=t_eff, tokens_per_micro_batch=r["budget"],
                      intra_node_gbps=a.intra_node_gbps, inter_node_gbps=r.get("inter_node_gbps") or a.inter_node_gbps,
                      offload_optimizer=bool(r.get("offload")))
        table = timing.compare_with_measured(timing.estimate_run_time(shape, **kwargs), measured_step_s=r["step_s"])
        base = one_gpu.get((r["shape"], r["stage"], r["gc"], r["mode"]))
        same_call = "-", "-"
        if base is not None and world > 1 and base.get("mfu"):
            row = timing.compare_with_measured(timing.estimate_run_time(shape, achieved_mfu=base["mfu"], **kwargs),
                                               measured_step_s=r["step_s"])
            same_call = f"{row['estimated_step_s']:.3f}", f"{row['error']:+.0%}"
        print(f"| {r.get('tag') or r['shape']} | {r.get('gpu', 'h100 (assumed)')} | {world} | {r['stage']} | "
              f"{r['tokens_per_step']:,} | {r['step_s']:.3f} | {table['estimated_step_s']:.3f} | "
              f"{table['error']:+.0%} | {same_call[0]} | {same_call[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
