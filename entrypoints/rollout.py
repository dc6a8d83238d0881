"""Sample `attempts` completions for each of one iteration's train problems; log rollouts and reward rates."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import pipeline, tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402


def main(cfg):
    with tracking.stage_run("rollout", cfg.as_params("rollout"), run_name=f"rollout-{cfg.iteration}"):
        ws = pipeline.Workspace(cfg, checkpoint=cfg.checkpoint)
        out = Path(cfg.output or "rollouts") / f"iter-{cfg.iteration:04d}.jsonl"
        metrics = pipeline.rollout_stage(ws, cfg.iteration, out)
        print(f"rollouts: {out}  reward_mean={metrics['reward_mean']:.3f}  boxed={metrics['boxed_rate']:.1%}  "
              f"{metrics['tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    run_entrypoint("rollout", main)
