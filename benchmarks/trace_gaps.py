"""Where the GPU idles in a profiled step: the gaps between GPU activity in a Chrome trace written by
`train.profile_step` (worker/profiling.py), each charged to what the host was doing when the gap
ended (the CPU op that launched the next kernel, or a host-device sync that the gap waited behind).

    python3 benchmarks/trace_gaps.py RUN_DIR/profile/step_13.trace.json[.gz] [--min-gap-us 20] [--top 15]

Prints the step's span, GPU busy time, the idle total, and the idle time grouped by the CPU op
(with its enclosing ops) whose launch ended each gap. The profiler itself lengthens host work
(every op is recorded), so treat the idle total as an upper bound and the grouping as the lead.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    events = load(a.trace)
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X"),
                 key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    cpu_ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation") and e.get("ph") == "X"),
                     key=lambda e: e["ts"])
    starts = [e["ts"] for e in cpu_ops]
    syncs = [e for e in events if e.get("cat") == "cuda_runtime"
             and any(s in e["name"] for s in ("Synchronize", "Memcpy", "EventQuery"))]

    def enclosing(ts: float, tid) -> list[str]:
        """The CPU ops (outermost first) running on thread `tid` at time `ts`."""
        names = []
        for e in cpu_ops[max(0, bisect.bisect_right(starts, ts) - 4000):bisect.bisect_right(starts, ts)]:
            if e["tid"] == tid and e["ts"] <= ts <= e["ts"] + e["dur"]:
                names.append(e["name"])
        return names

    busy, idle, by_cause = 0.0, 0.0, collections.Counter()
    end = gpu[0]["ts"]
    for k in gpu:
        gap = k["ts"] - end
        if gap > a.min_gap_us:
            idle += gap
            launch = launches.get(k["args"].get("correlation"))
            if launch is None:
                cause = "(no launch record)"
            else:
                ops = enclosing(launch["ts"], launch["tid"])
                waited = [s for s in syncs if s["tid"] == launch["tid"] and end <= s["ts"] + s["dur"] <= k["ts"] + 1
                          and s["dur"] > 5]
                cause = " > ".join(ops[-3:]) or launch["name"]
                if waited:
                    cause += f"   [after {waited[-1]['name']} in {' > '.join(enclosing(waited[-1]['ts'], launch['tid'])[-2:])}]"
            by_cause[cause] += gap
        busy += max(0.0, k["ts"] + k["dur"] - max(end, k["ts"]))
        end = max(end, k["ts"] + k["dur"])
    span = end - gpu[0]["ts"]
    print(f"GPU span {span / 1e3:.1f} ms: busy {busy / 1e3:.1f} ms ({busy / span:.0%}), idle in gaps > "
          f"{a.min_gap_us:.0f} us {idle / 1e3:.1f} ms ({idle / span:.0%}), {len(gpu)} GPU activities")
    for cause, us in by_cause.most_common(a.top):
        print(f"{us / 1e3:8.1f} ms  {cause[:220]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
