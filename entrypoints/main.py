"""The GRPO loop: rollout -> annotate -> finetune per iteration, evaluations between, one parent MLflow run.
With MLFLOW_RUN_ID (or `mlflow run . --run-id ID`) it resumes that run with its own parameters."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import tracking  # noqa: E402
from grpo.cli import resume_command, run_entrypoint  # noqa: E402


def main(cfg, hints):
    import mlflow

    import contextlib

    from grpo.artifacts import RunLock
    from grpo.pipeline import run_main
    from grpo.resume import prepare
    from grpo.workspace import check_placement

    cfg, folder, changes = prepare(cfg)
    check_placement(cfg)  # a placement the machine cannot hold is refused before a run is started
    # a resume takes the run's lock before it touches the run, so a second one is refused without side effects
    with RunLock(folder) if folder else contextlib.nullcontext():
        with tracking.stage_run("main", cfg.as_params("main"), system_metrics=cfg.tracking.system_metrics) as run:
            run_id = run.info.run_id
            hints["resume"] = resume_command(run_id)
            result = run_main(cfg, folder, changes)
    numbers = "  ".join(f"{k}={v:.3f}" for k, v in result.items())
    print(f"main run {run_id} finished: {numbers}\n  look: mlflow ui --backend-store-uri "
          f"{tracking.redact(mlflow.get_tracking_uri())}  (experiment of run {run_id})")


if __name__ == "__main__":
    run_entrypoint("main", main)
