"""Figures a person would rather look at than read: a main run's learning curve, and a sweep's trials overlaid."""
from __future__ import annotations

from typing import Callable

CURVE_PANELS = ((("test_boxed_rate",), "test boxed rate (greedy)"),
                (("test_accuracy", "val_accuracy"), "accuracy (greedy)"),  # its own scale: small next to boxed
                (("train_reward_mean", "train_correct_rate", "train_boxed_rate"), "train rollouts"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curve(history: Callable[[str], list[tuple[int, float]]]):
    """Test boxed rate, accuracy and train rollouts per iteration; `history(metric)` gives (step, value)s."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, (keys, title) in zip(axes, CURVE_PANELS):
        for key in keys:
            points = history(key)
            if points:
                axis.plot(*zip(*points), marker="o", label=key)
        axis.set_xlabel("iterations trained")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if len(axis.lines) > 1:
            axis.legend()
    fig.tight_layout()
    return fig


def log_learning_curve(run_id: str) -> None:
    """learning_curve.png on a main run, drawn from its logged metrics."""
    import mlflow

    client = mlflow.MlflowClient()
    fig = learning_curve(lambda key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)))
    client.log_figure(run_id, fig, "learning_curve.png")
    _pyplot().close(fig)


def sweep_overlay(trials: dict[str, dict[str, list]]):
    """trials: name -> {metric: [(step, value, seconds since the trial started)]}. Validation and test accuracy
    of every trial against iterations and against wall-clock."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey="row")
    for row, metric in enumerate(("val_accuracy", "test_accuracy")):
        for name, history in sorted(trials.items()):
            points = sorted(history.get(metric, []))
            if points:
                steps, values, seconds = zip(*points)
                axes[row][0].plot(steps, values, marker="o", label=name)
                axes[row][1].plot([s / 60 for s in seconds], values, marker="o", label=name)
        for col, xlabel in enumerate(("iterations trained", "minutes since the trial started")):
            axes[row][col].set_title(f"{metric} (greedy)")
            axes[row][col].set_xlabel(xlabel)
            axes[row][col].grid(alpha=0.3)
    if axes[0][0].lines:
        axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    return fig


def log_sweep_overlay(sweep_run_id: str) -> None:
    """sweep_curves.png on the sweep run: every trial of this sweep run overlaid."""
    import mlflow

    client = mlflow.MlflowClient()
    sweep = client.get_run(sweep_run_id)
    trials = client.search_runs([sweep.info.experiment_id], max_results=1000,
                                filter_string=f"tags.mlflow.parentRunId = '{sweep_run_id}'")
    curves = {}
    for trial in trials:
        start = trial.info.start_time
        curves[trial.info.run_name] = {
            key: [(m.step, m.value, (m.timestamp - start) / 1000) for m in client.get_metric_history(trial.info.run_id,
                                                                                                   key)]
            for key in ("val_accuracy", "test_accuracy")}
    fig = sweep_overlay(curves)
    client.log_figure(sweep_run_id, fig, "sweep_curves.png")
    _pyplot().close(fig)
