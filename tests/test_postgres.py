"""The team setup: the main chain logging into PostgreSQL instead of the embedded SQLite store. A throwaway
server is started from Debian's postgresql binaries (as the `postgres` user when the tests run as root) on a
Unix socket; .ci/run installs them and sets GRPO_REQUIRE_POSTGRES=1, elsewhere the test skips without them."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import pytest
from conftest import run_entry


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture
def postgres_uri():
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bins:
        if os.environ.get("GRPO_REQUIRE_POSTGRES"):
            raise AssertionError("PostgreSQL server binaries missing: apt-get install postgresql")
        pytest.skip("needs Debian's postgresql")
    bindir = bins[-1].parent
    root = Path(tempfile.mkdtemp(prefix="grpo-pg-", dir="/tmp"))  # the server user must reach it
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", "54329"
    run = lambda *c: subprocess.run(_as_postgres([str(bindir / c[0]), *c[1:]]), check=True,  # noqa: E731
                                    capture_output=True, text=True)
    run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    run("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
        f"-k {root} -p {port} -c listen_addresses=''", "start")
    try:
        run("createdb", "-h", str(root), "-p", port, "-U", "postgres", "grpo")
        yield f"postgresql://postgres@/grpo?host={root}&port={port}"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_main_run_logs_into_postgresql(postgres_uri, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_entry("main", "--model", tiny_model_dir, "--backend", "hf", "--problems", "2", "--attempts", "2",
              "--max_new_tokens", "6", "--eval_limit", "2", "--train_batch_size", "4", "--max_iterations", "1",
              env={"MLFLOW_TRACKING_URI": postgres_uri})
    client = mlflow.MlflowClient(postgres_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (main,) = [r for r in runs if r.data.tags.get("grpo.stage") == "main"]
    stages = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == main.info.run_id}
    assert stages == {"evaluate-0", "rollout-0", "annotate-0", "finetune-0", "evaluate-1"}
    assert main.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(main.info.run_id, "test_accuracy")] == [0, 1]
    assert "learning_curve.png" in [a.path for a in client.list_artifacts(main.info.run_id)]
