"""Stage bodies with their MLflow logging, and `run_main`, which chains them under one parent run and resumes
a killed run from its last finished stage."""
from __future__ import annotations

import json
import os
import time
from functools import cached_property
from pathlib import Path
from typing import Callable

from grpo import stages, tracking
from grpo.trainer_process import TrainerProcess

TABLE_COLUMNS = ("problem_id", "question", "gold", "completion", "reward", "outcome")


class Workspace:
    """What the stages of one process share: data, tokenizer, prompt builder, rollout engine, reference model."""

    def __init__(self, cfg, checkpoint: str = ""):
        from grpo.model import pick_device

        self.cfg, self.checkpoint = cfg, checkpoint
        self.device = pick_device(cfg.device)

    @cached_property
    def train(self):
        from grpo.data import load_split

        return load_split(self.cfg.dataset, "train")

    @cached_property
    def test(self):
        from grpo.data import load_split

        return load_split(self.cfg.dataset, "test")

    @cached_property
    def sampler(self):
        from grpo.sampling import make_sampler

        return make_sampler(self.cfg, self.device, self.checkpoint)

    @cached_property
    def builder(self):
        from grpo.data import PromptBuilder
        from grpo.model import load_tokenizer

        return PromptBuilder(load_tokenizer(self.cfg.model), self.cfg.system_prompt, self.cfg.shots, self.train)

    @cached_property
    def reference(self):
        from grpo.model import load_model

        return load_model(self.cfg.model, self.device)


