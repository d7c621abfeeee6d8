"""Planner validation: clustertune.plan's predicted peak GPU memory against the peaks measured by
the GPU benchmark (benchmarks/logs/*.json: torch.cuda.max_memory_allocated() / 2**30 of each run,
one H100 80GB HBM3, 2026-11-25). No GPU needed: it reads the logs and runs the arithmetic.

    .venv/bin/python benchmarks/plan_validation.py                # markdown table on stdout
    .venv/bin/python benchmarks/plan_validation.py --json out.json

Each logged run is turned into the planner's inputs exactly as the benchmark ran it
(benchmarks/bench.py, bench_clustertune.py, hf_trainer.py):
  * clustertune: packed rows of `budget` tokens, Liger (fused linear cross-entropy), the engine's
    ZeRO buckets (reduce hidden^2, prefetch 0.9 hidden^2, persistence from --persist or 10 hidden),
    more than one row per step unless tokens/step <= budget.
  * baseline (HF Trainer + DeepSpeed): no Liger, DeepSpeed's default buckets (reduce 5e8 elements),
    one micro-batch per step; padded micro-batches of `mbs` sequences, each padded to the longest
    of its batch: for variable lengths the peak batch is the one with the longest sample, taken
    from benchmarks/workload.py's sample_lengths (same seed, same steps).
World size 1; ZeRO-3 on one rank partitions nothing whatever the persistence threshold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from clustertune.gpus import lookup_gpu  # noqa: E402
from clustertune.plan import Option, PlanInput, ZeroBuckets, gpu_memory  # noqa: E402
from clustertune.shapes import SHAPES, Shape  # noqa: E402

TOLERANCE = 0.15  # issue 6: within +-15%
CARD = "NVIDIA H100 80GB HBM3"
BASELINE_SHAPES = {"1.5b": "qwen2.5-1.5b", "7b-8l": "qwen2.5-7b-8l"}  # hf_trainer.SHAPES
DEFAULT_STEPS = 20  # bench.py's STEPS


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    inp: PlanInput
    option: Option
    measured_gib: float
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Row:
    case: Case
    predicted_gib: float
    peak_phase: str

    @property
    def error(self) -> float:
        return self.predicted_gib / self.case.measured_gib - 1

    @property
    def within(self) -> bool:
        return abs(self.error) <= TOLERANCE


def resolve_shape(name: str) -> Shape:
    """Built-in shape, "<shape>-<N>l" (bench_clustertune --layers N), or the gate's init directory
    (bench.make_init: a seeded random qwen2.5-1.5b saved with save_pretrained)."""
    name = BASELINE_SHAPES.get(name, name)
    if name.startswith("/tmp/ct_init_1.5b"):
        return SHAPES["qwen2.5-1.5b"]
    if name in SHAPES:
        return SHAPES[name]
    base, _, layers = name.rpartition("-")
    if layers.endswith("l") and layers[:-1].isdigit() and base in SHAPES:
        return dataclasses.replace(SHAPES[base], num_hidden_layers=int(layers[:-1]))
    raise ValueError(f"unknown shape {name!r}")


def peak_padded_tokens(mode: str, mbs: int, seq: int, steps: int) -> tuple[int, list[int]]:
    """Tokens of the largest padded micro-batch the baseline ran (mbs x longest in the batch) and
    each batch's longest sample."""
    if mode == "fixed":
        return mbs * seq, [seq] * steps
    sys.path.insert(0, str(HERE))
    from workload import sample_lengths  # imports torch (its generator defines the lengths)
    lengths = sample_lengths(mode, steps * mbs, seq)
    longest = [max(lengths[i:i + mbs]) for i in range(0, steps * mbs, mbs)]
    return mbs * max(longest), longest


