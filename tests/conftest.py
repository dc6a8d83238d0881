"""Shared fixtures: a real MLflow SQLite store per test, the real SmolLM2 tokenizer, a tiny randomly initialised
Llama built on it, and a tiny Llama primed in a few seconds to answer `\\boxed{digit}` so that GRPO groups get
rewards that differ (a random model never boxes), with a small digits dataset to go with it."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub; fail fast instead of retrying
# under pytest-xdist each worker's processes get their share of the cores: OpenMP threads beyond them spin
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves os.environ as it found it: MLflow's in-process calls set variables (set_experiment sets
    MLFLOW_EXPERIMENT_ID), which the next test's subprocesses, on another store, would inherit."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def blank_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made once (MLflow's migrations take seconds per store)."""
    import mlflow

    path = tmp_path_factory.mktemp("blank-store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, blank_store):
    """A fresh SQLite MLflow store (a copy of the blank one); the test runs inside tmp_path."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(blank_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "GRPO_FAILPOINT"):
        monkeypatch.delenv(var, raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from grpo.model import resolve

    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from grpo.model import load_tokenizer

    return load_tokenizer(smollm2_dir)


def _tiny_llama(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Llama with random weights and the real SmolLM2 tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory) -> str:
    """GSM8k-shaped files whose answers are single digits: 620 train problems (the task holds 508 out), 24 test."""
    folder = tmp_path_factory.mktemp("digits")
    rng = random.Random(0)
    for split, count in (("train", 620), ("test", 24)):
        with (folder / f"{split}.jsonl").open("w") as handle:
            for k in range(count):
                a, b = rng.randint(0, 4), rng.randint(0, 4)
                handle.write(json.dumps({"question": f"What is {a} plus {b}? ({split} {k})",
                                         "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
    return str(folder)


@pytest.fixture(scope="session")
def primed_model_dir(tmp_path_factory, tokenizer, digits_dataset) -> str:
    """The tiny Llama after a few seconds of supervised training to answer the digits problems with
    `\\boxed{d}`, right half the time: sampled groups then mix correct and wrong answers, so GRPO has signal."""
    import torch

    from grpo.config import DEFAULT_SYSTEM_PROMPT
    from grpo.scoring import pack, sequence_logprobs
    from grpo.tasks.gsm8k import PromptBuilder, load_splits

    model = _tiny_llama(tokenizer, seed=1)
    splits = load_splits(digits_dataset)
    builders = [PromptBuilder(tokenizer, DEFAULT_SYSTEM_PROMPT, 1, splits.exemplars),
                PromptBuilder(tokenizer, "", 0, splits.exemplars)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = random.Random(0)
    for step in range(80):
        problems = rng.sample(splits.pool, 16)
        prompts = [builders[k % 2].ids(p) for k, p in enumerate(problems)]
        answers = [p.answer if rng.random() < 0.5 else str(rng.randint(0, 9)) for p in problems]
        completions = [tokenizer(f"\\boxed{{{a}}}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                       for a in answers]
        loss = -sequence_logprobs(model, pack(prompts, completions, "cpu"), 1.0).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("primed-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def wait_until(predicate, what: str, timeout: float = 60):
    """Poll `predicate` until it returns something truthy (returned); errors count as "not yet" (a page still
    rendering, a store mid-write). Fails naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    """A port of this host that nothing listens on (once the probing socket is closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_entry(stage: str, *args: str, env: dict | None = None, timeout: int = 900, check: bool = True):
    """Run an entry point as a real subprocess (the way `mlflow run` does)."""
    done = subprocess.run([sys.executable, str(ROOT / "entrypoints" / f"{stage}.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"{stage} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def last_line(done) -> str:
    return done.stderr.strip().splitlines()[-1]


def runs_of(uri: str):
    import mlflow

    client = mlflow.MlflowClient(uri)
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def pytest_collection_modifyitems(items):
    """The end-to-end runs (marked slow, a minute or more each) first: with two workers stealing each other's
    queued tests (`--dist worksteal`), the short ones fill in behind them rather than one long test running alone
    at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
