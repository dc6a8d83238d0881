"""MLflow the way its users expect, against a real SQLite store: kept policies as logged models with their
metrics linked, a registered result that loads and generates and that the evaluate entry point scores by URI,
dataset lineage, and system metrics."""
import mlflow
import pytest
from conftest import run_entry, runs_of

ARGS = ["--backend", "hf", "--problems", "3", "--attempts", "4", "--max_new_tokens", "8", "--eval_limit", "4",
        "--val_limit", "6", "--train_batch_size", "4", "--trace_samples", "0", "--max_iterations", "2",
        "--learning_rate", "1e-3"]


@pytest.mark.slow
def test_best_policy_is_a_registered_logged_model_that_loads_and_is_scored_by_uri(store, primed_model_dir,
                                                                                  digits_dataset):
    run_entry("main", *ARGS, "--model", primed_model_dir, "--dataset", digits_dataset, "--register_as", "digits",
              env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    client, runs = runs_of(store)
    (main,) = [r for r in runs if r.data.tags.get("grpo.stage") == "main"]
    experiment = main.info.experiment_id
    history = client.get_metric_history(main.info.run_id, "val_accuracy")
    val = {m.step: m.value for m in history}
    assert len(history) == len(val), "linking the kept policy's metrics must not log an evaluation twice"
    best_step = max((s for s in val if s > 0), key=lambda s: (val[s], -s))  # the first of the best
    (policy,) = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list",
                                            order_by=[{"field_name": "metrics.val_accuracy", "ascending": False}])
    linked = {m.key: m.value for m in policy.metrics}
    assert policy.source_run_id == main.info.run_id and policy.name == f"policy-{best_step:04d}"
    assert linked["val_accuracy"] == val[best_step] and "test_accuracy" in linked
    version = client.get_model_version_by_alias("digits", "best")
    assert policy.model_id in version.source and policy.model_id == main.data.tags["grpo.model_id"]
    pipeline = mlflow.transformers.load_model("models:/digits@best")
    reply = pipeline([{"role": "user", "content": "What is 1 plus 2?"}], max_new_tokens=8, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    done = run_entry("evaluate", "--model", "models:/digits@best", "--dataset", digits_dataset, "--backend", "hf",
                     "--limit", "5", "--max_new_tokens", "8")
    assert "test_accuracy=" in done.stdout and "on 5 problems" in done.stdout
    # lineage: the splits as dataset inputs with their contexts; system metrics sampled during the run
    inputs = {d.dataset.name: [t.value for t in d.tags] for d in main.inputs.dataset_inputs}
    assert inputs == {"gsm8k-train": ["training"], "gsm8k-validation": ["validation"], "gsm8k-test": ["evaluation"]}
    assert all(d.dataset.digest and digits_dataset in d.dataset.source for d in main.inputs.dataset_inputs)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= main.data.metrics.keys()


@pytest.mark.slow
def test_every_evaluation_kept_and_none_keeps_the_checkpoint_instead(store, tiny_model_dir):
    from pathlib import Path

    run_entry("main", *ARGS, "--model", tiny_model_dir, "--log_models", "every", "--system_metrics", "false")
    run_entry("main", *ARGS, "--model", tiny_model_dir, "--log_models", "none", "--system_metrics", "false")
    _, runs = runs_of(store)
    every, none = sorted((r for r in runs if r.data.tags.get("grpo.stage") == "main"), key=lambda r: r.info.start_time)
    kept = mlflow.search_logged_models(experiment_ids=[every.info.experiment_id], output_format="list")
    assert sorted(m.name for m in kept) == ["policy-0001", "policy-0002"]
    assert {m.source_run_id for m in kept} == {every.info.run_id}
    assert {m.key: m.step for m in kept[0].metrics}["val_accuracy"] == int(kept[0].name[-4:])
    history = mlflow.MlflowClient().get_metric_history(every.info.run_id, "test_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    assert not any(k.startswith("system/") for k in every.data.metrics)
    assert [p.name for p in (Path("grpo_runs") / none.info.run_id / "checkpoints").iterdir()] == ["iter-0001"]
