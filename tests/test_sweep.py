"""Sweeps with real Optuna RDB storage and real MLflow on SQLite, on the tiny model."""
import os
import subprocess
import sys

import mlflow
import optuna
import pytest
from conftest import ROOT

from grpo.config import Config


def _cfg(tiny_model_dir, **changes):
    base = dict(model=tiny_model_dir, backend="hf", problems=2, max_new_tokens=6, eval_limit=2, max_iterations=1,
                train_batch_size=4, trace_samples=0, n_trials=3, study_name="s", storage="sqlite:///optuna.db")
    return Config(**{**base, **changes}).validate()


def _trial_runs(uri):
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    return [r for r in runs if r.data.tags.get("grpo.stage") == "trial"], runs


@pytest.mark.slow
def test_three_trial_sweep_nested_runs_and_study(store, tiny_model_dir):
    from grpo import tracking
    from grpo.sweep import run_sweep

    tracking.setup()
    study = run_sweep(_cfg(tiny_model_dir))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    trials, runs = _trial_runs(store)
    (sweep,) = [r for r in runs if r.data.tags.get("grpo.stage") == "sweep"]
    assert len(trials) == 3 and all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in trials)
    params = {(r.data.params["temperature"], r.data.params["attempts"], r.data.params["learning_rate"]) for r in trials}
    assert len(params) == 3  # distinct sampled values
    assert all(r.data.tags["state"] == "COMPLETE" and "best_test_accuracy" in r.data.metrics for r in trials)
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trials[0].info.run_id]
    assert {r.info.run_name for r in stages} >= {"evaluate-0", "rollout-0", "annotate-0", "finetune-0", "evaluate-1"}
    assert "best_value" in sweep.data.metrics
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(sweep.info.run_id, "optuna")]
    assert "optuna/optimization_history.png" in artifacts
    # the seeds of a rerun follow the study seed: same first trial params
    again = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    from grpo.sweep import suggest

    assert suggest(again.ask(), _cfg(tiny_model_dir)).temperature == study.trials[0].params["temperature"]


@pytest.mark.slow
def test_pruned_trial_shows_pruned_in_optuna_and_mlflow(store, tiny_model_dir):
    from grpo import tracking
    from grpo.sweep import run_sweep

    tracking.setup()
    # the random tiny model scores 0: a threshold above that prunes at the first evaluation after training
    study = run_sweep(_cfg(tiny_model_dir, n_trials=1), pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    (trial,), _ = _trial_runs(store)
    assert trial.data.tags["state"] == "PRUNED" and trial.info.status == "KILLED"


@pytest.mark.slow
def test_two_mains_and_two_sweep_workers_share_one_sqlite_store(store, tiny_model_dir, tmp_path):
    """Everything a team starts at once on one embedded store: no 'database is locked', no metric lost."""
    common = ["--model", tiny_model_dir, "--backend", "hf", "--problems", "2", "--max_new_tokens", "6",
              "--eval_limit", "2", "--train_batch_size", "4", "--trace_samples", "1"]
    sweep = [sys.executable, str(ROOT / "entrypoints" / "sweep.py"), *common, "--max_iterations", "1",
             "--n_trials", "2", "--study_name", "shared", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    main = [sys.executable, str(ROOT / "entrypoints" / "main.py"), *common, "--max_iterations", "2"]
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
                 for command in (sweep, sweep, main, main)]
    for process in processes:
        _, err = process.communicate(timeout=1200)
        assert process.returncode == 0, err[-2000:]
        assert "database is locked" not in err
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    trials, runs = _trial_runs(store)
    assert len(trials) == 4
    client = mlflow.MlflowClient()
    mains = [r for r in runs if r.data.tags.get("grpo.stage") == "main"]
    assert len(mains) == 2 and all(r.info.status == "FINISHED" for r in mains)
    for run in mains + trials:
        iterations = 2 if run in mains else 1
        history = lambda key: [m.step for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
        assert history("test_accuracy") == list(range(iterations + 1))
        assert sorted(history("train_reward_mean")) == list(range(iterations))
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert len(stages) == 4 * iterations + 1 and all(r.info.status == "FINISHED" for r in stages)
