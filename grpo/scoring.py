"""Per-token logprobs of (prompt, completion) pairs under a model: the trainer's view of a rollout."""
from __future__ import annotations

import torch

from grpo.loss import token_logprobs


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion rows.

    Returns ids [B, L], attention [B, L], targets [B, L-1] (= ids shifted left) and mask [B, L-1],
    1 where the target is a completion token: position j predicts token j+1."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    mask = torch.zeros((len(prompts), width - 1))
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        attention[row, :len(p) + len(c)] = 1
        mask[row, len(p) - 1:len(p) + len(c) - 1] = 1
    return {"ids": ids.to(device), "attention": attention.to(device), "targets": ids[:, 1:].to(device),
            "mask": mask.to(device)}


def place(values: list[list[float]], prompts: list[list[int]], width: int, device) -> torch.Tensor:
    """Per-completion-token values (e.g. sampler logprobs) at the mask positions of `pack`: [B, width]."""
    out = torch.zeros((len(values), width))
    for row, (v, p) in enumerate(zip(values, prompts)):
        out[row, len(p) - 1:len(p) - 1 + len(v)] = torch.tensor(v, dtype=torch.float32)
    return out.to(device)


def sequence_logprobs(model, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Logprob of every completion target under softmax(logits / T): [B, L-1] float32, zero where mask is 0.

    The vocabulary projection runs on completion positions only: prompts (few-shot exemplars) are most of
    each row, and [B, L, V] logits would be most of the memory and a fifth of the FLOPs for nothing."""
    hidden = model.get_decoder()(input_ids=batch["ids"], attention_mask=batch["attention"]).last_hidden_state
    where = batch["mask"].bool()
    logits = model.get_output_embeddings()(hidden[:, :-1][where])  # [N, V], N = completion tokens
    picked = token_logprobs(logits.unsqueeze(0), batch["targets"][where].unsqueeze(0), temperature)[0]
    return torch.zeros(where.shape, device=picked.device, dtype=picked.dtype).masked_scatter(where, picked)


def unplace(values: torch.Tensor, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
    """Inverse of `place`: the per-completion-token values of each row as lists."""
    rows = values.float().cpu().tolist()
    return [row[len(p) - 1:len(p) - 1 + len(c)] for row, p, c in zip(rows, prompts, completions)]


@torch.no_grad()
def score_completions(model, prompts, completions, pad_id: int, temperature: float, batch_size: int = 16,
                      show_progress: bool = False, fast: bool = False) -> list[list[float]]:
    """Per-token logprobs of each completion, batched, no grad (reference model, parity checks).

    fast: bf16 autocast where the trainer uses it too, so that KL starts at ~0 rather than at the
    float32-vs-bf16 rounding gap."""
    import contextlib

    from tqdm.auto import tqdm

    from grpo.model import autocast

    out: list[list[float]] = []
    for k in tqdm(range(0, len(prompts), batch_size), desc="score", leave=False, disable=not show_progress):
        p, c = prompts[k:k + batch_size], completions[k:k + batch_size]
        batch = pack(p, c, pad_id, model.device)
        with autocast(model.device.type) if fast else contextlib.nullcontext():
            out += unplace(sequence_logprobs(model, batch, temperature), p, c)
    return out
