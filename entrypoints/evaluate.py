"""Greedy (T=0) evaluation on the GSM8k test set; logs accuracy, boxed rate, a results table and traces."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import pipeline, tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402


def main(cfg):
    with tracking.stage_run("evaluate", cfg.as_params("evaluate")):
        ws = pipeline.Workspace(cfg, checkpoint=cfg.checkpoint)
        m = pipeline.evaluate_stage(ws, step=0, limit=cfg.limit)
        print(f"test_accuracy={m['test_accuracy']:.1%}  boxed={m['test_boxed_rate']:.1%}  "
              f"on {m['test_problems']} problems, {m['tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    run_entrypoint("evaluate", main)
