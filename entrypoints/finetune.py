"""Train the policy on an annotated set with the GRPO loss, in its own process; checkpoint and log it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import stages, tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402
from grpo.data import DataError  # noqa: E402


def main(cfg):
    from grpo.finetune import Trainer, train_logged
    from grpo.model import pick_device

    if not Path(cfg.annotated).is_file():
        raise DataError(f"annotated set {cfg.annotated or '(empty)'} not found; pass annotated=<annotate output>")
    with tracking.stage_run("finetune", cfg.as_params("finetune"), run_name=f"finetune-{cfg.iteration}"):
        output = Path(cfg.output or "checkpoints/latest")
        trainer = Trainer(cfg, cfg.checkpoint, pick_device(cfg.device))
        summary = train_logged(trainer, cfg, stages.read_jsonl(cfg.annotated), output)
        print(f"checkpoint: {output}  steps={summary['optimizer_steps']}  kl={summary.get('last_kl', 0):.4f}")


if __name__ == "__main__":
    run_entrypoint("finetune", main)
