"""The interconnect test that `clustertune cluster doctor` starts on every node: all-reduce and
all-gather bus bandwidth across all ranks of all nodes, and all-reduce inside each node.

    python -m clustertune.worker.bandwidth --nnodes 2 --node-rank K --nproc 2 \\
        --master-addr 10.0.0.11 --master-port 29500 [--backend nccl|gloo] [--size-mb 64] [--iters 5]

One such process per node starts `--nproc` ranks (ranks K*nproc .. K*nproc+nproc-1; NCCL: one GPU
each, cuda:local_rank of the node's CUDA_VISIBLE_DEVICES), waits for them (at most --timeout
seconds, then kills them) and exits with the first failure's code. Rank 0 prints one line

    clustertune-bandwidth {"allreduce_gbs": ..., "allgather_gbs": ..., "intra_allreduce_gbs": {...}, ...}

Bus bandwidth follows nccl-tests: an all-reduce of S bytes over n ranks in t seconds is
S/t x 2(n-1)/n, an all-gather whose output is S bytes is S/t x (n-1)/n; the median of --iters
timed runs after one warm-up. "Intra" is each node's own all-reduce (its ranks only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta

TAG = "clustertune-bandwidth"
GB = 1e9


def bus_bandwidth_gbs(kind: str, size_bytes: int, seconds: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth in GB/s (1e9 bytes/s) of one all-reduce or all-gather."""
    if ranks < 2 or seconds <= 0:
        return 0.0
    factor = {"allreduce": 2 * (ranks - 1) / ranks, "allgather": (ranks - 1) / ranks}[kind]
    return size_bytes / seconds * factor / GB


def _timed(fn, iters: int, sync) -> float:
    fn()  # warm-up: connections and buffers are set up on the first call
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank_main(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    nccl = args.backend == "nccl"
    if nccl:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend, rank=rank, world_size=world, timeout=timedelta(seconds=args.timeout),
                            **({"device_id": device} if nccl else {}))

    def sync() -> None:
        if nccl:
            torch.cuda.synchronize()

    elems = max(1, args.size_mb * 2**20 // 4)
    data = torch.ones(elems, dtype=torch.float32, device=device)
    size = elems * 4
    t_ar = _timed(lambda: dist.all_reduce(data), args.iters, sync)
    shard = torch.ones(max(1, elems // world), dtype=torch.float32, device=device)
    gathered = torch.empty(shard.numel() * world, dtype=torch.float32, device=device)
    if nccl:
        t_ag = _timed(lambda: dist.all_gather_into_tensor(gathered, shard), args.iters, sync)
    else:
        parts = list(gathered.chunk(world))
        t_ag = _timed(lambda: dist.all_gather(parts, shard), args.iters, sync)
    # Each node's own all-reduce: every rank creates every node's group, in the same order.
    node_groups = [dist.new_group(list(range(k * args.nproc, (k + 1) * args.nproc))) for k in range(args.nnodes)]
    intra = 0.0
    if args.nproc > 1:
        t_in = _timed(lambda: dist.all_reduce(data, group=node_groups[args.node_rank]), args.iters, sync)
        intra = bus_bandwidth_gbs("allreduce", size, t_in, args.nproc)
    per_node = [None] * world
    dist.all_gather_object(per_node, (args.node_rank, intra))
    if rank == 0:
        result = {"backend": args.backend, "world_size": world, "nodes": args.nnodes, "size_bytes": size,
                  "allreduce_gbs": round(bus_bandwidth_gbs("allreduce", size, t_ar, world), 3),
                  "allgather_gbs": round(bus_bandwidth_gbs("allgather", gathered.numel() * 4, t_ag, world), 3),
                  "intra_allreduce_gbs": {str(k): round(v, 3) for k, v in sorted(set(per_node))},
                  "device": torch.cuda.get_device_name(device) if nccl else "cpu"}
        print(f"{TAG} {json.dumps(result)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _node_main(args: argparse.Namespace, argv: list[str]) -> int:
    """Start this node's ranks, wait for them within the timeout, pass on rank 0's line."""
    procs = []
    for local_rank in range(args.nproc):
        env = dict(os.environ, RANK=str(args.node_rank * args.nproc + local_rank),
                   WORLD_SIZE=str(args.nnodes * args.nproc), LOCAL_RANK=str(local_rank),
                   MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.master_port), PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "clustertune.worker.bandwidth", "--rank", *argv],
                                      env=env, stdin=subprocess.DEVNULL))
    deadline = time.monotonic() + args.timeout + 30
    code = 0
    for proc in procs:
        try:
            rc = proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rc = 124
        code = code or rc
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code == 124:
        print(f"bandwidth test: no result within {args.timeout + 30} s (a node unreachable on the "
              "data ports, or a peer that never started)", file=sys.stderr, flush=True)
    return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clustertune.worker.bandwidth", description=__doc__.split("\n\n")[0])
    p.add_argument("--nnodes", type=int, required=True)
    p.add_argument("--node-rank", type=int, required=True)
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node")
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    p.add_argument("--size-mb", type=int, default=64, help="all-reduce size in MiB")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--timeout", type=int, default=60, help="seconds for the rendezvous and each collective")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)  # one rank (started by the node)
    return p.parse_args(argv)


def parse_result(stdout: str) -> dict | None:
    """Rank 0's result line, as the doctor reads it from the master node's output."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(TAG + " "):
            return json.loads(line[len(TAG) + 1:])
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return _rank_main(args) if args.rank else _node_main(args, argv)


if __name__ == "__main__":
    sys.exit(main())
