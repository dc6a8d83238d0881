"""What a main run needs to carry on after it was killed: its folder, its parameters, and one process at a time.

A resumed run takes its parameters from the run itself. An explicit value that differs from both the default
and the run's is refused with a line naming it (so `mlflow run . --run-id ID`, which passes every default,
resumes as started); `max_iterations`, `max_seconds` and `trainer_timeout` may be changed, and the change is
recorded on the run."""
from __future__ import annotations

import os
from pathlib import Path

from grpo.config import Config, fields_for, parse_value, to_str
from grpo.errors import ResumeError

CHANGEABLE = ("max_iterations", "max_seconds", "trainer_timeout")


def reconcile(cfg: Config, recorded: dict[str, str], run_id: str) -> tuple[Config, dict[str, tuple]]:
    """The run's recorded parameters, with the changeable ones the user passed. Returns (config, changes) where
    changes maps a field to (recorded, new); any other conflicting explicit value raises ResumeError."""
    given = cfg.flat()
    values, changes, conflicts = dict(given), {}, []
    for f in fields_for("main"):
        if f.name not in recorded:
            continue
        was = parse_value(f, recorded[f.name])
        now = given[f.name]
        if now == was or now == f.default:
            values[f.name] = was
        elif f.name in CHANGEABLE:
            changes[f.name] = (was, now)
        else:
            conflicts.append(f"{f.name}={to_str(now)} (the run has {to_str(was)})")
    if conflicts:
        raise ResumeError(f"run {run_id} was started with other parameters: {'; '.join(conflicts)}. Resume without "
                          f"them (only {', '.join(CHANGEABLE)} may change), or start a new run")
    return Config.from_flat(values), changes


def find_run(run_id: str):
    """The MLflow run to resume; a one-line error if the store has no such run."""
    import mlflow

    from grpo.tracking import redact

    try:
        return mlflow.MlflowClient().get_run(run_id)
    except Exception:
        raise ResumeError(f"no run {run_id} in the tracking store {redact(mlflow.get_tracking_uri())}; check the "
                          "run id (mlflow ui lists them) and MLFLOW_TRACKING_URI") from None


def prepare(cfg: Config) -> tuple[Config, Path | None, dict]:
    """Before the main run starts: if MLFLOW_RUN_ID names a run this project already worked on, return its
    parameters (reconciled with the CLI), its folder and the changes to record; else the CLI config."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return cfg, None, {}
    from grpo.artifacts import RunState

    run = find_run(run_id)
    folder_tag = run.data.tags.get("grpo.work_dir")
    if not folder_tag:  # a run `mlflow run` just created for us: a fresh start
        return cfg, None, {}
    folder = Path(folder_tag)
    state = RunState(folder)
    if not state.path.is_file():
        raise ResumeError(f"run {run_id} has no resume state at {folder} (deleted, or another machine's disk); "
                          "start a new run")
    cfg, changes = reconcile(cfg, state.data.get("params", {}), run_id)
    if state.data.get("finished"):
        if "max_iterations" not in changes:
            raise ResumeError(f"run {run_id} already finished; start a new run (or pass a larger max_iterations "
                              "to extend a run that was stopped before finishing)")
        raise ResumeError(f"run {run_id} finished and its training state was cleaned up; start a new run from its "
                          f"weights: mlflow artifacts download -r {run_id} -a checkpoint -d <folder>, then "
                          "-P model=<folder>/checkpoint")
    return cfg, folder, changes
