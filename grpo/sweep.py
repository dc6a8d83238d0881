"""Optuna sweep: each trial runs the main chain as a nested MLflow run of the sweep run.

The search space comes from the `search=` metadata of the Config fields; the study lives in an RDB
storage so that more workers can join it and a killed sweep can be resumed."""
from __future__ import annotations

from pathlib import Path


def storage_url(cfg) -> str:
    """cfg.storage, or an SQLite file next to the MLflow store (its working directory)."""
    return cfg.storage or f"sqlite:///{Path('optuna.db').resolve()}"


def suggest(trial, cfg):
    """A Config with the searched fields drawn from the trial (ranges declared in grpo.config)."""
    from grpo.config import search_space

    space = search_space()
    chosen = {}
    for name in filter(None, cfg.search.split(",")):
        kind, low, high, options = space[name]
        chosen[name] = (trial.suggest_int if kind == "int" else trial.suggest_float)(name, low, high, **options)
    return cfg.replace(**chosen, seed=cfg.seed * 1000 + trial.number)  # trial seeds follow the study seed


def make_pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(cfg, pruner=None):
    import optuna
    from optuna.storages import RDBStorage

    # SQLite under several workers: wait for the write lock instead of failing with "database is locked"
    storage = RDBStorage(storage_url(cfg), engine_kwargs={"connect_args": {"timeout": 60}}
                         if storage_url(cfg).startswith("sqlite") else {})
    return optuna.create_study(study_name=cfg.study_name, storage=storage, load_if_exists=True,
                               direction=cfg.direction, sampler=optuna.samplers.TPESampler(seed=cfg.seed),
                               pruner=pruner or make_pruner(cfg.pruner))


def run_sweep(cfg, pruner=None) -> "optuna.Study":  # noqa: F821
    """Run cfg.n_trials trials of this worker (pruner: an optuna pruner overriding cfg.pruner)."""
    import mlflow
    import optuna
    from optuna_integration.mlflow import MLflowCallback

    from grpo import tracking
    from grpo.pipeline import run_main

    study = open_study(cfg, pruner)
    callback = MLflowCallback(metric_name=f"best_{cfg.objective}", create_experiment=False,
                              mlflow_kwargs={"nested": True}, tag_trial_user_attrs=True)

    @callback.track_in_mlflow()
    def objective(trial: optuna.Trial) -> float:
        trial_cfg = suggest(trial, cfg)
        mlflow.set_tags({"grpo.stage": "trial", "optuna.study": cfg.study_name, "optuna.trial": trial.number})
        tracking.log_params(trial_cfg.as_params("main"))
        best: list[float] = []

        def report(step: int, value: float) -> None:
            best.append(value)
            trial.report(value, step)
            if step > 0 and trial.should_prune():
                mlflow.set_tag("optuna.state", "PRUNED")
                raise optuna.TrialPruned(f"pruned at step {step} with {cfg.objective}={value:.3f}")

        run_main(trial_cfg, on_eval=report if cfg.objective == "test_accuracy" else None)
        if cfg.objective != "test_accuracy":
            history = mlflow.MlflowClient().get_metric_history(mlflow.active_run().info.run_id, cfg.objective)
            best = [m.value for m in history]
        if not best:
            raise ValueError(f"objective metric {cfg.objective!r} was never logged by the trial")
        mlflow.set_tag("optuna.state", "COMPLETE")
        return max(best) if cfg.direction == "maximize" else min(best)

    with tracking.stage_run("sweep", cfg.as_params("sweep"), run_name=f"sweep-{cfg.study_name}",
                            tags={"optuna.study": cfg.study_name, "optuna.storage": storage_url(cfg)}):
        study.optimize(objective, n_trials=cfg.n_trials, callbacks=[callback, _mark_pruned], catch=(RuntimeError,),
                       gc_after_trial=True)
        _log_summary(study)
    return study


def _mark_pruned(study, trial) -> None:
    """MLflowCallback leaves a pruned trial's run FINISHED (tag state=PRUNED); show it as KILLED too."""
    import mlflow
    import optuna
    from optuna_integration.mlflow.mlflow import RUN_ID_ATTRIBUTE_KEY

    run_id = trial.system_attrs.get(RUN_ID_ATTRIBUTE_KEY)
    if run_id and trial.state == optuna.trial.TrialState.PRUNED:
        mlflow.MlflowClient().set_terminated(run_id, "KILLED")


def _log_summary(study) -> None:
    """Best trial and Optuna's plots on the sweep run (plots need 2+ finished trials)."""
    import mlflow
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    mlflow.log_metrics({"trials_complete": len(done), "trials_total": len(study.trials),
                        "trials_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)})
    if not done:
        return
    mlflow.log_metric("best_value", study.best_value)
    mlflow.log_dict({"best_params": study.best_params, "best_trial": study.best_trial.number}, "best.json")
    plots = {"optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
             "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate}
    if len(done) >= 2:
        plots["param_importances"] = optuna.visualization.matplotlib.plot_param_importances
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, plot in plots.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError, ImportError) as e:  # e.g. importances with one distinct value
            mlflow.set_tag(f"plot.{name}", f"skipped: {e}"[:250])
            continue
        figure = axes.flatten()[0].figure if hasattr(axes, "flatten") else axes.figure
        mlflow.log_figure(figure, f"optuna/{name}.png")
        plt.close(figure)
