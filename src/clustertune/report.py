"""`clustertune report RUN_DIR`: plots and a text summary of a run's metrics.jsonl.

    clustertune report runs/r1-distill-32b-sft   # -> runs/.../report/{loss,lr,tokens_per_s,memory}.png, summary.txt

metrics.jsonl has one JSON object per line (metrics.MetricsSink, written by the worker every
train.log_every steps). Training lines carry "step", "loss", "lr", "grad_norm", "tokens" and
"trained_tokens" (of that step: all and loss-bearing tokens), "tokens_per_s" (the whole cluster),
"tokens_per_s_per_gpu", "world_size", "step_time_s", "mfu" (per GPU: cluster FLOPs over world
size x one GPU's peak), "mem_gib", "mem_reserved_gib" and "mem_resident_gib" (GPU only;
max_memory_allocated, max_memory_reserved, and memory_allocated at the step's start / 2**30) and
"time"; eval lines carry "eval_loss"
(and maybe "eval_ppl", "eval_tokens"); lines of generated samples carry no metric and are left
out. Missing and unknown keys are fine, and so is a torn last line (the run may still be
writing). A resumed run appends to the file, so a step can appear twice: the later line wins.
Files of older runs are read too: "mem_gb" (max_memory_allocated / 1e9) becomes GiB, and lines
without "tokens_per_s_per_gpu" get it from RUN_DIR/world.json, with their MFU (then computed over
one GPU's peak for the whole cluster) divided by the world size.
Launcher side: never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from clustertune.errors import UserError

GIB = 2**30

# The first logged steps include compilation, allocator growth and NCCL setup: leave this share
# of them (at least one when there are two or more) out of the throughput mean.
WARMUP_FRACTION = 0.1


class ReportError(UserError):
    """A run directory the report cannot use; the message is meant for the user as-is."""


@dataclass
class Metrics:
    train: list[dict[str, float]] = field(default_factory=list)
    eval: list[dict[str, float]] = field(default_factory=list)
    skipped_lines: int = 0

    def series(self, key: str, rows: str = "train") -> tuple[list[float], list[float]]:
        """(steps, values) of the rows that have `key`; rows without a step use their index."""
        xs, ys = [], []
        for index, row in enumerate(getattr(self, rows)):
            if key in row:
                xs.append(row.get("step", float(index)))
                ys.append(row[key])
        return xs, ys


def _numeric(obj: dict) -> dict[str, float]:
    # bool is an int subclass: a stray flag must not become a 0/1 metric.
    return {k: float(v) for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# Keys every line has; a line with nothing else (e.g. generated samples) is no metric row.
_BOOKKEEPING = frozenset({"step", "time"})


def _latest_per_step(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """One row per step (the last logged: after a resume the run redid the steps past its
    checkpoint), in step order; rows without a step keep their place at the end."""
    by_step: dict[float, dict[str, float]] = {}
    loose = []
    for row in rows:
        if "step" in row:
            by_step.pop(row["step"], None)
            by_step[row["step"]] = row
        else:
            loose.append(row)
    return sorted(by_step.values(), key=lambda r: r["step"]) + loose


def run_world_size(run_dir: Path) -> int | None:
    """The run's world size from RUN_DIR/world.json (written by the worker at start), if readable."""
    try:
        world = json.loads((run_dir / "world.json").read_text(encoding="utf-8")).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None
    return world if isinstance(world, int) and world >= 1 else None


def upgrade_row(row: dict[str, float], world_size: int | None) -> dict[str, float]:
    """A training row in today's units and meaning, whatever version of the worker wrote it."""
    row = dict(row)
    if "mem_gib" not in row and "mem_gb" in row:  # older workers: max_memory_allocated / 1e9
        row["mem_gib"] = row.pop("mem_gb") * 1e9 / GIB
    world = int(row.get("world_size", 0)) or world_size
    if "tokens_per_s" in row and "tokens_per_s_per_gpu" not in row and world:
        row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / world
        if "mfu" in row:  # older workers divided the cluster's FLOPs by one GPU's peak
            row["mfu"] = row["mfu"] / world
    return row


