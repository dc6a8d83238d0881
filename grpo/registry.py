"""Policies as MLflow 3 logged models: the weights of an evaluated policy become a `transformers` logged model of
the main run (step = iterations trained), with that evaluation's metrics linked to it (`model_id`), so
`mlflow.search_logged_models` and the UI's Models tab rank checkpoints; the kept one can be registered.

Which policies are kept is `log_models`: 'best' (the best validation accuracy, or test accuracy without a
validation split; its weights wait in the run folder, so a killed run keeps it, and it is logged once at the
end), 'last', 'every' evaluation, or 'none' (a 1B model is gigabytes each). The base model (step 0) is never
logged: it is what the run started from."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

TASK = "llm/v1/chat"  # `mlflow models serve` answers chat requests; loads as a text-generation pipeline


def log_policy(folder: Path, step: int, metrics: dict[str, float]) -> str:
    """Log an HF model folder as a logged model of the active run at `step`, link `metrics` to it; its id."""
    import mlflow

    info = mlflow.transformers.log_model(transformers_model=str(folder), name=f"policy-{step:04d}", task=TASK,
                                         step=step, pip_requirements=[], tags={"grpo.iterations": str(step)})
    mlflow.clear_active_model()  # else MLflow links every later metric of the run to this model
    link_metrics(mlflow.active_run().info.run_id, info.model_id, step, metrics)
    return info.model_id


def link_metrics(run_id: str, model_id: str, step: int, metrics: dict[str, float]) -> None:
    """Link the run's metrics at `step` to a logged model. A point the run already has is logged again with its
    own timestamp and value: the store keeps it once in the run's history (same key, step, time and value) and
    adds the link, so the run's charts never show an evaluation twice. (MLflow's deprecated file store appends
    instead: there the linked point shows twice in the run's history.)"""
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in metrics.items():
        logged = [m for m in client.get_metric_history(run_id, key) if m.step == step]
        point = max(logged, key=lambda m: m.timestamp) if logged else None
        client.log_metric(run_id, key, point.value if point else value, step=step, model_id=model_id,
                          timestamp=point.timestamp if point else None)


def register(model_id: str, name: str) -> int:
    """Register a logged model under `name` with the alias 'best'; returns the version."""
    import mlflow

    version = mlflow.register_model(f"models:/{model_id}", name)
    mlflow.MlflowClient().set_registered_model_alias(name, "best", version.version)
    return int(version.version)


class PolicyKeeper:
    """Decides at each fresh evaluation which policy to keep; logs the kept ones as models."""

    def __init__(self, mode: str, metric: str, export, folder: Path, state):
        self.mode, self.metric, self.export, self.state = mode, metric, export, state  # export(folder): weights
        self.best_folder = Path(folder) / "best-policy"

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        if step == 0 or self.mode in ("none", "last"):
            return
        if self.mode == "every":
            self.state.set(f"model-{step}", self._log_current(step, metrics))
            return
        best = self.state.data.get("best_policy")
        if self.metric in metrics and (best is None or metrics[self.metric] > best["value"]):
            tmp = self.best_folder.with_name(".tmp-best-policy")
            shutil.rmtree(tmp, ignore_errors=True)
            self.export(tmp)
            shutil.rmtree(self.best_folder, ignore_errors=True)
            tmp.rename(self.best_folder)
            self.state.set("best_policy", {"value": metrics[self.metric], "step": step, "metrics": metrics})

    def finish(self, step: int, metrics: dict[str, float]) -> str | None:
        """Log what the mode keeps; the model id of the kept policy (best, last, or newest of every)."""
        if self.mode == "last" and step > 0:
            return self._log_current(step, metrics)
        if self.mode == "best" and self.state.data.get("best_policy"):
            best = self.state.data["best_policy"]
            model_id = log_policy(self.best_folder, best["step"], best["metrics"])
            shutil.rmtree(self.best_folder, ignore_errors=True)
            return model_id
        if self.mode == "every":
            logged = {int(k.split("-")[1]): v for k, v in self.state.data.items() if k.startswith("model-")}
            return logged[max(logged)] if logged else None
        return None

    def _log_current(self, step: int, metrics: dict[str, float]) -> str:
        with tempfile.TemporaryDirectory(prefix="grpo-policy-") as tmp:
            self.export(Path(tmp))
            return log_policy(Path(tmp), step, metrics)
