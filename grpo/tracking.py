"""MLflow glue: the store (checked once, fast, before any work), stage runs, traces, rows and tables.
mlflow is imported inside functions; nothing here knows about stages or training."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from grpo.errors import TrackingError

EXPERIMENT = "grpo-gsm8k"
DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default, so `mlflow ui` opens the same store
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@\s]+)@")
_SECRET_PARAMS = re.compile(r"(?i)\b(password|passwd|pwd|token|secret)=([^&\s]+)")


def redact(text: str) -> str:
    """Hide credentials in URIs and query strings: postgresql://user:***@host/db."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _SECRET_PARAMS.sub(lambda m: f"{m[1]}=***", text)


def store_timeout() -> float:
    return float(os.environ.get("GRPO_STORE_TIMEOUT", "10"))


def check_store(uri: str) -> None:
    """Fail in seconds, in one line naming the fix, when the tracking store cannot be reached or written."""
    timeout = store_timeout()
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"cannot reach the MLflow server at {redact(uri)} ({reason}); start it "
                                "(mlflow server ...) or point MLFLOW_TRACKING_URI at a reachable store") from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        folder = path.parent if path.parent != Path("") else Path(".")
        writable = os.access(path, os.W_OK) if path.exists() else folder.is_dir() and os.access(folder, os.W_OK)
        if not writable:
            raise TrackingError(f"cannot write the MLflow store {uri} (read-only, or its folder is missing); "
                                "set MLFLOW_TRACKING_URI to a writable store")
    elif re.match(r"^(postgresql|mysql|mssql)(\+\w+)?://", uri):
        _check_database(uri, timeout)
    elif uri.startswith("file:") or "://" not in uri:
        folder = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
        if not os.access(existing, os.W_OK):
            raise TrackingError(f"cannot write the MLflow store {uri}; set MLFLOW_TRACKING_URI to a writable store")


def _check_database(uri: str, timeout: float) -> None:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": max(1, int(timeout))})
    except (ImportError, ModuleNotFoundError) as e:
        raise TrackingError(f"the database driver for {redact(uri)} is not installed ({e.name or e}); run: "
                            "pip install -e '.[postgres]'") from None
    try:
        with engine.connect():
            pass
    except Exception as e:  # refused, timed out, bad password, no such database
        first = redact(str(getattr(e, "orig", e)).strip().splitlines()[0][:160])
        raise TrackingError(f"cannot connect to the MLflow store {redact(uri)} ({first}); start the database or "
                            "fix MLFLOW_TRACKING_URI") from None
    finally:
        engine.dispose()


def setup() -> None:
    """Embedded SQLite store unless MLFLOW_TRACKING_URI is set; checked before any work; one experiment with an
    absolute artifact root (SQLite stores otherwise resolve it against whatever the working directory was)."""
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_URI)
    uri = mlflow.get_tracking_uri()
    check_store(uri)
    chosen = os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_EXPERIMENT_ID")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    try:
        with _sqlite_init_lock(uri):
            # first use of a store creates its tables: workers starting together must not race on that
            if not chosen and mlflow.get_experiment_by_name(name) is None:
                mlflow.create_experiment(name, artifact_location=Path("mlartifacts").resolve().as_uri())
            elif chosen:
                mlflow.MlflowClient().search_experiments(max_results=1)
        if not chosen:  # else launched by `mlflow run` (or resumed): the experiment is the run's
            mlflow.set_experiment(name)
    except Exception as e:
        raise TrackingError(f"cannot use MLflow store {redact(uri)} ({type(e).__name__}: "
                            f"{redact(str(e).splitlines()[0][:150])}); set MLFLOW_TRACKING_URI to a writable "
                            "store") from None
    end_runs_condaless_mlflow_run_left(name)


CONDALESS_NOTE = "mlflow run found no conda and never started the project; use: mlflow run . --env-manager local"


def end_runs_condaless_mlflow_run_left(experiment_name: str) -> None:
    """Plain `mlflow run .` on a machine without conda creates its run, then stops with MLflow's own error and
    leaves the run RUNNING for ever. Such runs of this user (conda runs the project never started) are marked
    FAILED, with a tag and a line saying the fix; with conda on this machine they may be setting up: left alone."""
    import getpass
    import shutil

    import mlflow

    if shutil.which("conda") or os.environ.get("MLFLOW_CONDA_HOME"):
        return
    client = mlflow.MlflowClient()
    named = mlflow.get_experiment_by_name(experiment_name)
    experiments = sorted({"0", *([named.experiment_id] if named else [])})
    left = [r for r in client.search_runs(experiments, "attributes.status = 'RUNNING' and "
                                                       "tags.`mlflow.project.env` = 'conda'")
            if "grpo.stage" not in r.data.tags and r.data.tags.get("mlflow.user") == getpass.getuser()
            and r.info.run_id != os.environ.get("MLFLOW_RUN_ID")]
    for run in left:
        client.set_tag(run.info.run_id, "grpo.note", CONDALESS_NOTE)
        client.set_terminated(run.info.run_id, "FAILED")
    if left:
        from grpo.console import say

        say(f"grpo: marked {len(left)} run(s) FAILED that `mlflow run` left RUNNING without conda; "
            "start the project with: mlflow run . --env-manager local")


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