def case_from_record(rec: dict, gpu_mem_gib: float, log: str = "") -> Case:
    shape = resolve_shape(rec["shape"])
    common = dict(world_size=1, gpus_per_node=1, gpu_mem_gib=gpu_mem_gib, host_mem_gib=1024, seq_len=rec["seq"])
    option = Option(rec["stage"], False, False, bool(rec["gc"]))
    label = f"{log}: {rec['name']}" if log else rec["name"]
    if rec["impl"] == "clustertune":
        h2 = shape.hidden_size ** 2
        persist = 10 * shape.hidden_size  # engine default; --persist 1e8 on the W1/W2/W3 ZeRO-3 runs
        buckets = ZeroBuckets(reduce_bucket=h2, prefetch_bucket=int(0.9 * h2), param_persistence_threshold=persist)
        inp = PlanInput(shape, tokens_per_micro_batch=rec["budget"], liger=rec.get("liger", True),
                        buckets=buckets, grad_accumulation=rec["tokens_per_step"] > rec["budget"], **common)
        note = f"packed rows of {rec['budget']:,} tokens"
    else:
        tokens, longest = peak_padded_tokens(rec["mode"], rec["mbs"], rec["seq"], DEFAULT_STEPS)
        inp = PlanInput(shape, tokens_per_micro_batch=tokens, liger=False, buckets=ZeroBuckets(),
                        grad_accumulation=False, **common)
        if rec["mode"] == "fixed":
            note = f"{rec['mbs']} x {rec['seq']} padded"
        else:
            note = (f"{rec['mbs']} seqs padded to the batch's longest; peak batch {rec['mbs']} x {max(longest)} "
                    f"({sum(1 for n in longest if n == max(longest))} of {len(longest)} batches)")
    return Case(label, inp, option, rec["peak_mem_gb"], note)


def load_cases(log_dir: Path, gpu_mem_gib: float) -> tuple[list[Case], list[str]]:
    cases, skipped = [], []
    for path in sorted(log_dir.glob("*.json")):
        for rec in json.loads(path.read_text()):
            if "error" in rec or not rec.get("peak_mem_gb"):
                skipped.append(f"{path.name}: {rec.get('name')}: no peak memory ({rec.get('error', 'not on GPU')})")
                continue
            if rec["impl"] == "baseline" and rec["shape"] not in BASELINE_SHAPES and not rec.get("tag") == "gate":
                skipped.append(f"{path.name}: {rec['name']}: unknown baseline shape {rec['shape']!r}")
                continue
            cases.append(case_from_record(rec, gpu_mem_gib, log=path.stem.split("_")[0]))
    return cases, skipped


def evaluate(case: Case) -> Row:
    mem = gpu_memory(case.inp, case.option)
    return Row(case, mem.allocated_peak, mem.peak_phase)


def shape_label(shape: Shape) -> str:
    billions = shape.parameter_count() / 1e9
    return f"{billions:.2f}B ({shape.num_hidden_layers} layers, h {shape.hidden_size})"


def markdown(rows: list[Row]) -> str:
    lines = ["| run (benchmarks/logs) | ZeRO | model | tokens / micro-batch | gc | Liger | predicted GiB "
             "| measured GiB | error | predicted peak at |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.case
        flag = "" if r.within else " **(outside +-15%)**"
        lines.append(
            f"| {c.name} | {c.option.stage} | {shape_label(c.inp.shape)} | {c.inp.tokens_per_micro_batch:,} "
            f"({c.note}) | {'on' if c.option.gradient_checkpointing else 'off'} | {'on' if c.inp.liger else 'off'} "
            f"| {r.predicted_gib:.2f} | {c.measured_gib:.2f} | {100 * r.error:+.1f}%{flag} | {r.peak_phase} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--logs", default=str(HERE / "logs"))
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    gpu = lookup_gpu(CARD)
    cases, skipped = load_cases(Path(a.logs), gpu.mem_gib)
    rows = [evaluate(c) for c in cases]
    print(markdown(rows))
    within = [r for r in rows if r.within]
    kinds = {(r.case.option.stage, r.case.inp.shape.parameter_count()) for r in within}
    print(f"\n{len(within)} of {len(rows)} runs within +-{TOLERANCE:.0%} "
          f"({len(kinds)} distinct ZeRO stage x model size combinations); card {CARD}")
    for line in skipped:
        print(f"skipped: {line}")
    if a.json:
        Path(a.json).write_text(json.dumps([
            {"run": r.case.name, "stage": r.case.option.stage, "parameters": r.case.inp.shape.parameter_count(),
             "tokens_per_micro_batch": r.case.inp.tokens_per_micro_batch, "gc": r.case.option.gradient_checkpointing,
             "liger": r.case.inp.liger, "predicted_gib": round(r.predicted_gib, 3), "measured_gib": r.case.measured_gib,
             "error": round(r.error, 4), "peak_phase": r.peak_phase} for r in rows], indent=1))
    return 0 if len(kinds) >= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
