"""The sampler's logprobs must describe the distribution the trainer scores: softmax(logits / T)."""
import pytest
import torch

from grpo.data import PromptBuilder, load_split
from grpo.model import load_model
from grpo.sampling import HFSampler
from grpo.scoring import score_completions


def _prompts(tokenizer, count):
    train = load_split("bundled", "train")
    builder = PromptBuilder(tokenizer, "", 0, train)  # prompts of different lengths: left padding is exercised
    return [builder.ids(p) for p in train[:count]]


def _parity(model, tokenizer, temperature, n=3, max_new_tokens=24):
    sampler = HFSampler(model, tokenizer, batch_size=8, show_progress=False)
    prompts = _prompts(tokenizer, 3)
    outputs = sampler.generate(prompts, n, temperature, max_new_tokens, seed=1)
    flat_prompts = [p for p, group in zip(prompts, outputs) for _ in group]
    flat = [c for group in outputs for c in group]
    rescored = score_completions(model, flat_prompts, [c.token_ids for c in flat], tokenizer.pad_token_id,
                                 temperature)
    diffs = torch.tensor([abs(a - b) for c, r in zip(flat, rescored) for a, b in zip(c.logprobs, r)])
    ratios = torch.exp(torch.tensor([a - b for c, r in zip(flat, rescored) for a, b in zip(r, c.logprobs)]))
    return outputs, diffs, ratios


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_real_smollm2_sampler_matches_trainer(smollm2_dir, tokenizer, temperature):
    model = load_model(smollm2_dir, "cpu", dtype=torch.float32)
    outputs, diffs, ratios = _parity(model, tokenizer, temperature)
    assert all(len(group) == 3 for group in outputs)
    assert diffs.mean().item() < 1e-3 and diffs.max().item() < 1e-2
    assert (ratios - 1).abs().max().item() < 1e-2  # the first step's importance ratio is ~1


def test_tiny_model_stops_and_flags_truncation(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
    sampler = HFSampler(model, tokenizer, batch_size=4, show_progress=False)
    outputs = sampler.generate(_prompts(tokenizer, 2), 2, 1.0, 6, seed=0)
    for group in outputs:
        for c in group:
            ended = c.token_ids[-1] in sampler.stop_ids
            assert c.truncated == (not ended) and len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
    assert sampler.stats.tokens == sum(len(c.token_ids) for g in outputs for c in g)


def test_greedy_is_deterministic_and_matches_argmax(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
    sampler = HFSampler(model, tokenizer, batch_size=4, show_progress=False)
    prompts = _prompts(tokenizer, 2)
    first = sampler.generate(prompts, 1, 0.0, 5)
    again = sampler.generate(prompts, 1, 0.0, 5, seed=123)
    assert [c.token_ids for g in first for c in g] == [c.token_ids for g in again for c in g]
    ids = torch.tensor([prompts[0]])
    expected = model(input_ids=ids).logits[0, -1].argmax().item()
    assert first[0][0].token_ids[0] == expected


def test_seeded_sampling_is_reproducible(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
    sampler = HFSampler(model, tokenizer, batch_size=4, show_progress=False)
    prompts = _prompts(tokenizer, 2)
    a = sampler.generate(prompts, 2, 1.0, 5, seed=7)
    b = sampler.generate(prompts, 2, 1.0, 5, seed=7)
    assert [c.token_ids for g in a for c in g] == [c.token_ids for g in b for c in g]
