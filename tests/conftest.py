"""Shared fixtures: a real MLflow SQLite store per test, the real SmolLM2 tokenizer, and a tiny randomly
initialised Llama built on it (fast enough to train and sample on 2 cores)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a hub; fail fast instead of retrying


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store; the test runs inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Llama with random weights and the real SmolLM2 tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
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


def run_entry(stage: str, *args: str, env: dict | None = None, timeout: int = 900, check: bool = True):
    """Run an entry point as a real subprocess (the way `mlflow run` does)."""
    done = subprocess.run([sys.executable, str(ROOT / "entrypoints" / f"{stage}.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and done.returncode:
        raise AssertionError(f"{stage} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done