def rollout_stage(ws: Workspace, iteration: int, out: Path) -> dict:
    rows, metrics = stages.rollout(ws.cfg, ws.sampler, ws.builder, ws.train, iteration)
    if ws.device == "cuda":  # this process holds the sampler and the reference model
        import torch

        metrics["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    stages.write_jsonl(rows, out)
    tracking.log_metrics(metrics, step=iteration)
    tracking.log_rows(rows, f"rollouts/{out.name}")
    tracking.log_traces(rows, "rollout", ws.cfg.trace_samples, step=iteration)
    return metrics


def annotate_stage(ws: Workspace, rows: list[dict], iteration: int, out: Path) -> dict:
    started = time.perf_counter()
    rows, metrics = stages.annotate(ws.cfg, rows, ws.reference, ws.builder.tokenizer.pad_token_id)
    metrics["seconds"] = time.perf_counter() - started
    stages.write_jsonl(rows, out)
    tracking.log_metrics(metrics, step=iteration)
    tracking.log_rows(rows, f"annotated/{out.name}")
    return metrics


def evaluate_stage(ws: Workspace, step: int, limit: int) -> dict:
    rows, metrics = stages.evaluate(ws.sampler, ws.builder, ws.test, limit, ws.cfg.max_new_tokens)
    tracking.log_metrics(metrics, step=step)
    tracking.log_table(rows, f"eval/results_step_{step:04d}.json", TABLE_COLUMNS)
    tracking.log_traces(rows, "evaluate", ws.cfg.trace_samples, step=step)
    return metrics


class State:
    """Which stages of a main run are finished and which run each stage used, kept next to the checkpoints
    and rewritten atomically after every change."""

    def __init__(self, folder: Path):
        self.path = folder / "state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"done": {}, "runs": {}}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def mark(self, key: str, metrics: dict) -> None:
        self.data["done"][key] = metrics
        self._save()

    def started(self, key: str, run_id: str) -> str | None:
        """Record the run now used for `key`; return the one a killed earlier attempt left, if any."""
        stale = self.data["runs"].get(key)
        self.data["runs"][key] = run_id
        self._save()
        return stale


def _log_once(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log parent metrics, skipping any already logged at this step (a resumed run re-entering a stage)."""
    import mlflow

    for key, value in metrics.items():
        if not any(m.step == step for m in client.get_metric_history(run_id, key)):
            mlflow.log_metric(key, float(value), step=step)


def run_main(cfg, on_eval: Callable[[int, float], None] | None = None) -> dict:
    """rollout -> annotate -> finetune for cfg.max_iterations, evaluating at the start, every
    cfg.test_every_n_iterations and at the end; each stage a nested run of the active run. Rerunning with the
    same parent run id skips finished stages."""
    import mlflow
    from mlflow import MlflowClient

    from grpo.model import resolve

    parent = mlflow.active_run().info.run_id
    client = MlflowClient()
    folder = Path(cfg.work_dir).resolve() / parent
    folder.mkdir(parents=True, exist_ok=True)
    mlflow.set_tag("grpo.work_dir", str(folder))
    state = State(folder)
    _remove_partial_checkpoints(folder)
    resolve(cfg.model)  # materialise the bundled model once, before any stage process needs it
    checkpoint = lambda i: folder / f"checkpoints/iter-{i:04d}"  # noqa: E731
    trained = [i for i in range(cfg.max_iterations) if f"finetune-{i}" in state.data["done"]]
    ws = Workspace(cfg, checkpoint=str(checkpoint(trained[-1])) if trained else "")
    result: dict[str, float] = {}

    def stage(key: str, step: int, body: Callable[[str], dict], parent_metrics: dict[str, str]) -> dict:
        """Run `body(run_id)` in a nested run unless `key` finished before; log chosen metrics to the parent."""
        name = key.split("-")[0]
        if key not in state.data["done"]:
            started = time.perf_counter()
            with mlflow.start_run(run_name=key, nested=True, tags={"grpo.stage": name}) as run:
                stale = state.started(key, run.info.run_id)
                if stale and client.get_run(stale).info.status == "RUNNING":
                    client.set_terminated(stale, "KILLED")  # the process that owned it died
                if name != "finetune":  # the finetune process logs its own, with its input paths
                    tracking.log_params(cfg.replace(iteration=step).as_params(name))
                with tracking.killed_on_interrupt():
                    metrics = body(run.info.run_id)
            metrics["stage_seconds"] = time.perf_counter() - started
            state.mark(key, metrics)
        metrics = state.data["done"][key]
        _log_once(client, parent, {f"time_{name}": metrics["stage_seconds"]}
                  | {target: metrics[source] for target, source in parent_metrics.items() if source in metrics}, step)
        return metrics

    def evaluation(step: int) -> None:
        fresh = f"evaluate-{step}" not in state.data["done"]
        m = stage(f"evaluate-{step}", step, lambda _: evaluate_stage(ws, step, cfg.eval_limit),
                  {"test_accuracy": "test_accuracy", "test_boxed_rate": "test_boxed_rate",
                   "test_completion_tokens_mean": "test_completion_tokens_mean"})
        if fresh:
            _plot(client, parent)
        result.update(test_accuracy=m["test_accuracy"], test_boxed_rate=m["test_boxed_rate"])
        if on_eval:
            on_eval(step, m["test_accuracy"])

    def finetune_body(i: int, annotated: Path, run_id: str) -> dict:
        stage_cfg = cfg.replace(iteration=i, annotated=str(annotated), checkpoint=ws.checkpoint,
                                output=str(checkpoint(i)), log_checkpoint=i == cfg.max_iterations - 1)
        summary = trainer.train(stage_cfg, run_id)
        return {"kl": summary.get("last_kl", 0.0), "train_tokens_per_s": summary["train_tokens_per_s"],
                "peak_gpu_gib": summary["peak_gpu_gib"]}

    def iteration(i: int) -> None:
        rollouts, annotated = folder / f"rollouts/iter-{i:04d}.jsonl", folder / f"annotated/iter-{i:04d}.jsonl"
        stage(f"rollout-{i}", i, lambda _: rollout_stage(ws, i, rollouts),
              {f"train_{k}": k for k in ("reward_mean", "correct_rate", "boxed_rate", "unparseable_rate",
                                         "completion_tokens_mean")}
              | {"rollout_tokens_per_s": "tokens_per_s", "rollout_tokens": "generated_tokens",
                 "rollout_peak_gpu_gib": "peak_gpu_gib"})
        stage(f"annotate-{i}", i, lambda _: annotate_stage(ws, stages.read_jsonl(rollouts), i, annotated),
              {"signal_fraction": "signal_fraction"})
        stage(f"finetune-{i}", i, lambda run_id: finetune_body(i, annotated, run_id),
              {"kl": "kl", "train_tokens_per_s": "train_tokens_per_s", "trainer_peak_gpu_gib": "peak_gpu_gib"})
        if ws.checkpoint != str(checkpoint(i)):
            ws.checkpoint = str(checkpoint(i))
            if "sampler" in ws.__dict__:
                ws.sampler.load_weights(ws.checkpoint)  # serve the new policy without rebuilding the engine
        _prune_checkpoints(folder, keep=checkpoint(i))
        every = cfg.test_every_n_iterations
        if i == cfg.max_iterations - 1 or (every and (i + 1) % every == 0):
            evaluation(i + 1)

    trainer = TrainerProcess()  # the finetune stage's own process, kept warm across iterations
    started = time.monotonic()
    try:
        evaluation(0)
        for i in range(cfg.max_iterations):
            out_of_time = cfg.max_seconds and time.monotonic() - started > cfg.max_seconds
            if out_of_time and f"rollout-{i}" not in state.data["done"]:
                mlflow.set_tag("grpo.stopped", f"max_seconds={cfg.max_seconds:g} reached after {i} iterations")
                if i and f"evaluate-{i}" not in state.data["done"]:
                    evaluation(i)
                if ws.checkpoint:
                    mlflow.log_artifacts(ws.checkpoint, "checkpoint")  # the last iteration's weights
                break
            iteration(i)
    except BaseException:
        trainer.close(kill=True)
        raise
    trainer.close()
    _plot(client, parent)
    return result


def _remove_partial_checkpoints(folder: Path) -> None:
    """Temp folders of a checkpoint write that a killed run left (complete ones are renamed into place)."""
    import shutil

    for partial in (folder / "checkpoints").glob(".iter-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _prune_checkpoints(folder: Path, keep: Path) -> None:
    """Only the newest finished checkpoint is needed to resume; older ones cost ~4 bytes a parameter each."""
    import shutil

    for old in (folder / "checkpoints").glob("iter-*"):
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def _plot(client, run_id: str) -> None:
    """learning_curve.png on the parent run."""
    import matplotlib.pyplot as plt
    import mlflow

    fig = learning_curve(lambda key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)))
    mlflow.log_figure(fig, "learning_curve.png")
    plt.close(fig)


def learning_curve(history: Callable[[str], list[tuple[int, float]]]):
    """Test boxed rate, test accuracy and train rollouts per iteration; `history(metric)` gives (step, value)s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = ((("test_boxed_rate",), "test boxed rate (greedy)"),
              (("test_accuracy",), "test accuracy (greedy)"),  # its own scale: small next to the boxed rate
              (("train_reward_mean", "train_correct_rate", "train_boxed_rate"), "train rollouts"))
    for axis, (keys, title) in zip(axes, panels):
        for key in keys:
            points = history(key)
            if points:
                axis.plot(*zip(*points), marker="o", label=key)
        axis.set_xlabel("iterations trained")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        if len(axis.lines) > 1:
            axis.legend()
    fig.tight_layout()
    return fig
