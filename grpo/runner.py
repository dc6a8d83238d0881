"""One stage runner for the main chain: a stage is a small record (its key, its metric step, its body, which of
its metrics the main run carries), and `StageRunner.run` owns everything around the body: the nested MLflow run
and its params, the resume state, and logging the
main run's metrics once per step. A stage that finished before (in a killed run) is not run again."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from grpo import tracking
from grpo.artifacts import RunState


@dataclass
class Stage:
    key: str  # unique within the run, e.g. "rollout-3"; also the nested run's name
    step: int  # the metric step (iteration, or iterations trained for evaluations)
    body: Callable[[str], dict]  # (stage run id) -> metrics
    parent_metrics: dict[str, str] = field(default_factory=dict)  # main-run name -> stage metric name
    params: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.key.rsplit("-", 1)[0]


class StageRunner:
    """Runs the stages of one main run; on creation, marks the stage runs a dead process left RUNNING as KILLED."""

    def __init__(self, parent_run_id: str, experiment_id: str, state: RunState,
                 on_logged: Callable[[int, dict], None] | None = None):
        from mlflow import MlflowClient

        self.parent, self.experiment_id, self.state = parent_run_id, experiment_id, state
        self.client = MlflowClient()
        self.on_logged = on_logged  # (step, main-run metrics just logged): progress lines, sweep reports
        self._steps: dict[str, set[int]] = {}  # steps logged per main-run metric (this runner is its one writer)
        self._end_orphans()

    def _end_orphans(self) -> None:
        """Stage runs a killed process left RUNNING end as KILLED. This process holds the run's lock, so any
        RUNNING child is an orphan, including one created just before a kill, before the state recorded it."""
        orphans = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent}' and "
                                                                "attributes.status = 'RUNNING'")
        finished = {run_id for key, run_id in self.state.data["runs"].items() if self.state.done(key) is not None}
        for run in orphans:  # killed after the state recorded its stage done, before MLflow ended it: it finished
            self.client.set_terminated(run.info.run_id, "FINISHED" if run.info.run_id in finished else "KILLED")

    def run(self, stage: Stage) -> dict:
        """Run the stage unless it finished before; return its metrics (with stage_seconds)."""
        import mlflow

        metrics = self.state.done(stage.key)
        if metrics is None:
            started = time.perf_counter()
            # Ctrl-C anywhere inside the stage's run (also while its parameters are logged) ends it KILLED; an
            # interrupt that MLflow's own context manager saw would end it FAILED
            with mlflow.start_run(run_name=stage.key, nested=True, experiment_id=self.experiment_id,
                                  tags={"grpo.stage": stage.name, "grpo.step": str(stage.step)}) as run, \
                    tracking.killed_on_interrupt():
                _failpoint(stage.key)  # the hardest moment: the run exists, the resume state does not know it yet
                self.state.started(stage.key, run.info.run_id)
                if stage.params:
                    tracking.log_params(stage.params)
                metrics = stage.body(run.info.run_id)
                metrics["stage_seconds"] = time.perf_counter() - started
                # recorded before MLflow ends the run: a kill between the two leaves a RUNNING run the state knows
                # finished (the next process ends it FINISHED), never a FINISHED run a resume would run again
                self.state.mark(stage.key, metrics)
                _failpoint(f"{stage.key}/recorded")
        carried = {f"time_{stage.name}": metrics["stage_seconds"]}
        carried |= {target: metrics[source] for target, source in stage.parent_metrics.items() if source in metrics}
        self.log_once(carried, stage.step)
        return metrics

    def log_once(self, metrics: dict[str, float], step: int) -> None:
        """Log main-run metrics, skipping any already logged at this step (a resumed run re-entering a stage)."""
        for key in metrics.keys() - self._steps.keys():  # once per metric: what an earlier process logged
            self._steps[key] = {m.step for m in self.client.get_metric_history(self.parent, key)}
        fresh = {k: v for k, v in metrics.items() if step not in self._steps[k]}
        if fresh:
            tracking.log_metrics(fresh, step=step, run_id=self.parent)
            for key in fresh:
                self._steps[key].add(step)
        if self.on_logged:
            self.on_logged(step, metrics)


def _failpoint(key: str) -> None:
    """Tests: GRPO_FAILPOINT=kill-at:<stage key> SIGKILLs the whole process group as that stage starts, the way
    a machine failure or OOM killer would end the run; kill-at:<stage key>/recorded, once the resume state has
    it done and before MLflow ends its run; stop-at:<stage key> stops main alone (SIGSTOP) as that stage starts,
    for a test to kill it there while its trainer is alive."""
    if os.environ.get("GRPO_FAILPOINT") == f"kill-at:{key}":
        os.killpg(os.getpgid(0), signal.SIGKILL)
    if os.environ.get("GRPO_FAILPOINT") == f"stop-at:{key}":
        os.kill(os.getpid(), signal.SIGSTOP)
