"""Several seeds of several settings, side by side: mean and spread of the final test accuracy and boxed rate, and
every seed's test accuracy against wall-clock in one figure (a line per seed, one colour per setting).

    python benchmarks/seeds.py CURVES.png reference=DIR,DIR,DIR best=DIR,DIR,DIR

Each DIR is what `export_run.py` wrote for one main run (metrics.csv, run_info.json), or what `trl_peer.py` wrote
for one TRL run (trl_log.jsonl, trl_summary.json: one test evaluation, at the end). The clock starts with the
main run, and for TRL with `trainer.train()`. Prints a markdown table; a setting's spread is its sample standard
deviation and its min..max; a run that did not finish counts with its last evaluation."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from export_run import read_metrics  # this folder is on sys.path when the script runs
from peer_table import trl


def trl_result(folder: Path) -> dict:
    run = trl(folder)
    if run["died"]:  # no test result to put in a table
        sys.exit(f"{folder}: no trl_summary.json (the TRL run died after {run['steps']} steps)")
    return {"seed": run["seed"], "status": "FINISHED", "test_accuracy": run["test_accuracy"],
            "test_boxed_rate": run["test_boxed_rate"], "iterations": run["steps"],
            "curve": [(run["seconds"], run["test_accuracy"])]}


def seed_result(folder: Path) -> dict:
    if (folder / "trl_log.jsonl").is_file():
        return trl_result(folder)
    series = read_metrics(folder)
    info = json.loads((folder / "run_info.json").read_text())
    start = info["start_time_ms"]
    curve = [((t - start) / 1000, v) for _, (v, t) in sorted(series["test_accuracy"].items())]
    final = lambda key: series[key][max(series[key])][0]  # noqa: E731
    return {"seed": info["params"].get("seed", "?"), "status": info["status"], "test_accuracy": final("test_accuracy"),
            "test_boxed_rate": final("test_boxed_rate"), "iterations": len(series.get("train_reward_mean", {})),
            "curve": curve}


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1%} ± {sd:.1%} ({min(values):.1%}..{max(values):.1%})"


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        sys.exit(__doc__)
    settings = {name: [seed_result(Path(d)) for d in dirs.split(",")]
                for name, dirs in (a.split("=", 1) for a in argv[1:])}
    print("| setting | seeds | test accuracy at the end, mean ± sd (min..max) | test boxed rate | best test accuracy "
          "| iterations | runs not FINISHED |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in settings.items():
        unfinished = ", ".join(f"seed {r['seed']}: {r['status']}" for r in runs if r["status"] != "FINISHED")
        print(f"| {name} | {', '.join(str(r['seed']) for r in runs)} | {spread([r['test_accuracy'] for r in runs])} "
              f"| {spread([r['test_boxed_rate'] for r in runs])} | "
              f"{spread([max(v for _, v in r['curve']) for r in runs])} | "
              f"{statistics.mean(r['iterations'] for r in runs):.0f} | {unfinished or '-'} |")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from grpo.plots import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    for colour, (name, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], settings.items()):
        for k, run in enumerate(runs):
            seconds, accuracy = zip(*run["curve"])
            alone = len(seconds) == 1  # a TRL run: one evaluation, at the end; drawn big enough to see
            axes.plot(seconds, accuracy, marker="s" if alone else "o", markersize=9 if alone else 6, color=colour,
                      alpha=0.7, label=(f"{name} (end only)" if alone else name) if k == 0 else None)
    axes.set_xlabel("wall-clock seconds since the run started")
    axes.set_ylabel("test accuracy (greedy)")
    axes.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:.1%}"))
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(argv[0], dpi=100)
    print(f"curves: {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
