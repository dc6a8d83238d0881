"""Exported main runs side by side: metrics against iteration (samples) and against wall-clock, one figure, and a
table of iterations, median stage times and the last value of each metric. Made for settings that change the speed
as well as the learning (max_lag 0 against 1): per iteration says what a sample is worth, per second what it costs.

    python benchmarks/compare_runs.py CURVES.png lag0=DIR lag1=DIR [--metrics train_reward_mean,test_boxed_rate]
    python benchmarks/compare_runs.py CURVES.png "lag 0:1=DIR" "lag 0:2=DIR" "lag 1:1=DIR" ... --at 20,30,60

Each DIR is what `export_run.py` wrote for one main run (metrics.csv, run_info.json); the clock starts with the run.
Runs named SETTING:SEED share a colour per setting (a line style per seed), and --at prints each setting's mean over
its seeds of every metric at those iterations (seeds that did not reach one are left out of its mean)."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from export_run import read_metrics  # this folder is on sys.path when the script runs

STAGES = ("time_rollout", "time_annotate", "time_finetune")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("figure", help="PNG to write")
    p.add_argument("runs", nargs="+", help="NAME=DIR, once per run")
    p.add_argument("--metrics", default="train_reward_mean,train_boxed_rate,test_boxed_rate,test_accuracy",
                   help="comma-separated metrics, a row of the figure each")
    p.add_argument("--at", default="", help="comma-separated iterations: each setting's mean over seeds there")
    args = p.parse_args(argv)
    if any("=" not in r for r in args.runs):
        sys.exit("each run is NAME=DIR, e.g. lag0=docs/h100x2_lag/reference-s1")
    metrics = args.metrics.split(",")
    runs = {}
    for name, folder in (r.split("=", 1) for r in args.runs):
        start = json.loads((Path(folder) / "run_info.json").read_text())["start_time_ms"]
        runs[name] = {k: sorted((step, value, (t - start) / 1000) for step, (value, t) in series.items())
                      for k, series in read_metrics(Path(folder)).items()}
    missing = [f"{name}: {m}" for name, run in runs.items() for m in metrics if m not in run]
    if missing:
        sys.exit(f"not logged: {', '.join(missing)}; pick --metrics among the runs' metrics.csv names")

    print("| run | iterations | median s / iteration (rollout / annotate / finetune) | "
          + " | ".join(f"last {m}" for m in metrics) + " |")
    print("|---" * (3 + len(metrics)) + "|")
    for name, run in runs.items():
        rewards = run["train_reward_mean"]
        steps = [seconds for _, _, seconds in rewards]
        per_iteration = statistics.median(b - a for a, b in zip(steps, steps[1:])) if len(steps) > 1 else float("nan")
        stages = " / ".join(f"{statistics.median(v for _, v, _ in run[s]):.2f}" for s in STAGES if s in run)
        print(f"| {name} | {len(rewards)} | {per_iteration:.2f} ({stages}) | "
              + " | ".join(f"{run[m][-1][1]:.3f}" for m in metrics) + " |")

    if args.at:
        means_at(runs, metrics, [int(i) for i in args.at.split(",")])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from grpo.plots import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(len(metrics), 2, figsize=(10, 2.6 * len(metrics)), squeeze=False, sharey="row")
    settings = list(dict.fromkeys(setting(name) for name in runs))
    styles = {}
    for name in runs:
        seeds_before = sum(setting(n) == setting(name) for n in styles)
        styles[name] = {"color": f"C{settings.index(setting(name))}",
                        "linestyle": ("-", "--", ":", "-.")[seeds_before % 4]}
    for row, metric in zip(axes, metrics):
        for name, run in runs.items():
            steps, values, seconds = zip(*run[metric])
            row[0].plot(steps, values, marker=".", markersize=3, label=name, **styles[name])
            row[1].plot(seconds, values, marker=".", markersize=3, label=name, **styles[name])
        row[0].set_ylabel(metric)
        for ax in row:
            ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("iteration (the same samples per iteration)")
    axes[-1][1].set_xlabel("wall-clock seconds since the run started")
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(args.figure, dpi=90)
    print(f"curves: {args.figure}")


def setting(name: str) -> str:
    return name.rsplit(":", 1)[0]


def means_at(runs: dict, metrics: list[str], iterations: list[int]) -> None:
    """A markdown table: per setting and iteration, the mean over its seeds of each metric logged at that step
    (with how many seeds reached it)."""
    print("\n| setting | iteration | seeds there | " + " | ".join(f"mean {m}" for m in metrics) + " |")
    print("|---" * (3 + len(metrics)) + "|")
    for name in dict.fromkeys(setting(n) for n in runs):
        seeds = [run for n, run in runs.items() if setting(n) == name]
        for i in iterations:
            cells, reached = [], 0
            for m in metrics:
                values = [v for run in seeds for step, v, _ in run[m] if step == i]
                reached = max(reached, len(values))
                cells.append(f"{statistics.mean(values):.3f}" if values else "-")
            print(f"| {name} | {i} | {reached} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
