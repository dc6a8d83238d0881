"""A finetune's rows as optimiser steps and micro-batches (`plan_steps`), and each micro-batch's tensors on the
trainer's device (`DeviceInputs`, sent one micro-batch ahead so the host's work overlaps the GPU's)."""
from __future__ import annotations

import random

import torch


def plan_steps(rows: list[dict], optim, seed: int, iteration: int) -> list[list[list[int]]]:
    """Optimiser steps of train_batch_size x gradient_accumulation_passes sequences (the last one shorter), each
    cut into micro-batches of at most train_batch_size rows and max_tokens_per_micro_batch tokens. Rows are
    shuffled (seeded by iteration); within a step they are sorted by length so micro-batches pack tightly."""
    from grpo.scoring import micro_batches

    order = list(range(len(rows)))
    random.Random(seed * 1_000_003 + iteration).shuffle(order)
    per_step = optim.train_batch_size * optim.gradient_accumulation_passes
    steps = []
    for first in range(0, len(order), per_step):
        chosen = sorted(order[first:first + per_step], key=lambda i: row_tokens(rows[i]))
        lengths = [row_tokens(rows[i]) for i in chosen]
        steps.append([[chosen[k] for k in batch] for batch in
                      micro_batches(lengths, optim.train_batch_size, optim.max_tokens_per_micro_batch)])
    return steps


def row_tokens(row: dict) -> int:
    """Prompt and completion tokens of a row: its length in a packed micro-batch."""
    return len(row["prompt_ids"]) + len(row["completion_ids"])


def pack_rows(rows: list[dict], device: str):
    from grpo.scoring import pack

    return pack([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], device)


class DeviceInputs:
    """The device tensors of this rank's micro-batches, in training order, each built and sent one micro-batch
    ahead (`ahead` after a backward is queued): the host's list work and copy then overlap the GPU's work
    instead of following it. Per micro-batch: (packed rows, sampler logprobs [N], reference logprobs [N] or
    None, advantages [B])."""

    def __init__(self, rows: list[dict], batches: list[list[int]], device: str, reference: bool):
        self.rows, self.batches, self.device, self.reference = rows, batches, device, reference
        self.next, self.prepared = 0, None  # the next micro-batch's index, and its tensors once `ahead` built them

    def take(self):
        inputs = self.prepared or self._build(self.next)
        self.next, self.prepared = self.next + 1, None
        return inputs

    def ahead(self) -> None:
        if self.prepared is None and self.next < len(self.batches):
            self.prepared = self._build(self.next)

    def _build(self, k: int):
        from grpo.scoring import to_device

        chosen = [self.rows[i] for i in self.batches[k]]
        tokens = sum(len(r["completion_ids"]) for r in chosen)
        keys = ["logprobs", "ref_logprobs"] if self.reference else ["logprobs"]
        floats = [x for key in keys for r in chosen for x in r[key]] + [r["advantage"] for r in chosen]
        parts = to_device(torch.tensor(floats, dtype=torch.float32), self.device).split(
            [tokens] * len(keys) + [len(chosen)])
        return pack_rows(chosen, self.device), parts[0], parts[1] if self.reference else None, parts[-1]
