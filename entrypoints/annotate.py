"""Reference-model logprobs and group-normalised advantages for a rollouts file."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by `mlflow run`

from grpo import pipeline, stages, tracking  # noqa: E402
from grpo.cli import run_entrypoint  # noqa: E402
from grpo.data import DataError  # noqa: E402


def rollouts_path(source: str) -> Path:
    """A local JSONL path, or an MLflow artifact URI (runs:/<run_id>/rollouts/iter-0000.jsonl)."""
    if not source:
        raise DataError("pass rollouts=<path or runs:/ URI> (the output of the rollout entry point)")
    if "://" in source or source.startswith("runs:/"):
        import mlflow

        return Path(mlflow.artifacts.download_artifacts(source))
    if not Path(source).is_file():
        raise DataError(f"rollouts file {source} not found")
    return Path(source)


def main(cfg):
    with tracking.stage_run("annotate", cfg.as_params("annotate"), run_name=f"annotate-{cfg.iteration}"):
        rows = stages.read_jsonl(rollouts_path(cfg.rollouts))
        out = Path(cfg.output or "annotated") / f"iter-{cfg.iteration:04d}.jsonl"
        m = pipeline.annotate_stage(pipeline.Workspace(cfg), rows, cfg.iteration, out)
        print(f"annotated: {out}  groups with signal {m['signal_fraction']:.0%}")


if __name__ == "__main__":
    run_entrypoint("annotate", main)
