"""The GRPO optimisation. `Trainer` keeps the policy (float32 master weights) and its AdamW state in memory across
iterations, trains on annotated rows, hands its weights out in memory, and saves or loads its full state.
Checkpoints are written in the background from a snapshot (`grpo.checkpointing`), so training goes on."""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Iterator

import torch

from grpo.artifacts import checkpoint_info, state_once
from grpo.batches import DeviceInputs, pack_rows, plan_steps, row_tokens
from grpo.checkpointing import CheckpointWriter
from grpo.errors import DataError, NumericsError
from grpo.group import GradientSum, share, sum_values, world
from grpo.model import serving_dtype
from grpo.sharding import Filler, full_layout, full_weights, gradient_norm


def learning_rate(optim, step: int, total_steps: int) -> float:
    """Linear warm-up over optim.warmup_steps optimiser steps, then constant or cosine decay to 0 by total_steps."""
    peak = optim.learning_rate
    if step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "cosine" and total_steps > optim.warmup_steps:
        progress = min(1.0, (step - optim.warmup_steps) / (total_steps - optim.warmup_steps))
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak


def drain(steps, each=None) -> dict:
    """Run a `Trainer.train` generator to its end, calling each(event) per optimiser step; return its summary."""
    while True:
        try:
            event = next(steps)
        except StopIteration as stop:
            return stop.value
        if each:
            each(event)


