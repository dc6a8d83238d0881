"""Sample `attempts` completions for each of one iteration's train problems; log rollouts and reward rates."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402


def main(cfg, hints):
    from grpo.artifacts import claim_output
    from grpo.pipeline import logged_rollout
    from grpo.workspace import Workspace

    i = cfg.io.iteration
    with tracking.stage_run("rollout", cfg.as_params("rollout"), run_name=f"rollout-{i}"):
        out = claim_output(Path(cfg.io.output or "rollouts"), cfg.io.overwrite) / f"iter-{i:04d}.jsonl"
        _, m = logged_rollout(Workspace(cfg, checkpoint=cfg.io.checkpoint), i, out)
        print(f"rollouts: {out}  reward_mean={m['reward_mean']:.3f}  boxed={m['boxed_rate']:.1%}  "
              f"{m['tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    run_entrypoint("rollout", main)