def read_metrics(run_dir: Path) -> Metrics:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: run directory not found")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path}: no metrics file (has the run logged a step yet?)")
    metrics = Metrics()
    world_size = run_world_size(run_dir)
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            metrics.skipped_lines += 1
            continue
        if not isinstance(obj, dict):
            metrics.skipped_lines += 1
            continue
        row = _numeric(obj)
        if "eval_loss" in row or "eval_ppl" in row:
            metrics.eval.append(row)
        elif set(row) - _BOOKKEEPING:
            metrics.train.append(upgrade_row(row, world_size))
    metrics.train = _latest_per_step(metrics.train)
    metrics.eval = _latest_per_step(metrics.eval)
    if not metrics.train and not metrics.eval:
        raise ReportError(f"{path}: no metrics in it (empty file, or no line is a JSON object)")
    return metrics


# ----------------------------------------------------------------------------------- summary

def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _after_warmup(values: list[float]) -> list[float]:
    skip = max(1, int(len(values) * WARMUP_FRACTION)) if len(values) >= 2 else 0
    return values[skip:]


def _total_time(m: Metrics) -> float | None:
    """Wall time: span of the "time" stamps when there are two, else the sum of step times."""
    _, times = m.series("time")
    times = _finite(times)
    if len(times) >= 2:
        return max(times) - min(times)
    _, step_times = m.series("step_time_s")
    return sum(_finite(step_times)) if step_times else None


def _steady_rate(m: Metrics, key: str) -> float | None:
    """A per-step rate (tokens/s, MFU) over the steps after warm-up, weighted by each step's time:
    total work over total time. An unweighted mean of per-step rates overstates it when step sizes
    vary (W1's 15k-29k-token steps: median-of-steps MFU 39.8% where total FLOPs over total time was
    36.3%). Rows without step_time_s (old logs): the plain mean."""
    rows = _after_warmup([r for r in m.train if key in r and math.isfinite(r[key])])
    if key == "mfu":
        rows = [r for r in rows if r[key] > 0]  # 0: peak FLOPs unknown (CPU)
    if not rows:
        return None
    if all(r.get("step_time_s", 0) > 0 for r in rows):
        return sum(r[key] * r["step_time_s"] for r in rows) / sum(r["step_time_s"] for r in rows)
    return fmean(r[key] for r in rows)


def summarize(m: Metrics) -> dict[str, float | int | None]:
    _, losses = m.series("loss")
    losses = _finite(losses)
    all_steps = [row["step"] for row in m.train if "step" in row]
    _, mem = m.series("mem_gib")
    _, trained = m.series("trained_tokens")
    _, eval_losses = m.series("eval_loss", "eval")
    eval_losses = _finite(eval_losses)
    _, worlds = m.series("world_size")
    return {
        "logged_steps": len(m.train),
        "last_step": int(max(all_steps)) if all_steps else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "mean_tokens_per_s": _steady_rate(m, "tokens_per_s"),
        "mean_tokens_per_s_per_gpu": _steady_rate(m, "tokens_per_s_per_gpu"),
        "world_size": int(worlds[-1]) if worlds else None,
        "mean_mfu": _steady_rate(m, "mfu"),
        "peak_mem_gib": max(_finite(mem)) if _finite(mem) else None,
        # per-step counts, summed over the logged steps (all steps when train.log_every = 1)
        "trained_tokens": int(sum(_finite(trained))) if trained else None,
        "trained_tokens_steps": len(trained),
        "total_time_s": _total_time(m),
        "evals": len(m.eval),
        "last_eval_loss": eval_losses[-1] if eval_losses else None,
        "min_eval_loss": min(eval_losses) if eval_losses else None,
    }


