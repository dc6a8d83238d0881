"""MLflow glue: store defaults, stage runs, traces and artifacts. mlflow is imported inside functions."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

EXPERIMENT = "grpo-gsm8k"
DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default, so `mlflow ui` opens the same store


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the fix."""


def setup() -> None:
    """Embedded SQLite store unless MLFLOW_TRACKING_URI is set; one experiment with an absolute artifact root
    (SQLite stores otherwise resolve it against whatever the working directory was at creation)."""
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_URI)
    chosen = os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_EXPERIMENT_ID")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    try:
        with _sqlite_init_lock(mlflow.get_tracking_uri()):
            # first use of a store creates its tables: workers starting together must not race on that
            if not chosen and mlflow.get_experiment_by_name(name) is None:
                mlflow.create_experiment(name, artifact_location=Path("mlartifacts").resolve().as_uri())
            elif chosen:
                mlflow.MlflowClient().search_experiments(max_results=1)
        if not chosen:  # else launched by `mlflow run` (or a parent stage): experiment already chosen
            mlflow.set_experiment(name)
    except Exception as e:
        raise TrackingError(f"cannot use MLflow store {mlflow.get_tracking_uri()} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:150]}); set MLFLOW_TRACKING_URI to a writable store") from None


@contextlib.contextmanager
def _sqlite_init_lock(uri: str):
    """An exclusive file lock next to an SQLite store (no-op for other stores)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock_path = Path(uri[len("sqlite:///"):] + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def log_params(params: dict[str, str]) -> None:
    """Log params not yet on the active run (`mlflow run` already logged its own, maybe spelt differently)."""
    import mlflow

    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params
    fresh = {k: v[:6000] for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, str], nested: bool = False, run_name: str | None = None,
              tags: dict | None = None):
    """Start (or, under `mlflow run`, continue) the run of one stage and log its params."""
    import mlflow

    with mlflow.start_run(run_name=run_name or stage, nested=nested, tags={"grpo.stage": stage, **(tags or {})}) as run:
        log_params(params)
        _open_ui_on_runs(run.info.experiment_id)
        with killed_on_interrupt():
            yield run


@contextlib.contextmanager
def killed_on_interrupt():
    """Ctrl-C ends the active run as KILLED (MLflow would say FAILED), so the UI tells interrupted from broken."""
    import mlflow

    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise


def _open_ui_on_runs(experiment_id: str) -> None:
    """Tag the experiment as model training, so the MLflow UI opens on its runs table rather than on the GenAI
    trace overview that a traced experiment otherwise gets."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")


def log_rows(rows: list[dict], artifact_path: str, drop: tuple[str, ...] = ()) -> None:
    """Rows as a JSONL artifact (written to a temp folder first)."""
    import mlflow

    from grpo.stages import write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_path).name
        write_jsonl([{k: v for k, v in r.items() if k not in drop} for r in rows], path)
        mlflow.log_artifact(str(path), str(Path(artifact_path).parent) if "/" in artifact_path else None)


def log_table(rows: list[dict], artifact_file: str, columns: tuple[str, ...]) -> None:
    """A table the MLflow UI renders (Evaluation / artifact view)."""
    import mlflow

    mlflow.log_table({c: [r[c] for r in rows] for c in columns}, artifact_file=artifact_file)


def log_traces(rows: list[dict], stage: str, count: int, step: int = 0) -> None:
    """A few generations as MLflow traces (input prompt, output completion, reward and gold as attributes)."""
    import mlflow

    chosen = rows[:: max(1, len(rows) // count)][:count] if count else []
    for row in chosen:
        with mlflow.start_span(name=f"{stage}-generation", span_type="LLM") as span:
            span.set_inputs({"question": row["question"], "prompt": row["prompt"]})
            span.set_outputs({"completion": row["completion"]})
            span.set_attributes({"reward": row["reward"], "outcome": row["outcome"], "gold": row["gold"],
                                 "truncated": row["truncated"], "completion_tokens": len(row["completion_ids"]),
                                 "iteration": step, "stage": stage})
    if chosen:
        mlflow.flush_trace_async_logging()


def log_metrics(metrics: dict[str, float], step: int, prefix: str = "") -> None:
    import mlflow

    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()}, step=step)
