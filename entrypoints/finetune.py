"""Train the policy on an annotated set with the GRPO loss; write a checkpoint and log it. Temperature, token
limit, iteration and model come from the annotated rows (what rollout used)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402


def main(cfg, hints):
    import mlflow

    from grpo.artifacts import check_replaceable, read_jsonl
    from grpo.batches import plan_steps
    from grpo.pipeline import logged_finetune
    from grpo.stages import recorded, rows_model
    from grpo.trainer import Trainer, trainable
    from grpo.workspace import place

    rows = read_jsonl(Path(cfg.io.annotated)) if cfg.io.annotated else []
    if not rows:
        from grpo.errors import DataError

        raise DataError(f"annotated set {cfg.io.annotated or '(empty)'} has no rows; pass annotated=<annotate output>")
    cfg = cfg.replace(model=rows_model(cfg, rows))
    i = recorded(rows, "iteration")
    output = check_replaceable(Path(cfg.io.output or "checkpoints/latest"), cfg.io.overwrite)
    with tracking.stage_run("finetune", cfg.as_params("finetune") | {"iteration": str(i)}, run_name=f"finetune-{i}"):
        trainer = Trainer(cfg.policy.model, cfg.optim, place(cfg.policy, cfg.engine).trainer, cfg.io.checkpoint)
        steps = len(plan_steps(trainable(rows), cfg.optim, cfg.loop.seed, i))
        summary = logged_finetune(trainer.train(rows, i, cfg.loop.seed, steps), i, total=steps)
        trainer.save(output, background=False)
        tracking.log_metrics(summary, step=i)
        mlflow.set_tag("grpo.checkpoint", str(output.resolve()))
        mlflow.log_artifacts(str(output), "checkpoint")
        kl = f"{summary['last_kl']:.4f}" if "last_kl" in summary else "- (no reference logprobs)"
        print(f"checkpoint: {output}  steps={summary['optimizer_steps']}  kl={kl}")


if __name__ == "__main__":
    run_entrypoint("finetune", main)
