"""The GRPO loop: rollout -> annotate -> finetune per iteration, evaluations between, one parent MLflow run."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402


def main(cfg):
    from grpo.pipeline import run_main

    with tracking.stage_run("main", cfg.as_params("main")) as run:
        result = run_main(cfg)
        print(f"main run {run.info.run_id}: " + "  ".join(f"{k}={v:.3f}" for k, v in result.items()))


if __name__ == "__main__":
    run_entrypoint("main", main)
