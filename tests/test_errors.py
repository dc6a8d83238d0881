"""Bad input gets one clear line and a non-zero exit; numerical blow-ups keep the last good checkpoint."""
import math

import pytest
import torch
from conftest import run_entry

from grpo.config import Config
from grpo.finetune import NumericsError, finetune


def _last_line(done):
    return done.stderr.strip().splitlines()[-1]


def test_unknown_model_offline_is_one_line(store):
    done = run_entry("evaluate", "--model", "no-such-org/no-such-model", "--limit", "1", check=False,
                     env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert "cannot load model 'no-such-org/no-such-model'" in _last_line(done) and "offline?" in _last_line(done)


def test_missing_dataset_folder_is_one_line(store, tmp_path):
    done = run_entry("evaluate", "--dataset", str(tmp_path / "nowhere"), "--limit", "1", check=False)
    assert done.returncode != 0 and "nowhere/" in _last_line(done) and ".jsonl not found" in _last_line(done)


@pytest.mark.parametrize("backend", ["hf", "auto"])  # auto = vLLM where installed
def test_checkpoint_of_another_model_is_one_line(store, tiny_model_dir, backend):
    done = run_entry("evaluate", "--checkpoint", tiny_model_dir, "--limit", "1", "--backend", backend, check=False)
    assert done.returncode != 0
    assert f"checkpoint {tiny_model_dir} does not fit model smollm2-135m" in _last_line(done)


def test_missing_gguf_override_is_one_line(store, tmp_path):
    done = run_entry("evaluate", "--limit", "1", check=False,
                     env={"GRPO_SMOLLM2_GGUF": str(tmp_path / "no.gguf"), "GRPO_CACHE": str(tmp_path / "cache")})
    assert done.returncode != 0 and _last_line(done).endswith("is not a file; point it at "
                                                              "SmolLM2-135M-Instruct.Q4_1.gguf or unset it")


def test_unwritable_tracking_store_is_one_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    done = run_entry("evaluate", "--limit", "1", check=False,
                     env={"MLFLOW_TRACKING_URI": f"sqlite:///{blocked}/sub/mlflow.db"})
    assert done.returncode != 0 and "set MLFLOW_TRACKING_URI to a writable store" in _last_line(done)


def test_nan_loss_stops_and_writes_no_checkpoint(tiny_model_dir, tokenizer, tmp_path):
    prompt = tokenizer("Q: 1+1?", add_special_tokens=False)["input_ids"]
    completion = tokenizer(" \\boxed{2}", add_special_tokens=False)["input_ids"]
    row = dict(prompt_ids=prompt, completion_ids=completion, logprobs=[-1.0] * len(completion),
               ref_logprobs=[-1.0] * len(completion), advantage=math.nan)
    cfg = Config(model=tiny_model_dir, train_batch_size=1, gradient_accumulation_passes=1).validate()
    with pytest.raises(NumericsError, match="last good checkpoint"):
        finetune(cfg, [row], "", tmp_path / "ckpt", "cpu", show_progress=False)
    assert not (tmp_path / "ckpt").exists()


def test_flat_groups_get_zero_advantage_not_nan():
    from grpo.loss import group_advantages

    assert not torch.isnan(group_advantages(torch.full((3, 8), -1.0))).any()
