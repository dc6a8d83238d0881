"""GRPO maths against hand-computed values."""
import math

import pytest
import torch

from grpo.loss import group_advantages, grpo_loss, kl_k3, token_logprobs, token_weights, truncated_is_weight


def test_group_advantages_hand_computed():
    adv = group_advantages(torch.tensor([[1.0, 0.0, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    std = math.sqrt(2 / 3)  # unbiased std of (1, 0, -1, 0)
    expected = [1 / (std + 1e-4), 0.0, -1 / (std + 1e-4), 0.0]
    assert adv[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # constant group: zero, never NaN
    assert not torch.isnan(group_advantages(torch.full((3, 8), -1.0))).any()


def test_group_advantages_without_std_scaling():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, -1.0]]), scale_std=False)
    assert adv[0].tolist() == pytest.approx([1.0, 0.0, 0.0, -1.0])
    assert group_advantages(torch.tensor([[1.0]])).tolist() == [[0.0]]  # no baseline with one attempt


def test_token_logprobs_use_temperature():
    got = token_logprobs(torch.tensor([[[2.0, 0.0]]]), torch.tensor([[0]]), temperature=2.0).item()
    assert got == pytest.approx(1 - math.log(math.e + 1))  # softmax([1, 0])[0]


def _batch():
    """Sequence 0 (advantage +1): ratios 1.5 (clipped to 1.2) and 1.0. Sequence 1 (advantage -2): ratio 0.9
    (inside the clip range). Flat tokens: [a0, a1, b0]."""
    new = torch.tensor([math.log(1.5), 0.0, math.log(0.9)])
    seq = torch.tensor([0, 0, 1])
    return new, torch.zeros(3), new.clone(), torch.tensor([1.0, 1.0, -2.0]), seq, torch.tensor([2, 1])


def test_loss_clipped_and_unclipped_tokens():
    new, old, ref, adv, seq, lengths = _batch()
    weights = token_weights(seq, lengths, "seq_mean", step_sequences=2, step_tokens=3, max_tokens=4)
    assert weights.tolist() == pytest.approx([0.25, 0.25, 0.5])
    loss, m = grpo_loss(new, old, ref, adv, weights, epsilon=0.2, epsilon_high=0.2, kl_coef=0.01)
    # A: mean(1.2 * 1, 1.0 * 1) = 1.1;  B: 0.9 * -2 = -1.8;  objective = mean(1.1, -1.8) = -0.35
    assert loss.item() == pytest.approx(0.35, abs=1e-6)
    assert (m["clipped"], m["tokens"]) == (1, 3) and m["ratio_max"] == pytest.approx(1.5)
    assert m["kl_sum"] == pytest.approx(0.0, abs=1e-7) and m["ratio_sum"] == pytest.approx(3.4)


def test_loss_reductions_are_normalised_by_the_whole_step():
    new, old, ref, adv, seq, lengths = _batch()
    token_mean = token_weights(seq, lengths, "token_mean", 2, 3, 4)
    loss, _ = grpo_loss(new, old, ref, adv, token_mean)
    assert loss.item() == pytest.approx(-(1.2 + 1.0 - 1.8) / 3, abs=1e-6)
    seq_sum = token_weights(seq, lengths, "seq_sum", 2, 3, 4)
    loss, _ = grpo_loss(new, old, ref, adv, seq_sum)
    assert loss.item() == pytest.approx(-((2.2 / 4) + (-1.8 / 4)) / 2, abs=1e-6)
    # the same two sequences as one micro-batch each, normalised by the step: the two losses add up to the one
    halves = [grpo_loss(new[s], old[s], ref[s], adv[s], token_weights(seq[s] - seq[s][0], lengths[i:i + 1],
                                                                       "seq_mean", 2, 3, 4))[0].item()
              for i, s in enumerate((slice(0, 2), slice(2, 3)))]
    assert sum(halves) == pytest.approx(0.35, abs=1e-6)


def test_negative_advantage_clips_low_ratio():
    # ratio 0.5 with A = -2: unclipped -1.0, clipped 0.8 * -2 = -1.6; the min (pessimistic) is -1.6
    loss, m = grpo_loss(torch.tensor([math.log(0.5)]), torch.zeros(1), torch.zeros(1), torch.tensor([-2.0]),
                        torch.ones(1), kl_coef=0.0)
    assert loss.item() == pytest.approx(1.6, abs=1e-6) and m["clipped"] == 1


def test_clip_higher_widens_only_the_upper_bound():
    loss, m = grpo_loss(torch.tensor([math.log(1.25)]), torch.zeros(1), torch.zeros(1), torch.tensor([1.0]),
                        torch.ones(1), epsilon=0.2, epsilon_high=0.28, kl_coef=0.0)
    assert loss.item() == pytest.approx(-1.25) and m["clipped"] == 0


def test_kl_zero_when_policy_is_reference_and_hand_value_otherwise():
    logp = torch.randn(3, 5)
    assert kl_k3(logp, logp).abs().max().item() == 0.0
    # d = ref - new = ln 2: exp(d) - d - 1 = 1 - ln 2
    assert kl_k3(torch.zeros(1), torch.full((1,), math.log(2))).item() == pytest.approx(1 - math.log(2))
    loss, m = grpo_loss(torch.zeros(2), torch.zeros(2), torch.full((2,), math.log(2)), torch.zeros(2),
                        torch.full((2,), 0.5), kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)), abs=1e-6)
    assert m["kl_sum"] / m["tokens"] == pytest.approx(1 - math.log(2), abs=1e-6)
    assert kl_k3(torch.zeros(1), torch.full((1,), 100.0)).item() == pytest.approx(math.exp(10) - 10 - 1)  # clamped