def log_params(params: dict[str, str], run_id: str | None = None) -> None:
    """Log params not yet on the run (`mlflow run` already logged its own), credentials redacted."""
    import mlflow

    client = mlflow.MlflowClient()
    run_id = run_id or mlflow.active_run().info.run_id
    existing = client.get_run(run_id).data.params
    fresh = {k: redact(v)[:6000] for k, v in params.items() if k not in existing}
    if fresh:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, v) for k, v in fresh.items()])


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, str], run_name: str | None = None, tags: dict | None = None,
              system_metrics: bool = False):
    """Start (or, under `mlflow run`, continue) the run of one entry point and log its params; system_metrics:
    MLflow samples CPU, memory and (with nvidia-ml-py) GPU use into it."""
    import mlflow

    with mlflow.start_run(run_name=run_name or stage, tags={"grpo.stage": stage, **(tags or {})},
                          log_system_metrics=system_metrics or None) as run:
        log_params(params)
        open_ui_on_runs(run.info.experiment_id)
        with killed_on_interrupt():
            yield run


@contextlib.contextmanager
def killed_on_interrupt():
    """Ctrl-C ends the active run as KILLED (MLflow would say FAILED), so the UI tells interrupted from broken."""
    import mlflow

    try:
        yield
    except KeyboardInterrupt:
        if mlflow.active_run():
            mlflow.end_run("KILLED")
        raise


def open_ui_on_runs(experiment_id: str) -> None:
    """Tag the experiment as model training, so the MLflow UI opens on its runs table rather than on the GenAI
    trace overview that a traced experiment otherwise gets."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")


def log_file(path: Path, artifact_folder: str) -> None:
    """A file (rows already written as JSONL) as an artifact of the active run."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_folder)


def log_table(rows: list[dict], artifact_file: str, columns: tuple[str, ...]) -> None:
    """A table the MLflow UI renders (artifact view)."""
    import mlflow

    mlflow.log_table({c: [r[c] for r in rows] for c in columns}, artifact_file=artifact_file)


def log_traces(rows: list[dict], stage: str, count: int, step: int = 0) -> None:
    """A few generations as MLflow traces: prompt in, completion out, tagged with problem, gold, outcome, split,
    iteration and policy version so the UI's trace search finds e.g. the wrong answers of one evaluation."""
    import mlflow

    chosen = rows[:: max(1, len(rows) // count)][:count] if count else []
    for row in chosen:
        with mlflow.start_span(name=f"{stage}-generation", span_type="LLM") as span:
            span.set_inputs({"question": row["question"], "prompt": row["prompt"]})
            span.set_outputs({"completion": row["completion"]})
            span.set_attributes({"reward": row["reward"], "completion_tokens": len(row["completion_ids"]),
                                 "truncated": row["truncated"]})
            mlflow.update_current_trace(tags={
                "problem_id": row["problem_id"], "gold": row["gold"], "outcome": row["outcome"], "stage": stage,
                "split": row.get("split", "train"), "iteration": str(step),
                "policy_version": str(row.get("policy_version", 0))})
    # no flush here: MLflow writes traces in the background, and a flush waits out its writer's 1-second poll
    # (about 1 s per stage on the critical path); flush_traces at the end of a run, and at exit, write the rest


def flush_traces() -> None:
    """Wait until the traces logged so far are in the store."""
    import mlflow

    mlflow.flush_trace_async_logging()


def log_metrics(metrics: dict[str, float], step: int, prefix: str = "", run_id: str | None = None) -> None:
    import mlflow

    values = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
    if run_id:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
    else:
        mlflow.log_metrics(values, step=step)


def log_datasets(splits, evaluation) -> None:
    """The splits a run uses as MLflow dataset inputs (name, source, digest, contexts training / validation /
    evaluation), so runs on other data, or other held-out splits, are told apart in the UI."""
    import mlflow

    try:
        import pandas as pd
    except ImportError:  # a slim install (mlflow-skinny) without pandas: lineage is skipped, the run goes on
        return
    parts = [("train", splits.pool, "training"), ("test", splits.test, "evaluation")]
    if evaluation.val_limit:
        parts.insert(1, ("validation", splits.validation, "validation"))
    for split, problems, context in parts:
        frame = pd.DataFrame({"id": [p.id for p in problems], "question": [p.question for p in problems],
                              "answer": [p.answer for p in problems]})
        data = mlflow.data.from_pandas(frame, source=splits.source, name=f"gsm8k-{split}", targets="answer")
        mlflow.log_input(data, context=context)
