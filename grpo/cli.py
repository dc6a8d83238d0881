"""What every entry point does around its body: parse its flags, quiet the libraries' noise, check the tracking
store, turn every error a user can fix into one line and a non-zero exit, and end an interrupted run as KILLED
with the line that resumes it."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable


def _interrupt(signum, frame):
    """Ctrl-C, or SIGTERM (`mlflow run` cancelling its child on Ctrl-C): end the run as interrupted. Later signals
    are ignored, so that marking the runs KILLED is not itself interrupted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_entrypoint(entry_point: str, body: Callable, argv: list[str] | None = None) -> None:
    """body(cfg, on_interrupt) where on_interrupt is a dict the body may fill with a 'resume' command line."""
    from grpo.config import parse_args
    from grpo.errors import GrpoError

    from grpo.console import quiet

    cfg = parse_args(entry_point, argv)
    quiet()
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # an inherited "ignore" (nohup, &) is kept
        signal.signal(signal.SIGINT, _interrupt)
    hints: dict[str, str] = {}
    launched_as = os.environ.get("MLFLOW_RUN_ID")  # (mlflow.start_run consumes the variable)
    try:
        from grpo import tracking

        tracking.setup()
        body(cfg, hints)
    except GrpoError as e:
        _end_runs("FAILED")
        from grpo.tracking import redact

        tail = f"; resume with: {hints['resume']}" if hints.get("resume") and entry_point == "main" else ""
        sys.exit(f"grpo {entry_point}: error: {redact(e)}{tail}")
    except KeyboardInterrupt:
        top = _end_runs("KILLED") or launched_as
        if top and _under_mlflow_run(top):
            _keep_killed_after_parent(top)
        resume = f"; resume with: {hints['resume']}" if hints.get("resume") else ""
        sys.exit(f"grpo {entry_point}: interrupted{resume}")


def _end_runs(status: str) -> str | None:
    """End every run this process still has open (stage, main, sweep), innermost first; the outermost's id."""
    import mlflow

    top = None
    while mlflow.active_run():
        top = mlflow.active_run().info.run_id
        mlflow.end_run(status)
    return top


def _under_mlflow_run(run_id: str) -> bool:
    import mlflow

    try:
        return "mlflow.project.entryPoint" in mlflow.MlflowClient().get_run(run_id).data.tags
    except Exception:
        return False


def _keep_killed_after_parent(run_id: str) -> None:
    """`mlflow run` marks an interrupted run FAILED after its child exits, overwriting our KILLED (MLflow 3.17:
    `_maybe_set_run_terminated` compares the status string with integer codes, so it never sees the run as
    ended). A detached helper waits for the `mlflow run` process to exit and puts KILLED back."""
    import subprocess

    subprocess.Popen([sys.executable, "-m", "grpo.cli", "keep-killed", run_id, str(os.getppid())],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def _keep_killed(run_id: str, parent_pid: int, timeout: float = 120) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(parent_pid, 0)
        except OSError:
            break
        time.sleep(0.2)
    import mlflow

    client = mlflow.MlflowClient()
    if client.get_run(run_id).info.status == "FAILED":
        client.set_terminated(run_id, "KILLED")


def resume_command(run_id: str) -> str:
    """The command that carries on with a main run, in the form it was started with."""
    import mlflow

    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    if "mlflow.project.entryPoint" in tags:
        return f"mlflow run . --env-manager local --run-id {run_id}"
    return f"MLFLOW_RUN_ID={run_id} python entrypoints/main.py"


if __name__ == "__main__" and sys.argv[1:2] == ["keep-killed"]:
    _keep_killed(sys.argv[2], int(sys.argv[3]))
