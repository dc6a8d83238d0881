"""Optuna sweep over temperature, attempts and learning rate; one nested MLflow run per trial, tuned on the
held-out validation split."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo.cli import run_entrypoint  # noqa: E402


def main(cfg, hints):
    from grpo.sweep import run_sweep

    run_sweep(cfg)


if __name__ == "__main__":
    run_entrypoint("sweep", main)
