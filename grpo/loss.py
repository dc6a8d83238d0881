"""GRPO maths as pure tensor functions (shapes in docstrings). Losses return `(loss, metrics)`."""
from __future__ import annotations

import torch

ADV_EPS = 1e-4  # the reference recipe's std epsilon
LOG_RATIO_CLAMP = 10.0


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = ADV_EPS) -> torch.Tensor:
    """rewards [G, A] (G problems x A attempts) -> advantages [G, A]: (r - mean_g) / (std_g + eps).

    std is the unbiased sample std (torch default), as in the reference; a constant group gives 0, not NaN;
    a group of one attempt has no baseline and gets 0."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    if not scale_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> logprob of each target under softmax(logits / T), [B, T] float32."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def kl_k3(new_logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = LOG_RATIO_CLAMP) -> torch.Tensor:
    """Per-token k3 estimator of KL(new || ref): exp(d) - d - 1 with d = ref - new clamped to +-clamp. [B, T]."""
    d = (ref_logp - new_logp).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def grpo_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float = 0.2, kl_coef: float = 0.01,
              reduction: str = "seq_mean", max_tokens: int | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped-surrogate GRPO loss with a k3 KL penalty.

    new_logp, old_logp, ref_logp, mask: [B, T] (mask 1 on completion tokens, 0 on prompt and padding);
    advantages: [B] one per sequence. old_logp are the sampler's logprobs (same softmax(logits / T)).
    reduction: 'seq_mean' token mean per sequence, then mean over sequences (reference);
    'token_mean' mean over every token of the batch; 'seq_sum' token sum / max_tokens, then mean.
    Returns (scalar loss to minimise, metrics of python floats)."""
    mask = mask.float()
    log_ratio = (new_logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1)
    clipped_ratio = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
    kl = kl_k3(new_logp, ref_logp)
    per_token = surrogate - kl_coef * kl
    if reduction == "seq_mean":
        objective = masked_mean(per_token, mask, dim=-1).mean()
    elif reduction == "token_mean":
        objective = masked_mean(per_token, mask)
    elif reduction == "seq_sum":
        objective = ((per_token * mask).sum(-1) / (max_tokens or mask.shape[-1])).mean()
    else:
        raise ValueError(f"unknown reduction {reduction!r}")
    with torch.no_grad():
        clipped = (ratio * adv != surrogate) & mask.bool()
        metrics = {
            "kl": masked_mean(kl, mask).item(),
            "clip_fraction": masked_mean(clipped.float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "ratio_max": ratio.masked_fill(~mask.bool(), 0).max().item() if mask.any() else 0.0,
            "tokens": mask.sum().item(),
        }
    return -objective, metrics
