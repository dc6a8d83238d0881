"""GRPO maths as pure tensor functions (shapes in docstrings). The loss returns `(loss, metrics)`.

Tokens are flat: a micro-batch is the completion tokens of its sequences concatenated, N tokens in all, with
`seq` [N] naming the sequence (0..B-1) each token belongs to. How the per-token objective is averaged is a
separate step (`token_weights`): its weights are normalised by the whole optimiser step (all its micro-batches),
so the gradient does not depend on how the step is cut into micro-batches."""
from __future__ import annotations

import torch

ADV_EPS = 1e-4  # the reference recipe's std epsilon
LOG_RATIO_CLAMP = 10.0


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = ADV_EPS) -> torch.Tensor:
    """rewards [G, A] (G problems x A attempts) -> advantages [G, A]: (r - mean_g) / (std_g + eps).

    std is the unbiased sample std (torch default), as in the reference; a constant group gives 0, not NaN;
    a group of one attempt has no baseline and gets 0. scale_std=False: centred rewards only (Dr. GRPO)."""
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: float) -> torch.Tensor:
    """DAPO's soft overlong penalty. lengths [B] completion tokens -> [B] in [0, 1]: 0 up to max_tokens - L,
    then rising linearly to 1 at max_tokens, where L = buffer x max_tokens (buffer in (0, 1))."""
    free = max_tokens * (1 - buffer)
    return ((lengths.float() - free) / (max_tokens - free)).clamp(0.0, 1.0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [..., V], targets [...] -> logprob of each target under softmax(logits / T), [...] float32."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def kl_k3(new_logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = LOG_RATIO_CLAMP) -> torch.Tensor:
    """Per-token k3 estimator of KL(new || ref): exp(d) - d - 1 with d = ref - new clamped to +-clamp."""
    d = (ref_logp - new_logp).clamp(-clamp, clamp)
    return torch.exp(d) - d - 1


def token_weights(seq: torch.Tensor, seq_tokens: torch.Tensor, reduction: str, step_sequences: int,
                  step_tokens: int, max_tokens: int) -> torch.Tensor:
    """Weight of each token in the optimiser step's objective, [N].

    seq [N]: sequence index of each token; seq_tokens [B]: completion tokens of each sequence of the micro-batch;
    step_sequences / step_tokens: sequences / completion tokens of the whole optimiser step.
    'seq_mean': 1 / (tokens of its sequence * step_sequences) (token mean per sequence, then mean; reference);
    'token_mean': 1 / step_tokens; 'seq_sum': 1 / (max_tokens * step_sequences) (Dr. GRPO's constant)."""
    if reduction == "seq_mean":
        return 1.0 / (seq_tokens[seq].float() * step_sequences)
    if reduction == "token_mean":
        return torch.full(seq.shape, 1.0 / step_tokens, device=seq.device)
    if reduction == "seq_sum":
        return torch.full(seq.shape, 1.0 / (max_tokens * step_sequences), device=seq.device)
    raise ValueError(f"unknown reduction {reduction!r}")


def grpo_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              weights: torch.Tensor, epsilon: float = 0.2, epsilon_high: float = 0.2, kl_coef: float = 0.01,
              is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped-surrogate GRPO loss with a k3 KL penalty, for one micro-batch.

    new_logp, old_logp, ref_logp, advantages, weights: [N] per completion token (advantages repeated over the
    tokens of their sequence; weights from `token_weights`). old_logp is the ratio's old policy: the sampler's
    logprobs under the same softmax(logits / T), or the trainer's own before its first update. is_weight [N]
    (optional, no gradient): truncated importance weight min(p_old / p_sampler, C) multiplying the surrogate.
    ref_logp None (no reference model: kl_coef must be 0): no KL term, and no kl_sum among the metrics.
    Returns (loss to minimise = -sum(weights * objective), metrics as sums over the tokens, so that the
    trainer can add them over micro-batches: kl_sum, clipped, ratio_sum, ratio_max as 0-d tensors, tokens)."""
    log_ratio = (new_logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    if is_weight is not None:
        surrogate = surrogate * is_weight
    if ref_logp is None and kl_coef:
        raise ValueError(f"kl_coef={kl_coef} needs reference logprobs")
    kl = None if ref_logp is None else kl_k3(new_logp, ref_logp)
    objective = surrogate if kl is None else surrogate - kl_coef * kl
    loss = -(objective * weights).sum()
    with torch.no_grad():  # 0-d tensors: summing them over micro-batches needs no host sync
        metrics = {
            **({} if kl is None else {"kl_sum": kl.sum()}),
            "clipped": (clipped < unclipped).sum(),  # the clip decided the token's objective
            "ratio_sum": ratio.sum(),
            "ratio_max": ratio.max() if ratio.numel() else ratio.new_zeros(()),
            "tokens": ratio.numel(),
        }
    return loss, metrics


def truncated_is_weight(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(p_trainer / p_sampler, cap) per token, [N], no gradient: corrects for the engine sampling from a
    slightly different distribution than the trainer computes (precision, kernels)."""
    return torch.exp((trainer_logp - sampler_logp).clamp(max=LOG_RATIO_CLAMP)).clamp(max=cap).detach()
