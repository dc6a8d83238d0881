"""The engines' logprobs must describe the distribution the trainer scores (softmax(logits / T)), and new
weights must really be served."""
import pytest
import torch

from grpo.engines import publish
from grpo.engines.base import Probe, served_weights_match
from grpo.engines.torch_engine import TorchEngine
from grpo.model import load_model
from grpo.scoring import score_completions
from grpo.tasks.gsm8k import PromptBuilder, load_splits


def _prompts(tokenizer, count):
    splits = load_splits("bundled")
    builder = PromptBuilder(tokenizer, "", 0, splits.exemplars)  # prompts of different lengths: padding is exercised
    return [builder.ids(p) for p in splits.pool[:count]]


def _gaps(model, outputs, prompts, temperature):
    flat = [(p, c) for p, group in zip(prompts, outputs) for c in group]
    rescored = score_completions(model, [p for p, _ in flat], [c.token_ids for _, c in flat], temperature)
    return torch.tensor([abs(a - b) for (_, c), r in zip(flat, rescored) for a, b in zip(c.logprobs, r)])


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_real_smollm2_sampler_matches_trainer(smollm2_dir, tokenizer, temperature, monkeypatch):
    monkeypatch.setenv("GRPO_CPU_BF16", "0")  # both sides float32
    model = load_model(smollm2_dir, "cpu", dtype=torch.float32)
    engine = TorchEngine(model, tokenizer, batch_size=8, progress=False)
    prompts = _prompts(tokenizer, 3)
    outputs = engine.generate(prompts, 3, temperature, 24, seed=1)
    assert all(len(group) == 3 for group in outputs)
    gaps = _gaps(model, outputs, prompts, temperature)
    assert gaps.mean().item() < 1e-3 and gaps.max().item() < 1e-2  # the first step's importance ratio is ~1


def test_tiny_model_stops_and_flags_truncation(tiny_model_dir, tokenizer):
    engine = TorchEngine(load_model(tiny_model_dir, "cpu", dtype=torch.float32), tokenizer, 4, progress=False)
    outputs = engine.generate(_prompts(tokenizer, 2), 2, 1.0, 6, seed=0)
    for group in outputs:
        for c in group:
            ended = c.token_ids[-1] in engine.stop_ids
            assert c.truncated == (not ended) and len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0 for lp in c.logprobs)
    assert engine.stats.tokens == sum(len(c.token_ids) for g in outputs for c in g)


