"""Seconds under a function, by the functions it calls, from a py-spy raw profile (`py-spy record --format raw
--subprocesses --threads --idle --rate R`): where one process's thread spent its time, blocked or not, as an
indented tree (frames merged across line numbers).

    python benchmarks/stack_tree.py PROFILE.gz --process 'process 939' --root 'RankWork.generate (grpo/group.py'"""
from __future__ import annotations

import argparse
import gzip
import re
from collections import defaultdict


def tree(path: str, process: str, root: str, thread: str, depth: int) -> tuple[float, dict]:
    """(samples under `root`, {frame path below root: samples}) of the stacks of `process`'s `thread`."""
    opener = gzip.open if path.endswith(".gz") else open
    below, total = defaultdict(int), 0
    with opener(path, "rt") as handle:
        for line in handle:
            stack, count = line.rsplit(" ", 1)
            frames = stack.split(";")
            processes = [f for f in frames if f.startswith("process ")]
            threads = [f for f in frames if f.startswith("thread ")]
            if not processes or process not in processes[-1] or not threads or thread not in threads[0]:
                continue
            at = next((k for k, f in enumerate(frames) if root in f), None)
            if at is None:
                continue
            total += int(count)
            path_below = tuple(re.sub(r":\d+\)$", ")", f) for f in frames[at + 1:at + 1 + depth])
            for d in range(1, len(path_below) + 1):
                below[path_below[:d]] += int(count)
    return total, below


def show(below: dict, rate: float, least: float, prefix: tuple = (), indent: int = 1) -> None:
    children = sorted(((n, k) for k, n in below.items() if len(k) == len(prefix) + 1 and k[:len(prefix)] == prefix),
                      reverse=True)
    for samples, key in children:
        if samples / rate >= least:
            print(f"{'  ' * indent}{samples / rate:7.2f} s  {key[-1][:140]}")
            show(below, rate, least, key, indent + 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", help="py-spy's raw output (gzipped or not)")
    p.add_argument("--process", required=True, help="text of the process frame, e.g. 'process 939' or 'main.py'")
    p.add_argument("--root", required=True, help="text of the frame to break down, e.g. 'Trainer.train ('")
    p.add_argument("--thread", default="MainThread", help="text of the thread frame (py-spy --threads)")
    p.add_argument("--depth", type=int, default=3, help="levels of callees to show")
    p.add_argument("--rate", type=float, default=40, help="py-spy's --rate: samples per second")
    p.add_argument("--least", type=float, default=0.1, help="hide callees under this many seconds")
    args = p.parse_args(argv)
    total, below = tree(args.profile, args.process, args.root, args.thread, args.depth)
    print(f"{total / args.rate:.2f} s under {args.root}")
    show(below, args.rate, args.least)


if __name__ == "__main__":
    main()
