"""Train the policy on an annotated set with the GRPO loss, in its own process; checkpoint and log it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import stages, tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402
from grpo.data import DataError  # noqa: E402


def main(cfg):
    import mlflow

    from grpo.finetune import finetune
    from grpo.model import pick_device

    if not Path(cfg.annotated).is_file():
        raise DataError(f"annotated set {cfg.annotated or '(empty)'} not found; pass annotated=<annotate output>")
    with tracking.stage_run("finetune", cfg.as_params("finetune"), run_name=f"finetune-{cfg.iteration}"):
        output = Path(cfg.output or "checkpoints/latest")
        log_step = lambda metrics, step: tracking.log_metrics(metrics, step=step, prefix="step_")  # noqa: E731
        summary = finetune(cfg, stages.read_jsonl(cfg.annotated), cfg.checkpoint, output, pick_device(cfg.device),
                           on_step=log_step)
        tracking.log_metrics(summary, step=cfg.iteration)
        mlflow.set_tag("grpo.checkpoint", str(output.resolve()))
        if cfg.log_checkpoint:
            mlflow.log_artifacts(str(output), "checkpoint")
        print(f"checkpoint: {output}  steps={summary['optimizer_steps']}  kl={summary.get('last_kl', 0):.4f}")


if __name__ == "__main__":
    run_entrypoint("finetune", main)
