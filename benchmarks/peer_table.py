"""Side-by-side table of our main run and TRL's GRPOTrainer from the same card: learning and speed as ratios.

    python benchmarks/peer_table.py OURS_DIR TRL_DIR [CURVE.png]

OURS_DIR: export_run.py output (metrics.csv, run_info.json). TRL_DIR: trl_peer.py output (trl_log.jsonl,
trl_summary.json). "Time to reward R": wall-clock from the start of training until the train reward (mean over
one iteration's rollouts for ours, a 3-step moving mean for TRL) first reaches R, where R is TRL's final value.
Our clock starts with the main run (initial evaluation, engine build and trainer start included); TRL's with
`trainer.train()` (model load and final evaluation excluded)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from export_run import read_metrics  # this folder is on sys.path when the script runs


def ours(folder: Path) -> dict:
    series = read_metrics(folder)  # metric -> step -> (value, time ms)
    start = json.loads((folder / "run_info.json").read_text())["start_time_ms"]
    seconds = lambda key: [(t - start) / 1000 for _, (_, t) in sorted(series.get(key, {}).items())]  # noqa: E731
    values = lambda key: [v for _, (v, _) in sorted(series.get(key, {}).items())]  # noqa: E731
    mean = lambda key: sum(values(key)) / max(len(values(key)), 1)  # noqa: E731
    wall = (max(t for s in series.values() for _, t in s.values()) - start) / 1000
    peaks = values("rollout_peak_gpu_gib") + values("trainer_peak_gpu_gib")
    return {"reward": list(zip(seconds("train_reward_mean"), values("train_reward_mean"))),
            "boxed": list(zip(seconds("train_boxed_rate"), values("train_boxed_rate"))),
            "iterations": len(values("train_reward_mean")), "seconds": wall,
            "test_accuracy": (values("test_accuracy")[0], values("test_accuracy")[-1]),
            "test_boxed_rate": (values("test_boxed_rate")[0], values("test_boxed_rate")[-1]),
            "sample_tokens_per_s": mean("rollout_tokens_per_s"), "train_tokens_per_s": mean("train_tokens_per_s"),
            "end_to_end_tokens_per_s": sum(values("rollout_tokens")) / wall,
            "peak_gpu_gib": max(peaks or [float("nan")]),
            "time_split": {k[5:]: sum(values(k)) for k in series if k.startswith("time_")}}


def trl(folder: Path) -> dict:
    log = [json.loads(line) for line in (folder / "trl_log.jsonl").open()]
    summary_file = folder / "trl_summary.json"
    # a run that died in training wrote no summary: its log still times the learning, with no test result
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {
        "train_seconds": log[-1]["seconds"], "peak_gpu_gib": float("nan"), "gpu": "unknown (the run died)",
        "test": {"test_accuracy": float("nan"), "test_boxed_rate": float("nan")}, "died": True}
    window = lambda k: [r["reward_mean"] for r in log[max(0, k - 2):k + 1]]  # noqa: E731
    smooth = [(log[k]["seconds"], sum(window(k)) / len(window(k))) for k in range(len(log))]
    tokens = sum(r["completion_tokens_mean"] * r["samples"] for r in log)
    return {"reward": smooth, "boxed": [(r["seconds"], r["boxed_rate"]) for r in log], "steps": len(log),
            "seconds": summary["train_seconds"],
            "test_accuracy": summary["test"]["test_accuracy"], "test_boxed_rate": summary["test"]["test_boxed_rate"],
            "end_to_end_tokens_per_s": tokens / summary["train_seconds"], "peak_gpu_gib": summary["peak_gpu_gib"],
            "gpu": summary["gpu"], "final_boxed": log[-1]["boxed_rate"], "died": summary.get("died", False),
            "seed": summary.get("args", {}).get("seed", "?")}


def first_reaching(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, v in curve if v >= target), None)


def plot(a: dict, b: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, title in zip(axes, ("reward", "boxed"), ("train reward", "train boxed rate")):
        for run, label in ((a, "ours"), (b, "TRL GRPOTrainer")):
            axis.plot(*zip(*run[key]), marker=".", label=label)
        axis.set_xlabel("seconds since start")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(f"same card ({b['gpu']}), model, prompt, attempts, temperature, learning rate, completion length")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(ours_dir: str, trl_dir: str, curve: str | None = None) -> None:
    a, b = ours(Path(ours_dir)), trl(Path(trl_dir))
    target = b["reward"][-1][1]
    ta, tb = first_reaching(a["reward"], target), first_reaching(b["reward"], target)
    fmt = lambda t: "not reached" if t is None else f"{t:.0f} s"  # noqa: E731
    ratio = f"{ta / tb:.2f}x" if ta is not None and tb else "-"
    print(f"card: {b['gpu']}; target train reward {target:+.3f} (TRL's final 3-step mean)\n")
    print("| | ours | TRL GRPOTrainer | ours / TRL |")
    print("|---|---|---|---|")
    print(f"| time to train reward {target:+.2f} | {fmt(ta)} | {fmt(tb)} | **{ratio}** |")
    died = " (died in training: no test result)" if b["died"] else ""
    print(f"| wall-clock of the run | {a['seconds']:.0f} s ({a['iterations']} iterations) | "
          f"{b['seconds']:.0f} s ({b['steps']} steps){died} | |")
    print(f"| test boxed rate, start -> end | {a['test_boxed_rate'][0]:.1%} -> {a['test_boxed_rate'][1]:.1%} | "
          f"-> {b['test_boxed_rate']:.1%} | |")
    print(f"| test accuracy, start -> end | {a['test_accuracy'][0]:.1%} -> {a['test_accuracy'][1]:.1%} | "
          f"-> {b['test_accuracy']:.1%} | |")
    speed = a["end_to_end_tokens_per_s"] / b["end_to_end_tokens_per_s"]
    print(f"| sampled tokens / wall-clock | {a['end_to_end_tokens_per_s']:,.0f} | "
          f"{b['end_to_end_tokens_per_s']:,.0f} | **{speed:.1f}x** |")
    print(f"| rollout engine tokens/s | {a['sample_tokens_per_s']:,.0f} | - | |")
    print(f"| trainer tokens/s | {a['train_tokens_per_s']:,.0f} | - | |")
    print(f"| peak GPU GiB (per process) | {a['peak_gpu_gib']:.1f} | {b['peak_gpu_gib']:.1f} | |")
    print("\nour time by stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(a["time_split"].items())))
    if curve:
        plot(a, b, curve)


if __name__ == "__main__":
    main(*sys.argv[1:4])