def _fmt(value: float | int | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    h, rest = divmod(int(round(seconds)), 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s ({seconds:.1f} s)"


def _trained_text(s: dict[str, float | int | None]) -> str:
    if s["trained_tokens"] is None:
        return "n/a"
    text = f"{s['trained_tokens']:,d} (loss-bearing, summed over {s['trained_tokens_steps']} logged steps"
    last = s["last_step"]
    if last is not None and s["trained_tokens_steps"] < last:
        text += "; steps not logged (train.log_every > 1) are not in it"
    return text + ")"


def _unit(s: dict[str, float | int | None]) -> str:
    """GPU when the run logged GPU figures (MFU, memory), else rank (a CPU run)."""
    return "GPU" if s.get("mean_mfu") is not None or s.get("peak_mem_gib") is not None else "rank"


def _world_text(s: dict[str, float | int | None]) -> str:
    return f", {s['world_size']} {_unit(s)}s" if s.get("world_size") else ""


def summary_text(s: dict[str, float | int | None], skipped: int = 0) -> str:
    lines = [
        f"steps:            {_fmt(s['last_step'], 'd')} (last), {s['logged_steps']} logged",
        f"loss:             first {_fmt(s['first_loss'], '.4f')}, last {_fmt(s['last_loss'], '.4f')}, "
        f"min {_fmt(s['min_loss'], '.4f')}",
        f"tokens/s:         {_fmt(s['mean_tokens_per_s'], ',.0f')} cluster, "
        f"{_fmt(s['mean_tokens_per_s_per_gpu'], ',.0f')} per {_unit(s)}{_world_text(s)} (mean after the first "
        f"{WARMUP_FRACTION:.0%} of logged steps)",
        "peak memory:      " + (f"{s['peak_mem_gib']:.1f} GiB per GPU (rank 0's max_memory_allocated)"
                                 if s["peak_mem_gib"] is not None else "n/a (logged on GPU only)"),
        f"trained tokens:   {_trained_text(s)}",
        f"total time:       {_duration(s['total_time_s'])}",
    ]
    if s["mean_mfu"] is not None:
        lines.insert(3, f"MFU:              {100 * s['mean_mfu']:.1f}% per GPU (mean after the first "
                        f"{WARMUP_FRACTION:.0%} of logged steps)")
    if s["evals"]:
        lines.append(f"eval loss:        last {_fmt(s['last_eval_loss'], '.4f')}, "
                     f"min {_fmt(s['min_eval_loss'], '.4f')} ({s['evals']} evals)")
    if skipped:
        lines.append(f"skipped lines:    {skipped} (not JSON objects; a torn last line while the run writes is normal)")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- plots

# file name -> (title, y label, [(metric key, rows, legend label)])
PLOTS = {
    "loss": ("Loss", "loss", [("loss", "train", "train"), ("eval_loss", "eval", "eval")]),
    "lr": ("Learning rate", "lr", [("lr", "train", "lr")]),
    "tokens_per_s": ("Throughput", "tokens/s", [("tokens_per_s", "train", "cluster"),
                                                ("tokens_per_s_per_gpu", "train", "per GPU")]),
    "memory": ("GPU memory (peak allocated, rank 0)", "GiB", [("mem_gib", "train", "GiB")]),
}


def write_plots(m: Metrics, out_dir: Path) -> list[Path]:
    """One PNG per plot that has data; returns the files written."""
    try:
        import matplotlib
    except ImportError as err:
        raise ReportError(f"plots not written: matplotlib cannot be imported ({err}); it is a dependency of "
                          f"clustertune: pip install matplotlib (the summary is in {out_dir / 'summary.txt'})") from None
    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    written = []
    for name, (title, ylabel, curves) in PLOTS.items():
        data = [(label, *m.series(key, rows)) for key, rows, label in curves]
        data = [(label, xs, ys) for label, xs, ys in data if xs]
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for label, xs, ys in data:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend()
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def write_summary(run_dir: Path) -> tuple[Metrics, str]:
    """Read the run's metrics and write RUN_DIR/report/summary.txt; returns both."""
    metrics = read_metrics(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    text = summary_text(summarize(metrics), metrics.skipped_lines) + tensorboard_text(run_dir)
    (out_dir / "summary.txt").write_text(text, encoding="utf-8")
    return metrics, text


def make_report(run_dir: Path) -> tuple[str, list[Path]]:
    metrics, text = write_summary(run_dir)
    return text, write_plots(metrics, run_dir / "report")


def tensorboard_text(run_dir: Path) -> str:
    events = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    if events:
        return f"tensorboard:      tensorboard --logdir {run_dir / 'tensorboard'}\n"
    return (f"tensorboard:      no events in {run_dir / 'tensorboard'} (the worker writes them when it can import "
            "tensorboard; its log says why not); metrics.jsonl has every value\n")


def cmd_report(args: argparse.Namespace) -> int:
    """clustertune report RUN_DIR"""
    run_dir = Path(args.run_dir)
    metrics, text = write_summary(run_dir)
    print(text, end="")  # before the plots: without matplotlib the summary is still shown
    plots = write_plots(metrics, run_dir / "report")
    print("plots: " + (", ".join(str(p) for p in plots) if plots else "none (no plottable metrics)"))
    return 0