def test_greedy_is_deterministic_and_matches_argmax(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
    engine = TorchEngine(model, tokenizer, 4, progress=False)
    prompts = _prompts(tokenizer, 2)
    first = engine.generate(prompts, 1, 0.0, 5)
    again = engine.generate(prompts, 1, 0.0, 5, seed=123)
    assert [c.token_ids for g in first for c in g] == [c.token_ids for g in again for c in g]
    assert first[0][0].token_ids[0] == model(input_ids=torch.tensor([prompts[0]])).logits[0, -1].argmax().item()
    a, b = (engine.generate(prompts, 2, 1.0, 5, seed=7) for _ in range(2))
    assert [c.token_ids for g in a for c in g] == [c.token_ids for g in b for c in g]  # seeded sampling repeats


def test_new_weights_are_served_and_checked_on_the_probe(tiny_model_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("GRPO_CPU_BF16", "0")  # the trainer's probe is float32, as is this engine
    engine = TorchEngine(load_model(tiny_model_dir, "cpu", dtype=torch.float32), tokenizer, 4, progress=False)
    probe = Probe(_prompts(tokenizer, 1)[0], tokenizer(" \\boxed{4}", add_special_tokens=False)["input_ids"])
    trained = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    new = score_completions(trained, [probe.prompt], [probe.completion], 1.0)[0]
    assert not served_weights_match(engine.probe_logprobs(probe), new, engine.tolerance)  # stale
    report = publish(engine, trained.named_parameters, 3, probe, new)
    assert served_weights_match(engine.probe_logprobs(probe), new, engine.tolerance) and engine.version == 3
    assert report["engine_rebuilt"] == 0 and report["probe_gap"] < 1e-3


def test_served_weights_match_within_the_serving_precision():
    assert served_weights_match([-1.0, -2.0], [-1.0, -2.0005], 1e-3)
    assert not served_weights_match([-1.0, -2.0], [-1.5, -2.0], 1e-3)
    assert served_weights_match([-1.0, -2.0], [-1.08, -2.0], 0.05) and not served_weights_match([-1.0], [-1.2], 0.05)


def test_the_trainer_probes_in_the_precision_the_engine_serves(tiny_model_dir, tokenizer):
    """The probe check compares the engine with the trainer's weights as the engine serves them. A policy sharpened
    far from its start (every weight scaled up, as long GRPO runs sharpen it) served in bf16 matches the trainer's
    probe with its weights rounded to bf16 closely, and not its float32 or autocast probe (on a GPU, autocast's
    gap grew past the tolerance after 60-90 iterations and stopped correct runs)."""
    from grpo.config import Optim
    from grpo.engines.base import probe_gap
    from grpo.trainer import Trainer

    trainer = Trainer(tiny_model_dir, Optim(), "cpu")
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.mul_(2.5)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    engine = TorchEngine(load_model(tiny_model_dir, "cpu", dtype=torch.bfloat16), tokenizer, 4, progress=False)
    engine.update_weights(trainer.named_weights(), 1)
    probe = Probe(_prompts(tokenizer, 1)[0], tokenizer(" so the answer is \\boxed{42}", add_special_tokens=False)
                  ["input_ids"])
    served = engine.probe_logprobs(probe)
    rounded, exact = trainer.probe_logprobs(probe, torch.bfloat16), trainer.probe_logprobs(probe, torch.float32)
    assert probe_gap(served, rounded) < 0.25 * probe_gap(served, exact), (probe_gap(served, rounded),
                                                                          probe_gap(served, exact))
    for name, p in trainer.model.named_parameters():  # the trainer's float32 weights are untouched
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name


def test_generation_out_of_memory_halves_the_chunks_and_goes_on(tiny_model_dir, tokenizer, monkeypatch):
    """A chunk that runs out of memory is retried with half the prompts, and later calls keep the smaller size:
    the same completions as an engine sized that small from the start (the failed chunk drew no random numbers)."""
    prompts = _prompts(tokenizer, 6)
    small = TorchEngine(load_model(tiny_model_dir, "cpu"), tokenizer, 2, progress=False)
    expected = small.generate(prompts, 2, 1.0, 6, seed=3)
    engine = TorchEngine(load_model(tiny_model_dir, "cpu"), tokenizer, 16, progress=False)
    monkeypatch.setenv("GRPO_FAILPOINT", "oom-above:4")
    with pytest.warns(RuntimeWarning, match="ran out of memory; going on with 6") as seen:
        got = engine.generate(prompts, 2, 1.0, 6, seed=3)
    assert len(seen) == 2 and engine.batch_size == 2  # 6 prompts x 2 -> 3 x 2 -> 1 x 2 rows
    assert [c.token_ids for g in got for c in g] == [c.token_ids for g in expected for c in g]
    monkeypatch.setenv("GRPO_FAILPOINT", "oom-above:0")
    with pytest.raises(torch.OutOfMemoryError):  # one prompt that does not fit: nothing left to halve
        engine.generate(prompts[:1], 1, 0.0, 6)
    assert engine.batch_size == 2


def test_static_cache_path_matches_the_dynamic_loop_with_one_buffer(smollm2_dir, tokenizer, monkeypatch):
    """The GPU sampler's path (one KV buffer; each prompt's prefill copied into its n rows; attention over the
    buffer's filled part), run on the CPU without CUDA graphs: the dynamic loop's greedy tokens and logprobs,
    sampled logprobs the trainer agrees with, and one buffer for calls whose chunks differ in prompt width,
    reserved before the first prefill (grown for the widest chunk, which comes last, it once ran an 80 GB card out
    of memory)."""
    from grpo.engines import static_decode
    from grpo.engines.static_decode import StaticDecoder

    monkeypatch.setattr(static_decode, "SPAN", 4)  # attention's reach grows every 4 steps: crossed mid-completion
    monkeypatch.setenv("GRPO_CPU_BF16", "0")
    model = load_model(smollm2_dir, "cpu", dtype=torch.float32)  # the real model: each prompt leads elsewhere
    prompts = sorted(_prompts(tokenizer, 40), key=len)
    prompts = prompts[:2] + prompts[-2:]  # chunks of 2 prompts: the short ones, then the long ones
    assert len({-(-len(p) // 64) for p in prompts}) > 1, "the prompts must span several widths"
    dynamic = TorchEngine(model, tokenizer, 4, progress=False)
    static = TorchEngine(model, tokenizer, 4, progress=False)
    static.static = StaticDecoder(model, 4)
    expected = dynamic.generate(prompts, 2, 0.0, 6)
    got = static.generate(prompts, 2, 0.0, 6)
    assert len({tuple(g[0].token_ids) for g in expected}) > 1
    assert [c.token_ids for g in got for c in g] == [c.token_ids for g in expected for c in g]
    gaps = [abs(a - b) for g, h in zip(got, expected) for c, d in zip(g, h) for a, b in zip(c.logprobs, d.logprobs)]
    assert max(gaps) < 1e-4
    sampled = static.generate(prompts, 2, 1.0, 6, seed=5)
    assert len({tuple(c.token_ids) for g in sampled for c in g}) > len(prompts)  # rows of one prompt differ
    gaps = _gaps(model, sampled, prompts, 1.0)  # every row decoded its own prompt's cache
    assert gaps.mean().item() < 1e-3 and gaps.max().item() < 1e-2
    buffer = static.static.buffer
    assert static.static.allocations == 1  # sized for 2 x 2 rows of the widest chunk before any prefill
    static.generate(prompts[:2], 2, 1.0, 6, seed=5)
    assert static.static.allocations == 1 and static.static.buffer is buffer

    # rows that stop at different steps (a token greedy decoding emits early, made a stop token): the static path
    # decodes past a row's stop and cuts it after; the dynamic loop drops the row
    dynamic.stop_ids = static.stop_ids = [expected[0][0].token_ids[1]]
    want, cut = dynamic.generate(prompts, 2, 0.0, 10), static.generate(prompts, 2, 0.0, 10)
    assert [(c.token_ids, c.truncated) for g in cut for c in g] == [(c.token_ids, c.truncated) for g in want for c in g]
    assert {c.truncated for g in want for c in g} == {True, False}

    # new weights copied into the parameters (a hand-over) reach the fused projections the static step reads
    dynamic.stop_ids = static.stop_ids = []
    generator = torch.Generator().manual_seed(0)
    static.update_weights([(name, p + 0.02 * torch.randn(p.shape, generator=generator))
                           for name, p in model.named_parameters() if "_proj" in name], 1)
    moved = dynamic.generate(prompts, 2, 0.0, 6)
    assert [c.token_ids for g in moved for c in g] != [c.token_ids for g in expected for c in g]
    assert [c.token_ids for g in static.generate(prompts, 2, 0.0, 6) for c in g] == \
        [c.token_ids for g in moved for c in g]


def test_sampling_draws_what_torch_multinomial_draws_and_nan_logits_stop_the_call(tiny_model_dir, tokenizer):
    """`draw` is multinomial's own one-sample method without its per-step checks: the same tokens for the same
    generator; a model gone NaN is caught once per call instead, as a NumericsError."""
    from grpo.engines.base import draw
    from grpo.errors import NumericsError

    logits = torch.randn(64, 500) * 3
    for temperature in (0.7, 1.0):
        token, logp = draw(logits, temperature, torch.Generator().manual_seed(4))
        probs = torch.softmax(logits / temperature, -1)
        assert torch.equal(token, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(4))[:, 0])
        assert torch.allclose(logp, probs.gather(-1, token[:, None])[:, 0].log(), atol=1e-5)
    engine = TorchEngine(load_model(tiny_model_dir, "cpu", dtype=torch.float32), tokenizer, 4, progress=False)
    with torch.no_grad():
        engine.model.lm_head.weight[7] = float("nan")
    with pytest.raises(NumericsError, match="NaN"):
        engine.generate(_prompts(tokenizer, 2), 2, 1.0, 4)
