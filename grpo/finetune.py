"""The GRPO optimisation: annotated rows in, a checkpoint out. `Trainer` keeps the policy and its AdamW state in
memory, so the persistent trainer process of `main` pays model load and process start once, not per iteration."""
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


class Trainer:
    """The policy at `checkpoint` ('' = base model) in float32 with its optimiser, ready to train.

    Weights stay float32 under bf16 autocast (GPU, and CPUs with bf16 units): tiny learning-rate updates
    would vanish in bf16 weights."""

    def __init__(self, cfg, checkpoint: str, device: str):
        import torch

        from grpo.model import load_model, load_tokenizer

        self.device, self.checkpoint = device, checkpoint  # checkpoint: where the in-memory weights are saved
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_model(cfg.model, device, dtype=torch.float32, checkpoint=checkpoint)
        self.model.train()
        self.model.config.use_cache = False
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay)
        if checkpoint and (Path(checkpoint) / OPTIMIZER_STATE).is_file():
            self.optimizer.load_state_dict(torch.load(Path(checkpoint) / OPTIMIZER_STATE, map_location=device))
        self.step = load_trainer_state(checkpoint)["global_step"]

    def save(self, cfg, output: Path) -> None:
        from grpo.model import save_checkpoint

        save_checkpoint(self.model, self.tokenizer, output, {
            TRAINER_STATE: {"global_step": self.step, "iteration": cfg.iteration, "model": cfg.model},
            OPTIMIZER_STATE: self.optimizer.state_dict()})
        self.checkpoint = str(output)

    def train(self, cfg, rows: list[dict], output: Path, on_step: Callable[[dict, int], None] | None = None,
              show_progress: bool = True) -> dict:
        """One finetune stage: shuffle `rows` (seeded by iteration), take optimiser steps, save to `output` every
        cfg.save_checkpoint_steps steps and at the end. A NaN/inf raises before anything of its step is saved."""
        import torch
        from tqdm.auto import tqdm

        from grpo.loss import grpo_loss
        from grpo.model import autocast
        from grpo.scoring import pack, place, sequence_logprobs

        torch.manual_seed(cfg.seed + cfg.iteration)
        model, device, pad_id = self.model, self.device, self.tokenizer.pad_token_id
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        skipped = 0
        if cfg.drop_flat_groups:
            kept = [r for r in rows if r["advantage"] != 0.0]
            skipped, rows = len(rows) - len(kept), kept
        if any(r["ref_logprobs"] is None for r in rows):
            from grpo.data import DataError

            raise DataError("annotated set lacks reference logprobs for flat groups (annotated with "
                            "drop_flat_groups=true); annotate again with drop_flat_groups=false")
        last_good = self.checkpoint or "base model"
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
                batch = pack(prompts, [r["completion_ids"] for r in chosen], pad_id, device)
                width = batch["mask"].shape[1]
                old = place([r["logprobs"] for r in chosen], prompts, width, device)
                ref = place([r["ref_logprobs"] for r in chosen], prompts, width, device)
                adv = torch.tensor([r["advantage"] for r in chosen], device=device, dtype=torch.float32)
                with autocast(device):
                    new = sequence_logprobs(model, batch, cfg.temperature)
                loss, metrics = grpo_loss(new, old, ref, adv, batch["mask"], cfg.epsilon, cfg.epsilon_high,
                                          cfg.kl_coef, cfg.loss_reduction, cfg.max_new_tokens)
                if not torch.isfinite(loss):
                    raise NumericsError(f"loss is {loss.item()} at optimiser step {self.step}; the last good "
                                        f"checkpoint {last_good} is kept. Lower learning_rate or kl_coef")
                (loss / len(group)).backward()
                metrics["loss"] = loss.item()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + (v if k == "tokens" else v / len(group))
                sums["ratio_max"] = max(sums.get("ratio_max", 0.0), metrics["ratio_max"])
                step_tokens += int(batch["attention"].sum())
            lr = _learning_rate(cfg, self.step)
            for param_group in self.optimizer.param_groups:
                param_group["lr"] = lr
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            if not math.isfinite(grad_norm):
                raise NumericsError(f"gradient norm is {grad_norm} at optimiser step {self.step}; the last good "
                                    f"checkpoint {last_good} is kept. Lower learning_rate")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            tokens_done += step_tokens
            sums.update(grad_norm=grad_norm, learning_rate=lr,
                        tokens_per_s=step_tokens / (time.perf_counter() - step_started))
            summary = sums
            if on_step:
                on_step(sums, self.step)
            bar.update(1)
            if cfg.save_checkpoint_steps and self.step % cfg.save_checkpoint_steps == 0 \
                    and first + passes < len(batches):
                self.save(cfg, output)
        bar.close()
        seconds = time.perf_counter() - start
        saved = time.perf_counter()
        self.save(cfg, output)  # also when nothing was learnt: weights and optimiser state carry forward unchanged
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
        return {**{f"last_{k}": v for k, v in summary.items()}, "optimizer_steps": total_steps,
                "global_step": self.step, "sequences_skipped_flat": skipped, "seconds": seconds,
                "save_seconds": time.perf_counter() - saved,
                "train_tokens_per_s": tokens_done / seconds if seconds else 0.0, "peak_gpu_gib": peak}


def finetune(cfg, rows: list[dict], checkpoint: str, output: Path, device: str,
             on_step: Callable[[dict, int], None] | None = None, show_progress: bool = True) -> dict:
    """Train the policy at `checkpoint` ('' = base model) on `rows` with the GRPO loss; save to `output`."""
    return Trainer(cfg, checkpoint, device).train(cfg, rows, output, on_step, show_progress)


def train_logged(trainer: Trainer, cfg, rows: list[dict], output: Path) -> dict:
    """`trainer.train` inside the active MLflow run: per-step metrics (step = optimiser step), the summary
    (step = iteration), the checkpoint path as a tag, and the checkpoint itself if cfg.log_checkpoint."""
    import mlflow

    from grpo import tracking

    log_step = lambda metrics, step: tracking.log_metrics(metrics, step=step, prefix="step_")  # noqa: E731
    summary = trainer.train(cfg, rows, output, on_step=log_step)
    tracking.log_metrics(summary, step=cfg.iteration)
    mlflow.set_tag("grpo.checkpoint", str(Path(output).resolve()))
    if cfg.log_checkpoint:
        mlflow.log_artifacts(str(output), "checkpoint")
    return summary
