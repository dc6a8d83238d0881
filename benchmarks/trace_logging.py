"""What logging a stage's sampled generations as MLflow traces costs the stage, with a flush after each stage (as
before) and without (MLflow writes them in the background; the run flushes once at its end), side by side on one
SQLite store.

    python benchmarks/trace_logging.py [--stages 10] [--traces 4]

Prints a table: seconds per stage for each way, and the seconds the final flush took."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rows(n: int) -> list[dict]:
    return [{"question": f"What is {k} plus 1?", "prompt": f"<user>What is {k} plus 1?",
             "completion": f"\\boxed{{{k}}}", "reward": 0.0, "completion_ids": [1] * 200, "truncated": False,
             "problem_id": k, "gold": str(k + 1), "outcome": "wrong"} for k in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=10, help="stages timed each way")
    p.add_argument("--traces", type=int, default=4, help="traces per stage (trace_samples)")
    args = p.parse_args()
    import mlflow

    from grpo import tracking

    mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    mlflow.set_experiment("traces")
    sample, seconds = rows(64), {}
    for way in ("flush after each stage", "flush at the end"):
        started = time.perf_counter()
        for stage in range(args.stages):
            with mlflow.start_run(run_name=f"{way}-{stage}"):
                tracking.log_traces(sample, "rollout", args.traces, step=stage)
                if way == "flush after each stage":
                    tracking.flush_traces()
        seconds[way] = (time.perf_counter() - started) / args.stages
        started = time.perf_counter()
        tracking.flush_traces()
        seconds[f"{way}: final flush"] = time.perf_counter() - started
    print(f"| {args.stages} stages of {args.traces} traces, SQLite | seconds |\n|---|---|")
    for name, value in seconds.items():
        print(f"| {name}{'' if 'final' in name else ', per stage'} | {value:.3f} |")


if __name__ == "__main__":
    main()
