"""What the GPUs of this machine move between them through NCCL: all-reduce and broadcast bandwidth by message size
and dtype, as the trainer group (gradient buckets of 128 MB, float32) and the engine ranks (weights, bf16) use it.

    python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/nccl_bandwidth.py [--sizes 16 128 1024]

Prints a table (rank 0): op, dtype, MB, milliseconds, algorithm bandwidth (bytes / time) and bus bandwidth (the
all-reduce's 2 (n-1) / n times that: what each link carries, comparable across rank counts, as nccl-tests reports
it). Set NCCL_DEBUG=INFO to see which transport NCCL picked (P2P over NVLink or PCIe, SHM through host memory)."""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist


def timed(op, repeats: int) -> float:
    """Median seconds of op() over `repeats` runs, each synchronised."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        op()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="+", default=[16, 128, 1024], help="message sizes in MB")
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each (median), after 3 warm-up runs")
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, size = dist.get_rank(), dist.get_world_size()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for mb in args.sizes:
            tensor = torch.ones(int(mb * 2**20) // dtype.itemsize, dtype=dtype, device="cuda")
            for name, op, factor in (("all_reduce", lambda: dist.all_reduce(tensor), 2 * (size - 1) / size),
                                     ("broadcast", lambda: dist.broadcast(tensor, 0), 1.0)):
                for _ in range(3):
                    op()
                seconds = timed(op, args.repeats)
                algbw = tensor.numel() * dtype.itemsize / seconds / 1e9
                rows.append((name, str(dtype).split(".")[-1], mb, seconds * 1e3, algbw, algbw * factor))
    if rank == 0:
        print(f"{size} ranks, {torch.cuda.get_device_name()}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
        print("| op | dtype | MB | ms | algbw GB/s | busbw GB/s |\n|---|---|---|---|---|---|")
        for name, dtype, mb, ms, algbw, busbw in rows:
            print(f"| {name} | {dtype} | {mb:g} | {ms:.2f} | {algbw:.0f} | {busbw:.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
