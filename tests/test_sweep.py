"""Sweeps with real Optuna RDB storage and real MLflow on SQLite, on the tiny models."""
import os
import subprocess
import sys

import mlflow
import optuna
import pytest
from conftest import ROOT, runs_of

from grpo.config import Config


def _cfg(model, dataset="bundled", **changes):
    base = dict(model=model, dataset=dataset, backend="hf", problems=2, attempts=4, max_new_tokens=8, eval_limit=2,
                val_limit=4, max_iterations=1, train_batch_size=4, trace_samples=0, n_trials=3, study_name="s",
                storage="sqlite:///optuna.db")
    return Config().replace(**{**base, **changes})


def _trials(uri):
    _, runs = runs_of(uri)
    return [r for r in runs if r.data.tags.get("grpo.stage") == "trial"], runs


@pytest.mark.slow
def test_sweep_tunes_on_validation_with_nested_runs_and_an_overlay(store, primed_model_dir, digits_dataset, capfd):
    from grpo import tracking
    from grpo.sweep import run_sweep, suggest

    tracking.setup()
    study = run_sweep(_cfg(primed_model_dir, digits_dataset))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    trials, runs = _trials(store)
    (sweep,) = [r for r in runs if r.data.tags.get("grpo.stage") == "sweep"]
    assert len(trials) == 3 and all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in trials)
    client = mlflow.MlflowClient()
    for trial, run in zip(study.trials, sorted(trials, key=lambda r: int(r.data.tags["optuna.trial"]))):
        # the objective is the best validation accuracy after step 0; test accuracy is logged, never used
        val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
        assert set(val) == {0, 1} and trial.value == val[1] == run.data.metrics["best_val_accuracy"]
        assert "test_accuracy" in run.data.metrics and trial.intermediate_values == {1: val[1]}
        # its wall-clock: within Optuna's ask-to-tell span, which holds little else
        span = (trial.datetime_complete - trial.datetime_start).total_seconds()
        assert span / 2 < run.data.metrics["trial_seconds"] <= span + 0.01
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == trials[0].info.run_id]
    assert {r.info.run_name for r in stages} == {"evaluate-0", "rollout-0", "annotate-0", "finetune-0", "evaluate-1"}
    artifacts = [a.path for a in client.list_artifacts(sweep.info.run_id)]
    assert {"best.json", "sweep_curves.png"} <= set(artifacts) and sweep.data.metrics["best_value"] == study.best_value
    assert "optuna/optimization_history.png" in [a.path for a in client.list_artifacts(sweep.info.run_id, "optuna")]
    err = capfd.readouterr().err
    assert "grpo sweep: best val_accuracy" in err and "learning_rate=" in err
    # a trial's draw depends on the study seed and its number only: a rerun draws the same first trial
    again = optuna.create_study(sampler=__import__("grpo.sweep", fromlist=["trial_sampler"]).trial_sampler(0))
    assert suggest(again.ask(), _cfg(primed_model_dir)).sampling.temperature == study.trials[0].params["temperature"]


@pytest.mark.slow
def test_pruned_trial_shows_pruned_in_optuna_and_mlflow(store, tiny_model_dir):
    from grpo import tracking
    from grpo.sweep import run_sweep

    tracking.setup()
    # the random tiny model scores 0: a threshold above that prunes at the first evaluation after training
    study = run_sweep(_cfg(tiny_model_dir, n_trials=1), pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    (trial,), runs = _trials(store)
    assert trial.data.tags["optuna.state"] == "PRUNED" and trial.info.status == "KILLED"
    (sweep,) = [r for r in runs if r.data.tags.get("grpo.stage") == "sweep"]
    assert sweep.info.status == "FINISHED"


@pytest.mark.slow
def test_two_mains_and_two_sweep_workers_share_one_sqlite_store(store, tiny_model_dir, tmp_path):
    """Everything a team starts at once on one embedded store: no 'database is locked', no metric lost, and
    a sweep's two workers (processes with the same seed) draw distinct trials, nested under its one run."""
    common = ["--model", tiny_model_dir, "--backend", "hf", "--problems", "2", "--attempts", "4", "--max_new_tokens",
              "6", "--eval_limit", "2", "--val_limit", "2", "--train_batch_size", "4", "--trace_samples", "1"]
    sweep = [sys.executable, str(ROOT / "entrypoints" / "sweep.py"), *common, "--max_iterations", "1",
             "--n_trials", "2", "--workers", "2", "--study_name", "shared",
             "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    main = [sys.executable, str(ROOT / "entrypoints" / "main.py"), *common, "--max_iterations", "2"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the sweep sizes its workers' threads
    sized = {**env, "GRPO_GPU_MEMORY_GIB": "79.6"}  # one main's caps planned for a smaller card: tagged
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=e)
                 for command, e in ((sweep, env), (main, env), (main, sized))]
    for process in processes:
        _, err = process.communicate(timeout=1200)
        assert process.returncode == 0, err[-2000:]
        assert "database is locked" not in err
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(t.number for t in study.trials) == [0, 1]
    drawn = {tuple(sorted(t.params.items())) for t in study.trials}
    assert len(drawn) == 2, "two workers drew the same trial"
    trials, runs = _trials(store)
    (sweep_run,) = [r for r in runs if r.data.tags.get("grpo.stage") == "sweep"]
    assert len(trials) == 2 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {sweep_run.info.run_id}
    # the two workers share the machine's cores instead of each starting a thread per core
    assert {r.data.tags["grpo.cpu_threads"] for r in trials} == {str(max(1, (os.cpu_count() or 1) // 2))}
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.metrics["trials_complete"] == 2
    client = mlflow.MlflowClient()
    mains = [r for r in runs if r.data.tags.get("grpo.stage") == "main"]
    assert len(mains) == 2 and all(r.info.status == "FINISHED" for r in mains)
    assert sorted(r.data.tags.get("grpo.gpu_memory_gib", "") for r in mains) == ["", "79.6"]
    for run in mains + trials:
        iterations = 2 if run in mains else 1
        history = lambda key: [m.step for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
        assert history("test_accuracy") == list(range(iterations + 1))
        assert sorted(history("train_reward_mean")) == list(range(iterations))
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        assert len(stages) == 4 * iterations + 1 and all(r.info.status == "FINISHED" for r in stages)


def test_workers_take_exactly_the_sweeps_trials_between_them_as_each_frees_up(tmp_path):
    """Four processes race for 50 trials (a count in a file, under a lock): 50 are taken, none twice, and the
    one whose trials are slow takes fewer, as a GPU whose trials run long would."""
    counter = tmp_path / "left"
    counter.write_text("50")
    script = ("import pathlib, sys, time; from grpo.sweep import take_trial\n"
              "ready = pathlib.Path(sys.argv[1] + '.ready'); ready.mkdir(exist_ok=True)\n"
              "(ready / sys.argv[2]).touch()\n"
              "while len(list(ready.iterdir())) < 4: time.sleep(0.01)  # all start together\n"
              "taken = 0\n"
              "while take_trial(sys.argv[1]):\n"
              "    taken += 1; time.sleep(float(sys.argv[3]))\n"
              "print(taken)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen([sys.executable, "-c", script, str(counter), f"{k}", pause], stdout=subprocess.PIPE,
                                text=True, env=env) for k, pause in enumerate(("0.3", "0.01", "0.01", "0.01"))]
    taken = [int(w.communicate(timeout=60)[0]) for w in workers]
    assert sum(taken) == 50 and counter.read_text() == "0"
    assert taken[0] < min(taken[1:])
