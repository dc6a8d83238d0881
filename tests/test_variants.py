"""GRPO variants users ask for, against hand values: DAPO's soft overlong penalty and dynamic sampling, and the
variants' place in the sweep's search space."""
import pytest
import torch

from grpo.config import Config, Sampling, Scoring
from grpo.engines.torch_engine import TorchEngine
from grpo.errors import ConfigError
from grpo.loss import overlong_penalty
from grpo.model import load_model
from grpo.stages import annotate, rollout, training_rewards
from grpo.tasks.gsm8k import PromptBuilder, load_splits


def test_overlong_penalty_hand_values():
    # max 100 tokens, buffer 0.2: free up to 80, then 1/20 per token, 1 at the limit
    lengths = torch.tensor([10, 80, 81, 90, 99, 100])
    expected = torch.tensor([0.0, 0.0, 0.05, 0.5, 0.95, 1.0])
    assert torch.allclose(overlong_penalty(lengths, 100, 0.2), expected)


def _row(completion: str, tokens: int, truncated: bool, reward: float, group: int = 0) -> dict:
    return dict(completion=completion, gold="4", completion_ids=[7] * tokens, truncated=truncated, reward=reward,
                max_new_tokens=100, prompt_ids=[1, 2], logprobs=[-0.5] * tokens, temperature=1.0, iteration=0,
                group=group)


def test_overlong_rewards_score_cut_completions_and_subtract_the_penalty():
    rows = [_row("so \\boxed{4}", 50, False, 1.0),  # short and right: +1
            _row("so \\boxed{4} and more", 90, False, 1.0),  # right, half-way into the buffer: 1 - 0.5
            _row("\\boxed{4} then rambling", 100, True, -1.0),  # cut at the limit but boxed right: 1 - 1
            _row("\\boxed{5}", 85, False, 0.0),  # wrong: 0 - 0.25
            _row("no answer", 100, True, -1.0)]  # cut and nothing boxed: -1 - 1
    assert training_rewards(rows, 0.0) == [1.0, 1.0, -1.0, 0.0, -1.0]  # off: rollout's rewards
    assert training_rewards(rows, 0.2) == pytest.approx([1.0, 0.5, 0.0, -0.25, -2.0])


def test_annotate_trains_on_the_shaped_rewards(tiny_model_dir):
    reference = load_model(tiny_model_dir, "cpu", dtype=torch.float32)
    rows = [_row("\\boxed{4} then rambling", 100, True, -1.0), _row("\\boxed{4}", 20, False, 1.0),
            _row("x", 100, True, -1.0), _row("y", 100, True, -1.0, group=1), _row("z", 100, True, -1.0, group=1),
            _row("\\boxed{4}", 100, True, -1.0, group=1)]
    annotated, metrics = annotate(rows, reference, Scoring(overlong_buffer=0.2))
    assert [r["train_reward"] for r in annotated] == pytest.approx([0.0, 1.0, -2.0, -2.0, -2.0, 0.0])
    assert metrics["shaped_reward_mean"] == pytest.approx(-5 / 6)
    assert metrics["groups_without_signal"] == 0  # group 1 is flat under the -1 rule, not under the penalty
    centred = torch.tensor([0.0, 1.0, -2.0]) - torch.tensor([0.0, 1.0, -2.0]).mean()
    assert [r["advantage"] for r in annotated[:3]] == pytest.approx((centred / (centred.std() + 1e-4)).tolist())


def test_overlong_buffer_is_a_share_below_one():
    with pytest.raises(ConfigError, match="overlong_buffer"):
        Config().replace(overlong_buffer=1.0)


@pytest.mark.parametrize("max_draws", [1, 3])
def test_dynamic_sampling_keeps_groups_with_signal(primed_model_dir, tokenizer, digits_dataset, max_draws):
    splits = load_splits(digits_dataset)
    engine = TorchEngine(load_model(primed_model_dir, "cpu", dtype=torch.float32), tokenizer, 32, progress=False)
    builder = PromptBuilder(tokenizer, "", 0, splits.exemplars)
    sampling = Sampling(problems=6, attempts=3, temperature=1.0, max_draws=max_draws)
    rows, metrics = rollout(engine, builder, splits.pool, sampling, 8, iteration=0, seed=0, model="m")
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    assert sorted(groups) == list(range(6)) and all(len(g) == 3 for g in groups.values())
    assert len({g[0]["problem_id"] for g in groups.values()}) == 6  # no problem twice
    with_signal = [len({r["reward"] for r in g}) > 1 for g in groups.values()]
    if max_draws == 1:
        assert "draws" not in metrics
        return
    found = metrics["signal_groups_found"]
    assert 1 <= metrics["draws"] <= 3 and metrics["groups_sampled"] >= 6
    assert sum(with_signal) == min(found, 6) == metrics["signal_groups_kept"]
    assert metrics["draws"] == 3 or found >= 6  # it stops drawing only when the batch is full of signal
    assert metrics["generated_tokens"] >= sum(len(r["completion_ids"]) for r in rows)
    first, _ = rollout(engine, builder, splits.pool, Sampling(problems=6, attempts=3, temperature=1.0), 8, 0, 0, "m")
    assert found >= sum(len({r["reward"] for r in first[k:k + 3]}) > 1 for k in range(0, 18, 3))


def test_variants_are_in_the_search_space_and_drawn_as_their_types(tmp_path):
    import optuna

    from grpo.sweep import suggest

    cfg = Config().replace(search="scale_std,loss_reduction,kl_coef,epsilon_high,overlong_buffer,max_draws")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", sampler=optuna.samplers.RandomSampler(0))
    drawn = [suggest(study.ask(), cfg) for _ in range(12)]
    assert {d.scoring.scale_std for d in drawn} == {True, False}
    assert {d.optim.loss_reduction for d in drawn} <= {"seq_mean", "token_mean", "seq_sum"}
    assert {d.optim.kl_coef for d in drawn} <= {0.0, 0.001, 0.01, 0.04} and 0.0 in {d.optim.kl_coef for d in drawn}
    assert all(0.2 <= d.optim.epsilon_high <= 0.3 and 1 <= d.sampling.max_draws <= 4 for d in drawn)


def test_annotate_without_a_reference_marks_the_rows_to_train_and_scores_none():
    rows = [_row("\\boxed{4}", 20, False, 1.0), _row("x", 30, False, 0.0),
            _row("y", 100, True, -1.0, group=1), _row("z", 100, True, -1.0, group=1)]
    annotated, metrics = annotate(rows, None, Scoring(drop_flat_groups=True))
    assert [(r["train"], r["ref_logprobs"]) for r in annotated] == [(True, None), (True, None), (False, None),
                                                                    (False, None)]
    assert metrics["groups_without_signal"] == 1 and "sampler_ref_logprob_gap" not in metrics
