"""Greedy (T=0) evaluation on the GSM8k test (or validation) split; logs accuracy, boxed rate, a results table
and traces."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402


def main(cfg, hints):
    from grpo.pipeline import logged_evaluate
    from grpo.workspace import Workspace

    split = "val" if cfg.io.split == "validation" else "test"
    with tracking.stage_run("evaluate", cfg.as_params("evaluate")):
        ws = Workspace(cfg, checkpoint=cfg.io.checkpoint)
        m = logged_evaluate(ws, 0, {split: cfg.io.limit or len(ws.splits.split(cfg.io.split))})
        print(f"{split}_accuracy={m[f'{split}_accuracy']:.1%}  boxed={m[f'{split}_boxed_rate']:.1%}  "
              f"on {m[f'{split}_problems']} problems, {m[f'{split}_tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    run_entrypoint("evaluate", main)
