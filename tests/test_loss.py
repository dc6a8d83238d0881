"""GRPO maths against hand-computed values."""
import math

import pytest
import torch

from grpo.loss import group_advantages, grpo_loss, kl_k3, token_logprobs


def test_group_advantages_hand_computed():
    adv = group_advantages(torch.tensor([[1.0, 0.0, -1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    std = math.sqrt(2 / 3)  # unbiased std of (1, 0, -1, 0)
    expected = [1 / (std + 1e-4), 0.0, -1 / (std + 1e-4), 0.0]
    assert adv[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # constant group: zero, never NaN


def test_group_advantages_without_std_scaling():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, -1.0]]), scale_std=False)
    assert adv[0].tolist() == pytest.approx([1.0, 0.0, 0.0, -1.0])
    assert group_advantages(torch.tensor([[1.0]])).tolist() == [[0.0]]  # no baseline with one attempt


def test_token_logprobs_use_temperature():
    logits = torch.tensor([[[2.0, 0.0]]])
    got = token_logprobs(logits, torch.tensor([[0]]), temperature=2.0).item()
    assert got == pytest.approx(1 - math.log(math.e + 1))  # softmax([1, 0])[0]


def _batch():
    """Sequence A (advantage +1): ratios 1.5 (clipped to 1.2) and 1.0. Sequence B (advantage -2): ratio 0.9
    (inside the clip range), then a padding position holding garbage that must not count."""
    old = torch.zeros(2, 2)
    new = torch.tensor([[math.log(1.5), 0.0], [math.log(0.9), 50.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    return new, old, new.clone(), torch.tensor([1.0, -2.0]), mask


def test_loss_clipped_and_unclipped_tokens():
    new, old, ref, adv, mask = _batch()
    loss, metrics = grpo_loss(new, old, ref, adv, mask, epsilon=0.2, epsilon_high=0.2, kl_coef=0.01)
    # A: mean(1.2 * 1, 1.0 * 1) = 1.1;  B: 0.9 * -2 = -1.8;  objective = mean(1.1, -1.8) = -0.35
    assert loss.item() == pytest.approx(0.35, abs=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["ratio_max"] == pytest.approx(1.5)
    assert metrics["tokens"] == 3


def test_loss_reductions():
    new, old, ref, adv, mask = _batch()
    token_mean, _ = grpo_loss(new, old, ref, adv, mask, reduction="token_mean")
    assert token_mean.item() == pytest.approx(-(1.2 + 1.0 - 1.8) / 3, abs=1e-6)
    seq_sum, _ = grpo_loss(new, old, ref, adv, mask, reduction="seq_sum", max_tokens=4)
    assert seq_sum.item() == pytest.approx(-((2.2 / 4) + (-1.8 / 4)) / 2, abs=1e-6)


def test_negative_advantage_clips_low_ratio():
    # ratio 0.5 with A = -2: unclipped -1.0, clipped 0.8 * -2 = -1.6; the min (pessimistic) is -1.6
    loss, metrics = grpo_loss(torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), torch.zeros(1, 1),
                              torch.tensor([-2.0]), torch.ones(1, 1), kl_coef=0.0)
    assert loss.item() == pytest.approx(1.6, abs=1e-6)
    assert metrics["clip_fraction"] == 1.0


def test_kl_zero_when_policy_is_reference_and_hand_value_otherwise():
    logp = torch.randn(3, 5)
    assert kl_k3(logp, logp).abs().max().item() == 0.0
    # d = ref - new = ln 2: exp(d) - d - 1 = 1 - ln 2
    assert kl_k3(torch.zeros(1, 1), torch.full((1, 1), math.log(2))).item() == pytest.approx(1 - math.log(2))
    loss, metrics = grpo_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.full((1, 2), math.log(2)),
                              torch.zeros(1), torch.ones(1, 2), kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)), abs=1e-6)
    assert metrics["kl"] == pytest.approx(1 - math.log(2), abs=1e-6)


def test_kl_log_ratio_is_clamped():
    huge = kl_k3(torch.zeros(1, 1), torch.full((1, 1), 100.0)).item()
    assert huge == pytest.approx(math.exp(10) - 10 - 1)


def test_padding_never_counts():
    new, old, ref, adv, mask = _batch()
    loss_a, _ = grpo_loss(new, old, ref, adv, mask)
    new[1, 1], ref[1, 1], old[1, 1] = -99.0, 30.0, 7.0  # change only the padded position
    loss_b, _ = grpo_loss(new, old, ref, adv, mask)
    assert loss_a.item() == loss_b.item()