def clipped_step(optimizer, params: list, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_(params, max_norm) then optimizer.step(), unless the gradients' norm is not finite: then the
    step changes neither weights nor optimiser state. Returns that norm before clipping, not read to the host.
    Fused AdamW clips inside its kernel (dividing by the `grad_scale` that GradScaler also sets, here
    max(1, norm / max_norm)) and skips on `found_inf`: no pass of its own over the gradients, and the step is
    queued without waiting for the norm."""
    if not optimizer.defaults.get("fused"):  # sharded (FSDP2 gradients), or another optimiser
        norm = gradient_norm(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if math.isfinite(norm):
            optimizer.step()
        return torch.tensor(norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)  # clip_grad_norm_'s coefficient, inverted
    optimizer.found_inf = (~torch.isfinite(norm)).float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    return norm


@torch.no_grad()
def grads_to_master(pairs) -> None:
    """Add the bf16 copy's gradients into the float32 master's (accumulating in bf16 would lose them); `pairs` are
    (master, compute) parameters, nothing to do where they are one."""
    for master, compute in pairs:
        if compute is not master and compute.grad is not None:
            master.grad = compute.grad.float() if master.grad is None else master.grad.add_(compute.grad)
            compute.grad = None


def trainable(rows: list[dict], kl_coef: float = 0.0) -> list[dict]:
    """The rows annotate chose to train on (it skips flat groups when drop_flat_groups): marked `train`, or in
    files without the mark, those it scored. Rows annotated without a reference model (kl_coef 0 in main) carry
    no reference logprobs, which only kl_coef 0 can train on."""
    kept = [r for r in rows if r.get("train", r.get("ref_logprobs") is not None)]
    scored = [r for r in kept if r.get("ref_logprobs") is not None]
    if any(len(r["ref_logprobs"]) != len(r["completion_ids"]) for r in scored):
        raise DataError("annotated rows have reference logprobs of the wrong length; annotate the rollouts again")
    if kl_coef and len(scored) < len(kept):
        raise DataError(f"kl_coef={kl_coef:g} but the annotated rows carry no reference logprobs (annotated for "
                        "kl_coef=0); pass kl_coef=0, or annotate the rollouts again with the annotate entry point")
    return kept


class Trainer:
    """The policy at `checkpoint` ('' = base model) in float32 with its optimiser, ready to train.

    AdamW updates float32 master weights (`model`): tiny learning-rate updates would vanish in bf16 weights. Where
    the trainer computes in bf16 (GPU, CPUs with bf16 units) forward and backward run on a bf16 copy (`compute`),
    whose gradients are added into the master's in float32 after each micro-batch: with float32 weights under
    autocast, casts of weights and of a float32 residual stream took 27% of a 1B step's GPU time (H200)."""

    def __init__(self, model: str, optim, device: str, checkpoint: str = "", shard: bool = False):
        from grpo.model import load_model, load_tokenizer
        from grpo.scoring import compile_layers, compute_dtype, fuse_norms, use_varlen_attention

        self.model_name, self.optim, self.device, self.sharded = model, optim, device, shard
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, device, dtype=torch.float32, checkpoint=checkpoint)
        self.model.train()
        self.model.config.use_cache = False
        cuda = use_varlen_attention(self.model)
        self.compute = self.model
        if shard:  # FSDP2 gathers each layer in the compute dtype itself (grpo.sharding): no copy
            from grpo.sharding import shard as fully_shard

            if cuda:  # weights and stream in bf16, as the copy's; compiled before sharding, as torchtitan does
                fuse_norms(self.model)
                compile_layers(self.model)
            self.scorer = fully_shard(self.model, compute_dtype(device))
        elif compute_dtype(device) != torch.float32:
            self.compute = copy.deepcopy(self.model).to(compute_dtype(device))
            if cuda:  # as the reference model (load_reference); the probe keeps the engine's own norms
                fuse_norms(self.compute)
                compile_layers(self.compute)
        self._pairs = list(zip(self.model.parameters(), self.compute.parameters()))  # (master, compute), tied once
        # an unsharded group sums gradients during the last backward of each step (FSDP2 reduces them itself)
        self.gradient_sum = GradientSum(self._pairs) if world()[1] > 1 and not shard else None
        kwargs = {"fused": True} if not shard else {}  # grpo.trainer.clipped_step clips inside its kernel
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.learning_rate,
                                           weight_decay=optim.weight_decay, **kwargs)
        self.checkpoints = CheckpointWriter(self.model, self.optimizer, self.tokenizer, device, shard)
        if checkpoint:
            self.checkpoints.load(Path(checkpoint))
        info = checkpoint_info(checkpoint) if checkpoint else {}
        self.step, self.iteration = info.get("global_step", 0), info.get("iteration", -1)

    # --- training ---

    def train(self, rows: list[dict], iteration: int, seed: int, total_steps: int) -> Iterator[dict]:
        """One finetune stage. Yields {"step": n, "metrics": {...}} after each optimiser step and returns the
        stage's summary. Temperature and max_new_tokens are read from the rows (what rollout used)."""
        self.checkpoints.snapshot_taken.wait()  # a checkpoint copying the weights out must finish before they change
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        kept = trainable(rows, self.optim.kl_coef)
        context = {"temperature": rows[0]["temperature"] if rows else 1.0,
                   "max_tokens": rows[0]["max_new_tokens"] if rows else 1, "gap": _Gap(self.optim),
                   "reference": all(r.get("ref_logprobs") is not None for r in kept)}  # else no KL, nor its metric
        steps = plan_steps(kept, self.optim, seed, iteration)
        mine = [self._my_batches(kept, batches) for batches in steps]
        if self.optim.old_logprobs == "trainer":
            context["old"] = self._trainer_old_logprobs(kept, mine, context["temperature"])
        inputs = DeviceInputs(kept, [batch for batches in mine for batch in batches], self.device, context["reference"])
        started, tokens_done, summary = time.perf_counter(), 0, {}
        for batches, my_batches in zip(steps, mine):
            step_started = time.perf_counter()
            step_rows = [kept[i] for batch in batches for i in batch]
            sums = self._accumulate(my_batches, inputs, step_rows, context)
            lr, grad_norm = self._update(sums, total_steps)
            trained = sum(row_tokens(r) for r in step_rows)
            tokens_done += trained
            n = max(sums["tokens"], 1)
            summary = {"loss": sums["loss"], **({"kl": sums["kl_sum"] / n} if context["reference"] else {}),
                       "clip_fraction": sums["clipped"] / n,
                       "ratio_mean": sums["ratio_sum"] / n, "ratio_max": sums["ratio_max"], "grad_norm": grad_norm,
                       "learning_rate": lr, "sequences": len(step_rows),
                       "tokens_per_s": trained / (time.perf_counter() - step_started), **_gpu_figures(self.device)}
            yield {"step": self.step, "metrics": summary}
        self.iteration = iteration
        seconds = time.perf_counter() - started
        return {**{f"last_{k}": v for k, v in summary.items()}, **context["gap"].metrics(),
                "optimizer_steps": len(steps), "global_step": self.step, "sequences_trained": len(kept),
                "sequences_skipped": len(rows) - len(kept), "seconds": seconds, "trained_tokens": tokens_done,
                "train_tokens_per_s": tokens_done / seconds if seconds else 0.0,
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else 0.0}

    def _my_batches(self, rows, batches) -> list[list[int]]:
        """This rank's micro-batches of one optimiser step: in a group, every size-th row of the step (sorted by
        length, so each rank gets a like share of tokens), cut again into micro-batches."""
        from grpo.scoring import micro_batches

        rank, size = world()
        if size == 1:
            return batches

        def cut(r: int) -> list[list[int]]:
            chosen = share([i for batch in batches for i in batch], r, size)
            cuts = micro_batches([row_tokens(rows[i]) for i in chosen], self.optim.train_batch_size,
                                 self.optim.max_tokens_per_micro_batch)
            return [[chosen[k] for k in batch] for batch in cuts]

        if not self.sharded:
            return cut(rank)
        from grpo.sharding import pad_batches  # every rank runs as many forwards and backwards

        return pad_batches([cut(r) for r in range(size)], rank)

    def _accumulate(self, batches, inputs: DeviceInputs, step_rows, context) -> dict:
        """Forward and backward over this rank's micro-batches of one optimiser step (their tensors from
        `inputs`), each weighted by the whole step's totals (so ranks' gradients add up to the step's); the
        step's loss and metric sums, over the group (one host sync)."""
        from grpo.loss import grpo_loss, token_weights, truncated_is_weight
        from grpo.scoring import autocast

        optim, device, gap, old = self.optim, self.device, context["gap"], context.get("old")
        step_tokens = sum(len(r["completion_ids"]) for r in step_rows)
        sums = {"loss": 0.0, "kl_sum": 0.0, "clipped": 0, "ratio_sum": 0.0, "tokens": 0,
                "ratio_max": torch.zeros((), device=device)}
        if self.gradient_sum:
            self.gradient_sum.begin_step()
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            if self.sharded:  # gradients are reduced over the ranks in the step's last backward only
                self.scorer.set_requires_gradient_sync(last)
            packed, sampler, ref, advantages = inputs.take()
            adv = advantages[packed.seq]
            weights = token_weights(packed.seq, packed.seq_tokens, optim.loss_reduction, len(step_rows), step_tokens,
                                    context["max_tokens"])
            with autocast(device):
                new = self._logprobs(packed, context["temperature"])
            if isinstance(batch, Filler):
                (new.sum() * 0.0).backward()
                inputs.ahead()
                continue
            old_logp = sampler if old is None else torch.cat([old[i] for i in batch])
            is_weight = None if old is None else truncated_is_weight(old_logp, sampler, optim.tis_cap)
            if gap.pending:
                gap.add(new.detach(), sampler)
            loss, m = grpo_loss(new, old_logp, ref, adv, weights, optim.epsilon,
                                optim.epsilon_high, optim.kl_coef, is_weight)
            if self.gradient_sum and last:
                self.gradient_sum.arm()
            loss.backward()
            inputs.ahead()  # queued behind the backward, the next micro-batch's tensors cost the GPU no idle time
            self._grads_to_master()
            sums["loss"] = loss.detach() + sums["loss"]
            sums["ratio_max"] = torch.maximum(sums["ratio_max"], m.pop("ratio_max"))
            for k, v in m.items():
                sums[k] += v
        gap.pending = False
        if world()[1] > 1:
            if self.gradient_sum:
                self.gradient_sum.finish()
            return sum_values(sums, maxima=("ratio_max",))
        return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in sums.items()}

    @torch.no_grad()
    def _grads_to_master(self) -> None:
        grads_to_master(self._pairs)

    def _update(self, sums: dict, total_steps: int) -> tuple[float, float]:
        """The optimiser step, unless the loss or the gradient is not finite (then nothing of the step is kept)."""
        if not math.isfinite(sums["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise NumericsError(f"loss is {sums['loss']} at optimiser step {self.step}; nothing of it was kept. "
                                "Lower learning_rate or kl_coef")
        lr = learning_rate(self.optim, self.step, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norm = clipped_step(self.optimizer, list(self.model.parameters()), self.optim.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        if self.compute is not self.model:  # an unchanged master where the step was skipped
            masters, computes = zip(*self._pairs)
            with torch.no_grad():
                torch._foreach_copy_(list(computes), list(masters))
        grad_norm = gradient_norm(norm)  # the host waits here, with the next micro-batch already sent
        if not math.isfinite(grad_norm):
            raise NumericsError(f"gradient norm is {grad_norm} at optimiser step {self.step}; nothing of it was "
                                "kept. Lower learning_rate")
        self.step += 1
        return lr, grad_norm

    def _logprobs(self, packed, temperature: float) -> torch.Tensor:
        """sequence_logprobs of the packed rows under the weights the trainer computes with."""
        from grpo.scoring import sequence_logprobs

        return self.scorer(packed, temperature) if self.sharded else sequence_logprobs(self.compute, packed,
                                                                                         temperature)

    @torch.no_grad()
    def _trainer_old_logprobs(self, rows, steps, temperature) -> dict[int, torch.Tensor]:
        """The trainer's own logprobs of every row before this iteration's first update (old_logprobs=trainer)."""
        from grpo.scoring import autocast

        old = {}
        for batches in steps:
            for batch in batches:
                packed = pack_rows([rows[i] for i in batch], self.device)
                with autocast(self.device):
                    values = self._logprobs(packed, temperature)
                if isinstance(batch, Filler):
                    continue
                old.update(zip(batch, values.split(packed.seq_tokens.tolist())))
        if self.sharded:
            self.scorer.reshard()
        return old

    # --- weights out ---

    @torch.no_grad()
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) of every parameter, tied ones once, as stored (float32). Sharded: whole tensors,
        gathered one at a time (a collective: every rank reads the iterator to its end)."""
        yield from full_weights(self.model) if self.sharded else self.model.named_parameters()

    def weight_layout(self) -> list[tuple[str, list[int]]]:
        """(HF name, shape) of what named_weights yields, in its order; nothing is gathered."""
        if self.sharded:
            return full_layout(self.model)
        return [(name, list(p.shape)) for name, p in self.model.named_parameters()]

    @torch.no_grad()
    def probe_logprobs(self, probe, dtype: torch.dtype | None = None) -> list[float]:
        """The probe under the weights as the engine serves them: rounded to `dtype` (default bf16 on a GPU,
        float32 on a CPU) and run in it. Not under autocast: that keeps the residual stream in float32, and its
        gap to a bf16 engine grows as training sharpens the policy (a run of 90 iterations crossed the check's
        tolerance with the engine serving the right weights)."""
        from grpo.scoring import pack, sequence_logprobs

        dtype = dtype or serving_dtype(self.device)
        packed = pack([probe.prompt], [probe.completion], self.device)
        if self.sharded:  # a collective; FSDP computes in the serving dtype already (bf16 on a GPU)
            logprobs = self.scorer(packed, 1.0).float().tolist()
            self.scorer.reshard()  # a forward without backward leaves the root unit's weights gathered
            return logprobs
        self.checkpoints.snapshot_taken.wait()  # a checkpoint's copy must not see the rounded weights
        kept = {p: p.data for p in self.model.parameters()}  # tied weights are one parameter
        try:
            for p in kept:
                p.data = p.data.to(dtype)
            return sequence_logprobs(self.model, packed, 1.0).float().tolist()
        finally:
            for p, data in kept.items():
                p.data = data

    def probe_with_precision(self, probe) -> tuple[list[float], float]:
        """probe_logprobs, and their mean gap to the probe with float32 weights and residual stream (bf16 matmuls
        under autocast: flash attention takes no float32): how sensitive the policy is now to the serving
        precision; the hand-over check allows twice that. 0 on a CPU, which serves float32."""
        from grpo.engines.base import probe_gap

        served = self.probe_logprobs(probe)
        if self.device != "cuda" or self.sharded:  # sharded: no float32 forward to compare with (a group's
            return served, 0.0                     # engine check has its own tolerance, GroupEngine.tolerance)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return served, probe_gap(served, self.probe_logprobs(probe, torch.float32))

    @torch.no_grad()
    def export(self, folder: Path) -> None:
        """The current policy as a Hugging Face folder in bf16 (what a logged model keeps), written synchronously."""
        from safetensors.torch import save_file

        lead = world()[0] == 0  # a sharded rank's part is the gather; rank 0 alone keeps and writes
        state = full_weights(self.model) if self.sharded else state_once(self.model)
        weights = {name: t.to("cpu", torch.bfloat16).contiguous() if lead else None for name, t in state}
        if not lead:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        config = self.model.config.to_dict() | {"dtype": "bfloat16"}
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        self.model.generation_config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    # --- full state to disk ---

    def save(self, path: Path, background: bool = True) -> None:
        """Weights, AdamW state, step and RNG to `path`, then older checkpoints deleted (`CheckpointWriter`)."""
        info = {"iteration": self.iteration, "global_step": self.step, "model": self.model_name,
                "saved_at": time.time()}
        self.checkpoints.save(Path(path), info, background)

    def wait_saved(self) -> None:
        self.checkpoints.wait()


def _gpu_figures(device: str) -> dict[str, float]:
    """The trainer's own GPU, reported into its finetune runs (MLflow's system metrics watch the main process)."""
    if device != "cuda":
        return {}
    figures = {"gpu_memory_gib": torch.cuda.memory_allocated() / 2**30,
               "gpu_reserved_gib": torch.cuda.memory_reserved() / 2**30}
    try:
        figures["gpu_utilization_percentage"] = float(torch.cuda.utilization())
    except Exception:  # needs nvidia-ml-py
        pass
    return figures


class _Gap:
    """Sampler vs trainer logprobs before the iteration's first update (the 'step-0 gap'): mean and max
    |difference| and the share of tokens whose ratio already sits outside the clip window."""

    def __init__(self, optim):
        self.optim, self.pending, self.diffs = optim, True, []

    def add(self, trainer: torch.Tensor, sampler: torch.Tensor) -> None:
        self.diffs.append((trainer.float() - sampler.float()).cpu())

    def metrics(self) -> dict[str, float]:
        d = torch.cat(self.diffs) if self.diffs else torch.zeros(0)
        ratio = torch.exp(d)
        outside = (ratio < 1 - self.optim.epsilon) | (ratio > 1 + self.optim.epsilon_high)
        totals = {"abs": d.abs().sum().item(), "max": d.abs().max().item() if len(d) else 0.0,
                  "outside": outside.sum().item(), "n": len(d)}
        if world()[1] > 1:  # every rank saw its own share of the step's tokens
            totals = sum_values(totals, maxima=("max",))
        if not totals["n"]:
            return {}
        return {"sampler_gap_mean": totals["abs"] / totals["n"], "sampler_gap_max": totals["max"],
                "sampler_outside_clip": totals["outside"] / totals["n"]}
