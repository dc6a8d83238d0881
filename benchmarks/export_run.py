"""Export the newest main run of a store: every parent metric as CSV, the run's times
and parameters (run_info.json), and its learning curve.

    python benchmarks/export_run.py OUT_DIR        # reads MLFLOW_TRACKING_URI (default sqlite:///mlflow.db)
    python benchmarks/export_run.py --replot DIR   # redraw DIR/learning_curve.png from DIR/metrics.csv"""
import csv
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(out: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    client = mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [r for r in client.search_runs(experiments, order_by=["attributes.start_time DESC"])
            if r.data.tags.get("grpo.stage") == "main"]
    if not runs:
        sys.exit("no main run in this store")
    run, out_dir = runs[0], Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "step", "value", "timestamp_ms"])
        for key in sorted(run.data.metrics):
            for m in client.get_metric_history(run.info.run_id, key):
                writer.writerow([key, m.step, m.value, m.timestamp])
    info = {"run_id": run.info.run_id, "status": run.info.status, "start_time_ms": run.info.start_time,
            "end_time_ms": run.info.end_time, "params": run.data.params, "tags": {k: v for k, v in run.data.tags.items()
                                                                                  if k.startswith("grpo.")}}
    (out_dir / "run_info.json").write_text(json.dumps(info, indent=1))
    try:
        client.download_artifacts(run.info.run_id, "learning_curve.png", str(out_dir))
    except Exception as e:  # a run killed before its first evaluation has no plot yet
        print(f"no learning curve: {e}", file=sys.stderr)
    print(f"exported run {run.info.run_id} ({run.info.status}) to {out_dir}")


def read_metrics(folder: Path) -> dict[str, dict[int, tuple[float, int]]]:
    """metrics.csv written by `main` above: metric -> step -> (value, timestamp in ms)."""
    series: dict[str, dict[int, tuple[float, int]]] = {}
    with (Path(folder) / "metrics.csv").open() as handle:
        for row in csv.DictReader(handle):
            series.setdefault(row["metric"], {})[int(row["step"])] = (float(row["value"]), int(row["timestamp_ms"]))
    return series


def replot(folder: str) -> None:
    from grpo.plots import learning_curve

    series = read_metrics(Path(folder))
    history = lambda key: [(step, v) for step, (v, _) in sorted(series.get(key, {}).items())]  # noqa: E731
    learning_curve(history).savefig(Path(folder) / "learning_curve.png", dpi=100)


if __name__ == "__main__":
    replot(sys.argv[2]) if sys.argv[1] == "--replot" else main(sys.argv[1])
