"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for a trainer group with shard=true: each rank keeps 1/N of the
float32 master weights, of their gradients and of the AdamW state (16 bytes a parameter in all: 128 GB for an 8B
model, which no single GPU holds), and gathers a layer's weights in bf16 only while it computes with it.

What stays as without sharding, so that the two are interchangeable mid-run:
- a step's gradients are summed over the ranks, not averaged (each rank's loss is weighted by the whole step);
- checkpoints hold whole tensors, and the optimiser state as one unsharded process's `optimizer.state_dict()`
  (parameters numbered in `named_parameters` order): a run resumes sharded or not, on any number of ranks.

`shard`, `full_weights`, `full_state` and `load_optimizer_state` are collectives (they gather or scatter over the
ranks): all ranks call them, in the same order."""
from __future__ import annotations

from typing import Iterator

import torch


class Scorer(torch.nn.Module):
    """`scoring.sequence_logprobs` of a causal LM as a module's forward, the root FSDP unit: FSDP gathers the
    weights outside the decoder layers (embeddings, final norm, the tied head) around its root's forward, and
    sequence_logprobs calls the decoder and the head apart (so as never to hold [tokens, vocabulary] logits)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, packed, temperature: float) -> torch.Tensor:
        from grpo.scoring import sequence_logprobs

        return sequence_logprobs(self.lm, packed, temperature)


def shard(model, dtype: torch.dtype) -> Scorer:
    """Shard `model` (float32, on this rank's device) in place: one FSDP unit per decoder layer and one for the
    rest (tied weights must share a unit), whose root is the returned Scorer. Forward and backward run in
    `dtype`; gradients accumulate over micro-batches and are reduced in float32 (FSDP upcasts to reduce_dtype), as
    the unsharded trainer's master gradients. Parameter names stay the model's own."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    scorer = fully_shard(Scorer(model), mp_policy=policy)
    for module in scorer.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # FSDP averages by default; the step's loss wants the sum,
            module.set_force_sum_reduction_for_comms(True)  # as a plain SUM (gloo has no pre-multiplied sum)
    return scorer


def full_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor on this rank's device) of every parameter, tied ones once, and of persistent buffers,
    in state-dict order (the names `artifacts.state_once` gives an unsharded model)."""
    for name, value in _weights(model):
        yield name, whole(value)  # the root unit's weights stay whole after a forward without backward (FSDP2)


def full_layout(model) -> list[tuple[str, list[int]]]:
    """(name, whole shape) of what full_weights yields, in its order, without gathering anything."""
    return [(name, list(value.shape)) for name, value in _weights(model)]


def _weights(model):
    params = dict(model.named_parameters())  # tied weights are one parameter, under their first name
    buffers = dict(model.named_buffers())
    for name in model.state_dict():
        if name in params:
            yield name, params[name]
        elif name in buffers:
            yield name, buffers[name]


def gradient_norm(norm) -> float:
    """The value of `clip_grad_norm_`'s total norm, which over sharded gradients is a replicated DTensor."""
    return float(whole(norm))


def whole(value):
    """A DTensor's whole tensor (an all-gather), anything else as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_state(model, optimizer, keep) -> tuple[dict, dict]:
    """(weights, optimiser state), whole: every tensor goes through keep(path, tensor) as soon as it is gathered
    (rank 0 copies it to host memory, the others drop it), so one tensor at a time is whole on the device. The
    optimiser state is `optimizer.state_dict()`, numbered as an unsharded optimiser numbers its parameters."""
    weights = {name: keep(("weights", name), t) for name, t in full_weights(model)}
    saved = optimizer.state_dict()
    state = {k: {key: keep(("optimizer", k, key), whole(v)) if isinstance(v, torch.Tensor) else v
                 for key, v in entry.items()}
             for k, entry in saved["state"].items()}
    return weights, {"state": state, "param_groups": saved["param_groups"]}


def load_optimizer_state(model, optimizer, saved: dict) -> None:
    """Load an unsharded optimiser's `state_dict()` (a checkpoint's) into the sharded optimiser, each rank keeping
    its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in model.named_parameters()]
    groups = [{**group, "params": [names[k] for k in group["params"]]} for group in saved["param_groups"]]
    full = {"state": {names[k]: value for k, value in saved["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


class Filler(list):
    """A micro-batch that a sharded rank runs only to keep the group's collectives in step (every forward and
    backward all-gathers weights and reduces gradients with the other ranks): its loss counts 0."""


def pad_batches(per_rank: list[list[list[int]]], rank: int) -> list[list[int]]:
    """This rank's micro-batches of one optimiser step, padded with Fillers (of its first row) to the most any
    rank has. per_rank: every rank's micro-batches (lists of row indices), as each rank computes them alike."""
    mine = list(per_rank[rank])
    most = max(map(len, per_rank))
    first = next(batch[0] for batches in per_rank for batch in batches)
    return mine + [Filler([first]) for _ in range(most - len(mine))]
