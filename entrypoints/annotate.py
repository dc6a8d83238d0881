"""Reference-model logprobs and group-normalised advantages for a rollouts file. The model and temperature are
the ones the rollouts record; an explicit model that differs is refused."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402


def rollouts_path(source: str) -> Path:
    """A local JSONL path, or an MLflow artifact URI (runs:/<run_id>/rollouts/iter-0000.jsonl)."""
    from grpo.errors import DataError

    if not source:
        raise DataError("pass rollouts=<path or runs:/ URI> (the output of the rollout entry point)")
    if "://" in source or source.startswith("runs:/"):
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(source))
    if not Path(source).is_file():
        raise DataError(f"rollouts file {source} not found")
    return Path(source)


def main(cfg, hints):
    from grpo.artifacts import claim_output, read_jsonl
    from grpo.pipeline import logged_annotate
    from grpo.stages import recorded, rows_model
    from grpo.workspace import Workspace

    rows = read_jsonl(rollouts_path(cfg.io.rollouts))
    cfg = cfg.replace(model=rows_model(cfg, rows))
    i = recorded(rows, "iteration")
    with tracking.stage_run("annotate", cfg.as_params("annotate") | {"iteration": str(i)},
                            run_name=f"annotate-{i}"):
        out = claim_output(Path(cfg.io.output or "annotated"), cfg.io.overwrite) / f"iter-{i:04d}.jsonl"
        m = logged_annotate(Workspace(cfg), rows, i, out)
        print(f"annotated: {out}  groups with signal {m['signal_fraction']:.0%}")


if __name__ == "__main__":
    run_entrypoint("annotate", main)
