"""Policies as MLflow 3 logged models: the weights of an evaluated policy become a `transformers` logged model of
the main run (step = iterations trained), its evaluation metrics are linked to it (`model_id`), so
`mlflow.search_logged_models` and the UI's Models tab rank checkpoints; the best one can be registered.

Which policies are kept is `log_models`: 'best' (the best validation accuracy so far, or test accuracy without a
validation split; one model at the end), 'last', 'every' evaluation, or 'none': a 1B model is gigabytes."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

TASK = "llm/v1/chat"  # served by `mlflow models serve` as a chat endpoint; loads as a text-generation pipeline


def selection_metric(evaluation) -> str:
    return "val_accuracy" if evaluation.val_limit else "test_accuracy"


def log_policy(folder: Path, step: int, metrics: dict[str, float], name: str = "policy") -> str:
    """Log the HF model folder as a logged model of the active run at `step`, link `metrics` to it; its id."""
    import mlflow

    info = mlflow.transformers.log_model(transformers_model=str(folder), name=name, task=TASK, step=step,
                                         pip_requirements=[], tags={"grpo.iterations": str(step)})
    mlflow.log_metrics(metrics, step=step, model_id=info.model_id)
    return info.model_id


def register_best(run_id: str, model_id: str, name: str) -> int:
    """Register a logged model under `name` with the alias 'best'; returns the version."""
    import mlflow

    version = mlflow.register_model(f"models:/{model_id}", name)
    mlflow.MlflowClient().set_registered_model_alias(name, "best", version.version)
    return int(version.version)


class PolicyKeeper:
    """Decides, at each evaluation, which policy weights to keep, and logs them as models."""

    def __init__(self, mode: str, metric: str, export):
        self.mode, self.metric, self.export = mode, metric, export  # export(folder) writes the current weights
        self.best: tuple[float, int, dict] | None = None
        self.folder = Path(tempfile.mkdtemp(prefix="grpo-best-"))
        self.logged: dict[int, str] = {}

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        if self.mode == "every":
            self._log_now(step, metrics)
        elif self.mode == "best" and step > 0 and self.metric in metrics:
            if self.best is None or metrics[self.metric] > self.best[0]:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.export(self.folder)
                self.best = (metrics[self.metric], step, metrics)

    def finish(self, step: int, metrics: dict[str, float]) -> str | None:
        """Log what the mode keeps; return the model id of the best (or last) policy."""
        try:
            if self.mode == "last":
                return self._log_now(step, metrics)
            if self.mode == "best" and self.best is not None:
                return log_policy(self.folder, self.best[1], self.best[2])
            if self.mode == "every" and self.logged:
                return self.logged[max(self.logged)]
            return None
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _log_now(self, step: int, metrics: dict[str, float]) -> str:
        with tempfile.TemporaryDirectory(prefix="grpo-policy-") as tmp:
            self.export(Path(tmp))
            self.logged[step] = log_policy(Path(tmp), step, metrics)
        return self.logged[step]
