"""The GRPO optimisation of one iteration: annotated rows in, a checkpoint out."""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"


class NumericsError(RuntimeError):
    """Loss or gradient went NaN/inf; nothing from that step was saved."""


def _learning_rate(cfg, step: int) -> float:
    """Linear warm-up over cfg.warmup_steps optimiser steps (counted across iterations), then constant."""
    return cfg.learning_rate * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))


def load_trainer_state(checkpoint: str) -> dict:
    path = Path(checkpoint) / TRAINER_STATE if checkpoint else None
    return json.loads(path.read_text()) if path and path.is_file() else {"global_step": 0, "iteration": -1}


def finetune(cfg, rows: list[dict], checkpoint: str, output: Path, device: str,
             on_step: Callable[[dict, int], None] | None = None, show_progress: bool = True) -> dict:
    """Train the policy at `checkpoint` ('' = base model) on `rows` with the GRPO loss; save to `output`.

    Weights stay float32 under bf16 autocast (GPU, and CPUs with bf16 units): tiny learning-rate updates
    would vanish in bf16 weights."""
    import torch
    from tqdm.auto import tqdm

    from grpo.loss import grpo_loss
    from grpo.model import autocast, load_model, load_tokenizer, save_checkpoint
    from grpo.scoring import pack, place, sequence_logprobs

    torch.manual_seed(cfg.seed + cfg.iteration)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device, dtype=torch.float32, checkpoint=checkpoint)
    model.train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    state = load_trainer_state(checkpoint)
    if checkpoint and (Path(checkpoint) / OPTIMIZER_STATE).is_file():
        optimizer.load_state_dict(torch.load(Path(checkpoint) / OPTIMIZER_STATE, map_location=device))
    step = state["global_step"]
    skipped = 0
    if cfg.drop_flat_groups:
        kept = [r for r in rows if r["advantage"] != 0.0]
        skipped, rows = len(rows) - len(kept), kept
    if any(r["ref_logprobs"] is None for r in rows):
        from grpo.data import DataError

        raise DataError("annotated set lacks reference logprobs for flat groups (annotated with "
                        "drop_flat_groups=true); annotate again with drop_flat_groups=false")

    def save() -> None:
        save_checkpoint(model, tokenizer, output, {
            TRAINER_STATE: {"global_step": step, "iteration": cfg.iteration, "model": cfg.model},
            OPTIMIZER_STATE: optimizer.state_dict()})
    order = list(range(len(rows)))
    random.Random(cfg.seed * 7919 + cfg.iteration).shuffle(order)
    batches = [order[k:k + cfg.train_batch_size] for k in range(0, len(order), cfg.train_batch_size)]
    passes = cfg.gradient_accumulation_passes
    total_steps = math.ceil(len(batches) / passes)
    summary: dict[str, float] = {}
    start, tokens_done = time.perf_counter(), 0
    bar = tqdm(total=total_steps, desc="finetune", unit="step", leave=False, disable=not show_progress)
    for first in range(0, len(batches), passes):
        group = batches[first:first + passes]
        step_started, step_tokens = time.perf_counter(), 0
        sums: dict[str, float] = {}
        for indices in group:
            chosen = [rows[i] for i in indices]
            prompts = [r["prompt_ids"] for r in chosen]
            batch = pack(prompts, [r["completion_ids"] for r in chosen], tokenizer.pad_token_id, device)
            width = batch["mask"].shape[1]
            old = place([r["logprobs"] for r in chosen], prompts, width, device)
            ref = place([r["ref_logprobs"] for r in chosen], prompts, width, device)
            adv = torch.tensor([r["advantage"] for r in chosen], device=device, dtype=torch.float32)
            with autocast(device):
                new = sequence_logprobs(model, batch, cfg.temperature)
            loss, metrics = grpo_loss(new, old, ref, adv, batch["mask"], cfg.epsilon, cfg.epsilon_high,
                                      cfg.kl_coef, cfg.loss_reduction, cfg.max_new_tokens)
            if not torch.isfinite(loss):
                raise NumericsError(f"loss is {loss.item()} at optimiser step {step}; the last good checkpoint "
                                    f"{checkpoint or 'base model'} is kept. Lower learning_rate or kl_coef")
            (loss / len(group)).backward()
            metrics["loss"] = loss.item()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + (v if k == "tokens" else v / len(group))
            sums["ratio_max"] = max(sums.get("ratio_max", 0.0), metrics["ratio_max"])
            step_tokens += int(batch["attention"].sum())
        lr = _learning_rate(cfg, step)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        if not math.isfinite(grad_norm):
            raise NumericsError(f"gradient norm is {grad_norm} at optimiser step {step}; the last good checkpoint "
                                f"{checkpoint or 'base model'} is kept. Lower learning_rate")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_done += step_tokens
        sums.update(grad_norm=grad_norm, learning_rate=lr,
                    tokens_per_s=step_tokens / (time.perf_counter() - step_started))
        summary = sums
        if on_step:
            on_step(sums, step)
        bar.update(1)
        if step % cfg.save_checkpoint_steps == 0 or first + passes >= len(batches):
            save()
    bar.close()
    seconds = time.perf_counter() - start
    if total_steps == 0:  # nothing to learn from: carry the weights (and optimiser state) forward unchanged
        save()
    return {**{f"last_{k}": v for k, v in summary.items()}, "optimizer_steps": total_steps, "global_step": step,
            "sequences_skipped_flat": skipped,
            "seconds": seconds, "train_tokens_per_s": tokens_done / seconds if seconds else 0.0}
