"""What every rollout engine is: generate completions with the logprob of each sampled token, take new weights
in memory, and say which weights it serves. The engines (`torch_engine`, `vllm_engine`) build on this module
only; `grpo.engines.make_engine` picks one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token under softmax(logits / T), the distribution sampled from
    truncated: bool  # hit max_new_tokens before an end-of-sequence token


@dataclass
class GenerationStats:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Probe:
    """A fixed (prompt, completion) whose logprobs, computed by the trainer for the weights it hands over,
    tell whether the engine really serves those weights."""
    prompt: list[int]
    completion: list[int]


class Engine(Protocol):
    name: str
    stats: GenerationStats
    version: int  # iterations trained into the weights it serves (0 = the starting weights)

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_new_tokens: int,
                 seed: int = 0) -> list[list[Completion]]: ...

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Copy new weights (HF parameter names) into the served model, in place."""

    def probe_logprobs(self, probe: Probe) -> list[float]:
        """Logprobs of the probe's completion tokens (T = 1) under the weights served now."""

    def release(self) -> None:
        """Free what generation holds beyond the weights (KV cache), e.g. while the trainer works."""


def served_weights_match(served: list[float], new: list[float], tolerance: float) -> bool:
    """The engine serves the new weights if its probe logprobs are, on average over the probe's tokens, within
    `tolerance` (the serving precision's noise: 1e-3 in float32, 0.05 in bf16) of the trainer's for them."""
    return probe_gap(served, new) <= tolerance


def probe_gap(served: list[float], new: list[float]) -> float:
    """Mean |served - expected| logprob over the probe's tokens."""
    return sum(abs(x - y) for x, y in zip(served, new)) / max(len(new), 1)


def stop_ids(model_config_eos, tokenizer) -> list[int]:
    ids = model_config_eos if isinstance(model_config_eos, list) else [model_config_eos]
    return sorted(i for i in set(ids) | {tokenizer.eos_token_id} if i is not None)


def draw(logits, temperature: float, generator):
    """Next token and its logprob under softmax(logits / T); T = 0 is greedy. logits [rows, V] float32.

    Sampling is torch.multinomial's own method for one draw, argmax(p / q) with q ~ Exp(1), the same tokens for
    the same generator, without its validity checks (four reductions a step): rows are checked once a call in
    `completions`, where a non-finite logprob means the model's outputs were."""
    logp = torch.log_softmax(logits if temperature in (0, 1) else logits / temperature, -1)
    if temperature == 0:
        token = logp.argmax(-1)
    else:
        race = torch.empty_like(logp).exponential_(1, generator=generator)
        token = torch.div(logp.exp(), race, out=race).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def completions(tokens, logps, lengths, done) -> list[Completion]:
    from grpo.errors import NumericsError

    if bool(logps.isnan().any()):  # NaN logits: `draw` took an arbitrary token; nothing of this call is kept
        raise NumericsError("the served model's logits are NaN; resume from the last checkpoint with a lower "
                            "learning_rate or grad_clip")
    tokens, logps, lengths, done = tokens.tolist(), logps.tolist(), lengths.tolist(), done.tolist()
    return [Completion(tokens[r][:int(lengths[r])], logps[r][:int(lengths[r])], not done[r])
            for r in range(len(tokens))]
