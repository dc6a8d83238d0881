"""Optuna sweep: each trial runs the main chain as a nested MLflow run of the sweep run.

The search space comes from the `search=` metadata of the config fields; the study lives in an RDB storage so
that more workers can join it and a killed sweep can be resumed. Trials are tuned on the held-out validation
split (objective `val_accuracy` by default) over evaluations after step 0, the one every trial shares; test
accuracy is logged beside it and never used to choose."""
from __future__ import annotations

import os
import time
from pathlib import Path

from grpo.errors import ConfigError, TrackingError

WORKER_OF = "GRPO_SWEEP_WORKER_OF"  # set in a worker's environment: the sweep run its trials nest under
TRIALS_LEFT = "GRPO_SWEEP_TRIALS_LEFT"  # and this: a file counting the sweep's trials no worker has taken yet


def storage_url(sweep) -> str:
    """sweep.storage, or an SQLite file next to the MLflow store (its working directory)."""
    return sweep.storage or f"sqlite:///{Path('optuna.db').resolve()}"


def check_objective(cfg) -> None:
    """The objective must be a main-run metric logged per step; validation ones need a validation split."""
    from grpo.pipeline import MAIN_METRICS

    objective = cfg.sweep.objective
    if objective not in MAIN_METRICS:
        raise ConfigError(f"objective {objective!r} is not a main-run metric; pick one of {', '.join(MAIN_METRICS)}")
    if objective.startswith("val_") and not cfg.evaluation.val_limit:
        raise ConfigError(f"objective {objective} needs validation problems: pass val_limit > 0")


def suggest(trial, cfg):
    """A Config with the searched fields drawn from the trial (ranges declared in grpo.config)."""
    from grpo.config import search_space

    space = search_space()
    chosen = {}
    for name in filter(None, cfg.sweep.search.split(",")):
        kind, *bounds = space[name]
        if kind == "categorical":
            chosen[name] = trial.suggest_categorical(name, list(bounds[0]))
        else:
            low, high, options = bounds
            chosen[name] = (trial.suggest_int if kind == "int" else trial.suggest_float)(name, low, high, **options)
    return cfg.replace(**chosen, seed=cfg.loop.seed * 1000 + trial.number)  # trial seeds follow the study seed


def trial_sampler(seed: int):
    """TPE seeded per trial from (study seed, trial number): a single worker is reproducible, while workers
    sharing a study (distinct trial numbers) and a resumed study draw distinct trials."""
    import optuna

    class TrialSeeded(optuna.samplers.BaseSampler):
        def _inner(self, trial):
            return optuna.samplers.TPESampler(seed=seed * 1_000_003 + trial.number)

        def infer_relative_search_space(self, study, trial):
            return {}  # independent sampling, as TPE's default

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, distribution):
            return self._inner(trial).sample_independent(study, trial, name, distribution)

    return TrialSeeded()


def make_pruner(name: str):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(cfg, pruner=None):
    import optuna
    from optuna.storages import RDBStorage

    from grpo.tracking import redact

    url = storage_url(cfg.sweep)
    try:  # SQLite under several workers: wait for the write lock instead of failing with "database is locked"
        storage = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})
        return optuna.create_study(study_name=cfg.sweep.study_name, storage=storage, load_if_exists=True,
                                   direction=cfg.sweep.direction, sampler=trial_sampler(cfg.loop.seed),
                                   pruner=pruner or make_pruner(cfg.sweep.pruner))
    except (ImportError, ModuleNotFoundError) as e:
        raise TrackingError(f"the driver for Optuna storage {redact(url)} is not installed ({e}); run: "
                            "pip install -e '.[postgres]'") from None
    except Exception as e:
        if isinstance(e, ValueError) and "direction" in str(e):
            raise ConfigError(f"study {cfg.sweep.study_name} exists with another direction; pass its direction "
                              "or another study_name") from None
        raise TrackingError(f"cannot open Optuna storage {redact(url)} ({type(e).__name__}: "
                            f"{redact(str(e).splitlines()[0][:150])})") from None