def test_truncated_importance_weight():
    trainer, sampler = torch.log(torch.tensor([0.5, 0.2, 0.9])), torch.log(torch.tensor([0.25, 0.4, 0.1]))
    assert truncated_is_weight(trainer, sampler, cap=2.0).tolist() == pytest.approx([2.0, 0.5, 2.0])
    loss, _ = grpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.tensor([1.0]), torch.ones(1),
                        kl_coef=0.0, is_weight=torch.tensor([0.5]))
    assert loss.item() == pytest.approx(-0.5)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_chunked_logprobs_match_the_full_softmax_with_gradients(monkeypatch, temperature):
    from grpo import scoring

    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", 3000)  # several chunks of 3 tokens over a 1000-word vocabulary
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1000, 16, dtype=torch.float64, requires_grad=True)
    targets, grad = torch.randint(0, 1000, (10,)), torch.randn(10, dtype=torch.float64)
    chunked = scoring.chunked_logprobs(hidden, weight, targets, temperature)
    (chunked.double() * grad).sum().backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = token_logprobs(hidden @ weight.T, targets, temperature)
    (full.double() * grad).sum().backward()
    assert (chunked.double() - full.double()).abs().max() < 1e-6
    assert (got[0] - hidden.grad).abs().max() < 1e-6 and (got[1] - weight.grad).abs().max() < 1e-6


def test_no_reference_drops_the_kl_term_and_its_metric():
    new = torch.tensor([math.log(0.5), math.log(1.5)], requires_grad=True)
    args = (torch.zeros(2), None, torch.tensor([1.0, -1.0]), torch.full((2,), 0.5))
    loss, m = grpo_loss(new, *args, kl_coef=0.0)
    # ratios 0.5 and 1.5 clip to 0.8 (A = +1: min(0.5, 0.8) = 0.5) and 1.2 (A = -1: min(-1.5, -1.2) = -1.5)
    assert loss.item() == pytest.approx(-0.5 * (0.5 - 1.5)) and "kl_sum" not in m and m["clipped"] == 0
    with_ref, _ = grpo_loss(new, torch.zeros(2), torch.zeros(2), *args[2:], kl_coef=0.0)
    assert loss.item() == with_ref.item()
    with pytest.raises(ValueError, match="kl_coef=0.01 needs reference logprobs"):
        grpo_loss(new, *args, kl_coef=0.01)