def run_sweep(cfg, pruner=None):
    """Run cfg.sweep.n_trials trials of this worker (pruner: an optuna pruner overriding cfg.sweep.pruner)."""
    import optuna

    from grpo import tracking
    from grpo.plots import log_sweep_overlay

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_objective(cfg)
    study = open_study(cfg, pruner)
    parent = os.environ.get(WORKER_OF)
    if parent:  # one of a sweep's workers: its trials go under that sweep's run
        import mlflow

        from grpo.trainer_process import die_with_parent

        die_with_parent()

        experiment = mlflow.MlflowClient().get_run(parent).info.experiment_id
        counter = os.environ.get(TRIALS_LEFT)
        for _ in range(cfg.sweep.n_trials):
            if counter and not take_trial(counter):
                break
            _run_trial(study, cfg, experiment, parent)
        return study
    params = cfg.as_params("sweep") | {"storage": tracking.redact(storage_url(cfg.sweep))}
    with tracking.stage_run("sweep", params, run_name=f"sweep-{cfg.sweep.study_name}",
                            tags={"optuna.study": cfg.sweep.study_name},
                            system_metrics=cfg.tracking.system_metrics) as sweep_run:
        workers = worker_count(cfg.sweep)
        if workers > 1:
            _run_workers(cfg, workers, sweep_run.info.run_id)
        else:
            for _ in range(cfg.sweep.n_trials):
                _run_trial(study, cfg, sweep_run.info.experiment_id)
        _log_summary(study, cfg)
        log_sweep_overlay(sweep_run.info.run_id)
    return study


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    named = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[:torch.cuda.device_count()] if named else [str(k) for k in range(torch.cuda.device_count())]


def worker_count(sweep) -> int:
    return sweep.workers or max(1, len(visible_gpus()))


def take_trial(counter: str) -> bool:
    """Take one of the sweep's trials left, if any (a count in the file `counter`, under an exclusive lock): the
    workers share the trials as each frees up, so a long trial on one GPU does not leave another idle."""
    import fcntl

    with open(counter, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        left = int(f.read() or 0)
        if left <= 0:
            return False
        f.seek(0)
        f.truncate()
        f.write(str(left - 1))
        return True


def _run_workers(cfg, workers: int, sweep_run_id: str) -> None:
    """`workers` sweep processes at once, taking the trials one at a time as each is free, each on its own GPU
    (round robin; CPU processes without one), one study, trials nested under this sweep run. They die with this
    process."""
    import subprocess
    import sys
    import tempfile

    import mlflow

    from grpo.trainer_process import ROOT, share_cores

    gpus, total = visible_gpus(), cfg.sweep.n_trials
    handle, counter = tempfile.mkstemp(prefix="grpo-sweep-trials-")
    os.write(handle, str(total).encode())
    os.close(handle)
    processes = []
    for k in range(min(workers, total)):
        flags = cfg.replace(workers=1, storage=storage_url(cfg.sweep)).as_params("sweep")
        env = {**os.environ, WORKER_OF: sweep_run_id, TRIALS_LEFT: counter,
               "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "GRPO_PARENT_PID": str(os.getpid())}
        env.pop("MLFLOW_RUN_ID", None)
        share_cores(env, workers)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[k % len(gpus)]
        _say(f"worker {k} started" + (f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else ""))
        processes.append(subprocess.Popen([sys.executable, str(ROOT / "entrypoints" / "sweep.py"),
                                           *[f"--{name}={value}" for name, value in flags.items()]],
                                          env=env))
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: let them end their trials as KILLED first
        for process in processes:
            process.wait(timeout=120)
        raise
    finally:
        os.unlink(counter)
    failed = [k for k, code in enumerate(codes) if code != 0]
    if failed:
        raise TrackingError(f"sweep worker(s) {', '.join(map(str, failed))} failed (their last lines are above); "
                            "rerun the sweep to add the missing trials to the study")


def _run_trial(study, cfg, experiment_id: str, parent: str | None = None) -> None:
    import mlflow
    import optuna

    from grpo import tracking
    from grpo.errors import GrpoError
    from grpo.pipeline import run_main

    trial, started = study.ask(), time.monotonic()
    trial_cfg = suggest(trial, cfg)
    objective, maximize = cfg.sweep.objective, cfg.sweep.direction == "maximize"
    seen: dict[int, float] = {}

    def report(step: int, metrics: dict) -> None:
        if objective in metrics and step > 0:  # step 0 is the untrained model, the same for every trial
            seen[step] = metrics[objective]
            trial.report(metrics[objective], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{objective}={metrics[objective]:.3f} at step {step}")

    tags = {"grpo.stage": "trial", "optuna.study": cfg.sweep.study_name, "optuna.trial": str(trial.number)}
    run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=parent is None, parent_run_id=parent,
                           experiment_id=experiment_id, tags=tags)
    status = "FAILED"
    try:
        tracking.log_params(trial_cfg.as_params("main"))
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        run_main(trial_cfg, on_logged=report)
        if not seen:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise ConfigError(f"objective {objective} was never logged after step 0 (one iteration with "
                              "test_every_n_iterations=0?)")
        value, seconds = max(seen.values()) if maximize else min(seen.values()), time.monotonic() - started
        mlflow.log_metrics({f"best_{objective}": value, "trial_seconds": seconds})
        mlflow.set_tag("optuna.state", "COMPLETE")
        study.tell(trial, value)
        status = "FINISHED"
        _say(f"trial {trial.number}: best {objective} {value:.3f} in {seconds:.0f} s with " + _shown(trial.params))
    except optuna.TrialPruned as pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        mlflow.set_tag("optuna.state", "PRUNED")
        status = "KILLED"
        _say(f"trial {trial.number} pruned after {time.monotonic() - started:.0f} s: {pruned}")
    except GrpoError as e:
        if isinstance(e, ConfigError):
            raise
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        mlflow.set_tag("optuna.state", "FAIL")
        _say(f"trial {trial.number} failed: {tracking.redact(e)}")
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if mlflow.active_run() and mlflow.active_run().info.run_id == run.info.run_id:
            mlflow.end_run(status)


def _shown(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _say(line: str) -> None:
    from grpo.console import say

    say(f"grpo sweep: {line}")


def _log_summary(study, cfg) -> None:
    """Best trial and Optuna's plots on the sweep run (plots need 2+ finished trials)."""
    import mlflow
    import optuna

    from grpo.plots import _pyplot

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    mlflow.log_metrics({"trials_complete": len(done), "trials_total": len(study.trials),
                        "trials_pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)})
    if not done:
        _say("no trial completed")
        return
    best = study.best_trial
    mlflow.log_metric("best_value", study.best_value)
    mlflow.log_dict({"objective": cfg.sweep.objective, "best_value": study.best_value, "best_params": best.params,
                     "best_trial": best.number, "best_run_id": best.user_attrs.get("mlflow_run_id")}, "best.json")
    _say(f"best {cfg.sweep.objective} {study.best_value:.3f} (trial {best.number}, run "
         f"{best.user_attrs.get('mlflow_run_id')}): " + _shown(best.params))
    plots = {"optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
             "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate}
    if len(done) >= 2:
        plots["param_importances"] = optuna.visualization.matplotlib.plot_param_importances
    plt = _pyplot()
    for name, plot in plots.items():
        try:
            axes = plot(study)
        except (ValueError, RuntimeError, ImportError) as e:  # e.g. importances with one distinct value
            mlflow.set_tag(f"plot.{name}", f"skipped: {e}"[:250])
            continue
        figure = axes.flatten()[0].figure if hasattr(axes, "flatten") else axes.figure
        mlflow.log_figure(figure, f"optuna/{name}.png")
        plt.close(figure)
