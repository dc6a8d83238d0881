"""The GRPO chain under one parent MLflow run: evaluate, then per iteration rollout -> annotate -> finetune (in the
trainer's own process) -> new weights to the engine in memory, with evaluations between.

Design choices: the engine and the reference model stay in this process, the trainer in its own, both warm for
the whole run. Full training state is written in the background every `checkpoint_every` iterations; a killed
run resumes from its newest complete checkpoint and replays (without logging again) the finetune stages after
it from their annotated rows, so no stage runs twice and no metric step is logged twice."""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from grpo import stages, tracking
from grpo.console import say
from grpo.artifacts import (RunLock, RunState, checkpoint_info, checkpoint_path, latest_checkpoint, loads,
                            read_jsonl, remove_partials, write_jsonl)
from grpo.runner import Stage, StageRunner
from grpo.trainer import drain

# which stage metrics the main run carries, under which names (one place)
PARENT_METRICS = {
    "rollout": {"train_reward_mean": "reward_mean", "train_correct_rate": "correct_rate",
                "train_boxed_rate": "boxed_rate", "train_unparseable_rate": "unparseable_rate",
                "train_completion_tokens_mean": "completion_tokens_mean", "rollout_tokens_per_s": "tokens_per_s",
                "rollout_tokens": "generated_tokens", "rollout_peak_gpu_gib": "peak_gpu_gib", "rollout_draws": "draws"},
    "annotate": {"signal_fraction": "signal_fraction", "shaped_reward_mean": "shaped_reward_mean"},
    "finetune": {"kl": "last_kl", "train_tokens_per_s": "train_tokens_per_s", "trainer_peak_gpu_gib": "peak_gpu_gib",
                 "sampler_gap_mean": "sampler_gap_mean", "sampler_gap_max": "sampler_gap_max",
                 "sampler_outside_clip": "sampler_outside_clip", "weights_handoff_seconds": "handoff_seconds",
                 "weights_broadcast_seconds": "broadcast_seconds", "policy_lag": "policy_lag",
                 "trainer_idle_seconds": "idle_seconds", "trainer_rows_read_seconds": "rows_read_seconds"},
    "evaluate": {f"{split}_{m}": f"{split}_{m}" for split in ("val", "test")
                 for m in ("accuracy", "boxed_rate", "completion_tokens_mean")},
}
MAIN_METRICS = sorted({m for names in PARENT_METRICS.values() for m in names} | {f"time_{s}" for s in PARENT_METRICS})
TABLE_COLUMNS = ("problem_id", "question", "gold", "completion", "reward", "outcome")


class Chain:
    """The stage bodies of one main run and what they share."""

    def __init__(self, cfg, folder: Path, runner: StageRunner):
        from grpo.group import is_group
        from grpo.trainer_process import TrainerClient
        from grpo.workspace import Workspace

        self.cfg, self.folder, self.runner = cfg, folder, runner
        checkpoint = latest_checkpoint(folder)
        self.checkpoint = str(checkpoint) if checkpoint else ""
        self.trained = checkpoint_info(checkpoint)["iteration"] + 1 if checkpoint else 0  # iterations in the weights
        self.trainer = TrainerClient(cfg.loop.trainer_timeout)
        self.grouped = is_group(cfg.group)  # a torchrun group (whose ranks generate and score, without engines)
        self.engines = None  # engine_ranks: engines of their own, sent the trainer's weights (grpo.engine_ranks)
        if cfg.group.engine_ranks:
            from grpo.engine_ranks import EngineRanks

            self.engines = EngineRanks(cfg)
        generators = ((self.engines.client, self.start_trainer, self.send_weights) if self.engines else
                      (self.trainer, self.start_trainer) if self.grouped else None)
        self.ws = Workspace(cfg, checkpoint=self.checkpoint, group=generators)
        self.saved = self.trained - 1  # the newest iteration whose checkpoint exists or is being written
        self.pending: tuple[int, object] | None = None  # (iteration, replies) of a finetune sent to the trainer
        self.floor: float | None = None  # probe gap between engine and trainer on the same weights
        self.broadcast_seconds = 0.0  # the last broadcast of the weights to the engine ranks
        self.sampled: tuple[int | None, list | None] = None, None  # (iteration, rows) of the last rollout

    def path(self, kind: str, i: int) -> Path:
        return self.folder / kind / f"iter-{i:04d}.jsonl"

    # --- stage bodies: (stage run id) -> metrics ---

    def rollout(self, i: int, run_id: str) -> dict:
        rows, metrics = logged_rollout(self.ws, i, self.path("rollouts", i))
        self.sampled = i, rows  # annotate takes them from here, not from the file it has just been written to
        return metrics

    def sampled_with(self, i: int) -> int:
        """Trained iterations in the weights that sampled iteration i's rollouts (the rows' policy_version)."""
        with self.path("rollouts", i).open(encoding="utf-8") as handle:
            return loads(handle.readline())["policy_version"]

    def annotate(self, i: int, run_id: str) -> dict:
        (sampled, rows), self.sampled = self.sampled, (None, None)
        if sampled != i:  # a resumed run's rollout finished before the restart
            rows = read_jsonl(self.path("rollouts", i))
        return logged_annotate(self.ws, rows, i, self.path("annotated", i))

    def submit(self, i: int) -> None:
        """Send the finetune of iteration i to the trainer; its stage (`finetune`) collects it."""
        self.start_trainer()
        self.pending = i, self.trainer.train(self.path("annotated", i), i, self.cfg.loop.seed, self.planned_steps())

    def finetune(self, i: int, run_id: str) -> dict:
        """Send the finetune of iteration i unless `submit` did, collect it (logging its steps), hand over."""
        if self.pending is None:
            self.submit(i)
        (sent, steps), self.pending = self.pending, None
        assert sent == i, f"finetune of iteration {i} collected while {sent}'s was in flight"
        summary = logged_finetune(steps, i, run_id=run_id)
        summary["policy_lag"] = i - self.sampled_with(i)  # iterations the sampling weights were behind
        self.trained = i + 1
        summary.update(self.hand_over())
        tracking.log_metrics(summary, step=i, run_id=run_id)
        return summary

    def evaluate(self, step: int, run_id: str) -> dict:
        ev = self.cfg.evaluation
        return logged_evaluate(self.ws, step, {"val": ev.val_limit, "test": ev.eval_limit})

    # --- the trainer and the engine ---

    def launch_trainer(self) -> None:
        """Start the trainer process (or group) unless it runs, and go on while it loads: main's first stages
        hide its imports and model load."""
        p, group = self.ws.placement, self.cfg.group
        if self.trainer.alive:
            return
        if group.nodes > 1:
            from grpo.group import join_command

            say(f"grpo main: waiting for the other {group.nodes - 1} machine(s) of the trainer group; on each, "
                f"in this project with the same environment, run: {join_command(group)}")
        self.trainer.launch(self.cfg.policy.model, self.cfg.optim, p.trainer, self.checkpoint,
                            0.0 if self.grouped or self.engines else p.trainer_memory_fraction, self.ws.probe,
                            group, self.cfg.engine.generation_batch_size,
                            **(self.engines.trainer_placement(p) if self.engines else {}))

    def start_trainer(self) -> None:
        """The trainer (and the engine ranks) started if they are not running, and ready; started engines, or
        engines beside a started trainer, get the trainer's weights."""
        started = False
        if self.engines is not None and not self.engines.alive:
            self.launch_trainer()  # it loads while the engines do
            self.engines.start(self.ws.placement, self.ws.probe)
            started = True
        self.launch_trainer()
        if self.trainer.ready() is not None:
            started = True
        if started and self.engines is not None:
            self.engines.send(self.trainer, self.trained, fresh=True)
        if started and self.floor is None:  # engine and trainer hold the same weights: their precision difference
            from grpo.engines.base import probe_gap

            self.floor = probe_gap(self.ws.engine.probe_logprobs(self.ws.probe), self.trainer.probe()[0])

    def send_weights(self, version: int) -> None:
        self.broadcast_seconds = self.engines.send(self.trainer, version)

    def close(self, kill: bool = False) -> None:
        self.trainer.close(kill)
        if self.engines is not None:
            self.engines.close(kill)

    def planned_steps(self) -> int:
        """Optimiser steps of the whole run if every group had signal: the horizon of the cosine schedule."""
        o, s = self.cfg.optim, self.cfg.sampling
        return self.cfg.loop.max_iterations * math.ceil(s.problems * s.attempts /
                                                        (o.train_batch_size * o.gradient_accumulation_passes))

    def hand_over(self) -> dict:
        """The trainer's weights into the engine, in memory; verified on the probe sequence."""
        from grpo.engines import publish

        expected, precision = self.trainer.probe()
        floor = max(self.floor or 0.0, precision)
        report = publish(self.ws.engine, self.trainer.weights, self.trained, self.ws.probe, expected, floor)
        if self.engines is not None:  # of the hand-off: the broadcast alone (the rest is the probe)
            report["broadcast_seconds"] = self.broadcast_seconds
        return report | {"probe_floor": floor}

    def replay(self, done) -> None:
        """Finetune stages that finished after the newest checkpoint: train on their annotated rows again, without
        logging, so the trainer holds the weights the run had reached (they were in memory only)."""
        while done(f"finetune-{self.trained}"):
            i = self.trained
            say(f"grpo main: replaying finetune of iteration {i} (after the newest checkpoint)")
            self.start_trainer()
            drain(self.trainer.train(self.path("annotated", i), i, self.cfg.loop.seed, self.planned_steps()))
            self.trained = i + 1
            self.hand_over()
            if self.checkpoint_due(i):  # the save the killed run had not finished: the next kill replays less
                self.save(i)

    def checkpoint_due(self, i: int) -> bool:
        """Whether the run keeps a checkpoint of iteration i: every checkpoint_every iterations, and the last."""
        loop = self.cfg.loop
        return (i + 1) % loop.checkpoint_every == 0 or i + 1 == loop.max_iterations

    def export_policy(self, folder: Path) -> None:
        """The policy the engine serves now, as a bf16 Hugging Face folder (for a logged model)."""
        self.start_trainer()
        self.trainer.export(folder)

    def save(self, i: int) -> None:
        """Full state of iteration i in the background (the trainer prunes older checkpoints once it is complete);
        rows only replay needs are dropped once the previous checkpoint is complete."""
        self.trainer.save(checkpoint_path(self.folder, i))
        self.saved = i
        done = latest_checkpoint(self.folder)
        if done is not None:
            for kind in ("rollouts", "annotated"):
                for old in (self.folder / kind).glob("iter-*.jsonl"):
                    if int(old.stem.split("-")[1]) <= checkpoint_info(done)["iteration"]:
                        old.unlink(missing_ok=True)


# --- stage bodies with their logging, shared by the chain and the stand-alone entry points ---

def logged_rollout(ws, i: int, out: Path) -> tuple[list[dict], dict]:
    cfg = ws.cfg
    rows, metrics = stages.rollout(ws.engine, ws.builder, ws.splits.pool, cfg.sampling, cfg.engine.max_new_tokens,
                                   i, cfg.loop.seed, cfg.policy.model)
    metrics.update(_peak_gpu())
    write_jsonl(rows, out)
    tracking.log_metrics(metrics, step=i)
    tracking.log_file(out, "rollouts")
    tracking.log_traces(rows, "rollout", cfg.evaluation.trace_samples, step=i)
    return rows, metrics


def logged_annotate(ws, rows: list[dict], i: int, out: Path) -> dict:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    reference = ws.reference if ws.cfg.optim.kl_coef else None  # no KL term: no reference model to load or run
    with tqdm(total=len(rows), desc="annotate (reference logprobs)", unit="seq", leave=False,
              disable=None if reference is not None else True) as bar:
        rows, metrics = stages.annotate(rows, reference, ws.cfg.scoring, progress=bar.update)
    metrics["seconds"] = time.perf_counter() - started
    write_jsonl(rows, out)
    tracking.log_metrics(metrics, step=i)
    tracking.log_file(out, "annotated")
    return metrics


def logged_evaluate(ws, step: int, limits: dict[str, int]) -> dict:
    """Greedy evaluation of the splits in `limits` ('val', 'test'; limit 0 = all of test, none of val), in one
    batch for the engine."""
    chosen = {split: (ws.splits.validation if split == "val" else ws.splits.test)[:limit or None]
              for split, limit in limits.items() if limit or split == "test"}
    results = stages.evaluate_splits(ws.engine, ws.builder, chosen, ws.cfg.engine.max_new_tokens)
    metrics = {}
    for split, (rows, m) in results.items():
        metrics |= m
        tracking.log_table(rows, f"eval/{split}_step_{step:04d}.json", TABLE_COLUMNS)
        if split == "test" or len(results) == 1:
            tracking.log_traces(rows, "evaluate", ws.cfg.evaluation.trace_samples, step=step)
    tracking.log_metrics(metrics, step=step)
    return metrics


def logged_finetune(steps, i: int, total: int | None = None, run_id: str | None = None) -> dict:
    """Drain a trainer's step generator under a progress bar, logging each optimiser step's metrics (step = the
    run's optimiser step, prefixed step_); the stage's summary."""
    from tqdm.auto import tqdm

    def each(event: dict) -> None:
        tracking.log_metrics(event["metrics"], step=event["step"], prefix="step_", run_id=run_id)
        bar.update(1)

    with tqdm(total=total, desc=f"finetune (iteration {i})", unit="step", leave=False, disable=None) as bar:
        return drain(steps, each)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _peak_gpu() -> dict:
    import torch

    return {"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_initialized() else {}


def run_main(cfg, folder: Path | None = None, changes: dict | None = None, on_logged=None) -> dict:
    """The chain under the active MLflow run (a fresh one, or the run `resume.prepare` found). on_logged(step,
    metrics) sees the main-run metrics as they are logged (the sweep reports its objective from it)."""
    import mlflow

    from grpo.workspace import planned_card_gib

    run = mlflow.active_run()
    folder = folder or Path(cfg.loop.work_dir).resolve() / run.info.run_id
    folder.mkdir(parents=True, exist_ok=True)
    with RunLock(folder):
        state = RunState(folder)
        if "params" not in state.data:
            state.set("params", cfg.as_params("main"))
        for name, (was, now) in (changes or {}).items():
            mlflow.set_tag(f"grpo.resumed.{name}", f"{was} -> {now}")
        mlflow.set_tag("grpo.work_dir", str(folder))
        mlflow.set_tag("grpo.cpu_threads", _torch_threads())  # sweep workers share the cores
        card_gib = planned_card_gib()
        if card_gib:  # memory caps planned for a smaller card than this one
            mlflow.set_tag("grpo.gpu_memory_gib", f"{card_gib:g}")
        remove_partials(folder)
        chain = Chain(cfg, folder, None)
        if not state.data["done"]:
            tracking.log_datasets(chain.ws.splits, cfg.evaluation)
        progress = _Progress(cfg, chain, on_logged)
        chain.runner = StageRunner(run.info.run_id, run.info.experiment_id, state, progress.logged)
        try:
            result = _loop(cfg, chain, state)
        except BaseException:
            chain.close(kill=True)
            raise
        finally:
            tracking.flush_traces()
        chain.close()
        _finish(chain, state)
    return result


def _loop(cfg, chain: Chain, state: RunState) -> dict:
    from grpo.plots import log_learning_curve

    run, loop, started = chain.runner.run, cfg.loop, time.monotonic()
    parent, every = chain.runner.parent, cfg.evaluation.test_every_n_iterations
    due = lambda i: i == 0 or i == loop.max_iterations or (every and i % every == 0)  # noqa: E731
    from grpo.registry import PolicyKeeper

    keeper = PolicyKeeper(cfg.tracking.log_models, "val_accuracy" if cfg.evaluation.val_limit else "test_accuracy",
                          chain.export_policy, chain.folder, state)

    def evaluate(i: int) -> dict:
        fresh = not state.done(f"evaluate-{i}")
        metrics = run(Stage(f"evaluate-{i}", i, lambda r: chain.evaluate(i, r), PARENT_METRICS["evaluate"]))
        if fresh:  # the weights evaluated are the ones in memory now
            keeper.evaluated(i, {k: v for k, v in metrics.items() if k in PARENT_METRICS["evaluate"]})
        return metrics

    chain.ws.check_prompt_fits()
    from grpo.workspace import check_placement

    check_placement(cfg)  # again: the sweep calls run_main without main's entry point
    if chain.trained < loop.max_iterations:  # the trainer loads while main evaluates and samples
        chain.ws.engine  # built first: vLLM sizes its KV cache from the GPU memory free as it starts
        chain.launch_trainer()
    chain.replay(state.done)
    evaluations = [evaluate(0)]
    i = chain.trained
    if i and due(i):  # a resumed run killed before the evaluation after its last trained iteration
        evaluations.append(evaluate(i))

    def collect(j: int) -> None:  # finetune j (sent now, or before by submit), its checkpoint and evaluation if due
        run(Stage(f"finetune-{j}", j, lambda r: chain.finetune(j, r), PARENT_METRICS["finetune"],
                  cfg.as_params("finetune") | {"annotated": str(chain.path("annotated", j))}))
        if chain.checkpoint_due(j):
            chain.save(j)
        if due(j + 1):
            evaluations.append(evaluate(j + 1))
            log_learning_curve(parent)

    # max_lag 1: rollout and annotate of i run while the trainer learns from i-1 (sent before them), so the
    # order is rollout-i, annotate-i, finetune-(i-1) [collect], evaluate-i, send finetune-i. Evaluating before the
    # send keeps the trainer idle, holding the evaluated weights, for the policy keeper's export. A resumed run
    # finds rollout-T done whenever finetune-(T-1) is, and so samples with the weights an unbroken run would have.
    # The loop starts at the first iteration not trained (replay trained the rest): each finetune it sends is new
    while i < loop.max_iterations:
        if loop.max_seconds and time.monotonic() - started > loop.max_seconds and not state.done(f"rollout-{i}"):
            import mlflow

            mlflow.set_tag("grpo.stopped", f"max_seconds={loop.max_seconds:g} reached after {i} iterations")
            break
        run(Stage(f"rollout-{i}", i, lambda r: chain.rollout(i, r), PARENT_METRICS["rollout"],
                  cfg.as_params("rollout") | {"iteration": str(i)}))
        run(Stage(f"annotate-{i}", i, lambda r: chain.annotate(i, r), PARENT_METRICS["annotate"],
                  cfg.as_params("annotate") | {"rollouts": str(chain.path("rollouts", i))}))
        if chain.pending is not None:  # max_lag 1: iteration i-1's, sent before this rollout
            chain.trainer.read_ahead(chain.path("annotated", i))  # its rows, read while i-1 still trains
            collect(chain.pending[0])
        if loop.max_lag:
            chain.submit(i)
        else:
            collect(i)
        i += 1
    if chain.pending is not None:
        collect(chain.pending[0])
    if chain.trained and not state.done(f"evaluate-{chain.trained}"):  # stopped early: score what it reached
        evaluations.append(evaluate(chain.trained))
    if chain.trained and chain.saved != chain.trained - 1:
        chain.save(chain.trained - 1)  # stopped between checkpoints, or replayed past the newest one
    log_learning_curve(parent)
    last = evaluations[-1]
    kept = keeper.finish(chain.trained, {k: v for k, v in last.items() if k in PARENT_METRICS["evaluate"]})
    if kept:
        import mlflow

        mlflow.set_tag("grpo.model_id", kept)
        if cfg.tracking.register_as:
            from grpo.registry import register

            version = register(kept, cfg.tracking.register_as)
            say(f"registered as models:/{cfg.tracking.register_as}@best (version {version})")
    return {k: last[k] for k in ("val_accuracy", "test_accuracy", "test_boxed_rate") if k in last}


def _finish(chain: Chain, state: RunState) -> None:
    """A finished run needs no resume state: the policy it keeps is a logged model in MLflow, and the folder
    keeps state.json only; with log_models=none the final checkpoint stays in the folder instead."""
    state.set("finished", True)
    kinds = ("rollouts", "annotated") if chain.cfg.tracking.log_models == "none" else ("checkpoints", "rollouts",
                                                                                         "annotated")
    for kind in kinds:
        shutil.rmtree(chain.folder / kind, ignore_errors=True)


class _Progress:
    """One line per iteration on the terminal: stage times and the key numbers."""

    def __init__(self, cfg, chain: Chain, on_logged):
        self.cfg, self.chain, self.on_logged, self.seen = cfg, chain, on_logged, {}

    def logged(self, step: int, metrics: dict) -> None:
        self.seen.setdefault(step, {}).update(metrics)
        if self.on_logged:
            self.on_logged(step, metrics)
        m = self.seen[step]
        if "time_finetune" in m and not m.get("_printed"):
            m["_printed"] = True
            line = (f"iteration {step + 1}/{self.cfg.loop.max_iterations}: rollout {m['time_rollout']:.1f}s "
                    f"(reward {m.get('train_reward_mean', 0):+.2f}, boxed {m.get('train_boxed_rate', 0):.0%}), "
                    f"annotate {m['time_annotate']:.1f}s (signal {m.get('signal_fraction', 0):.0%}), "
                    f"finetune {m['time_finetune']:.1f}s (kl {m.get('kl', 0):.4f})")
            say(line)
        if "time_evaluate" in metrics:
            parts = [f"{k.split('_')[0]} accuracy {metrics[k]:.1%}" for k in ("val_accuracy", "test_accuracy")
                     if k in metrics]
            say(f"evaluation after {step} iterations: " + ", ".join(parts) +
                 f" (test boxed {metrics.get('test_boxed_rate', 0):.0%}, {metrics['time_evaluate']:.1f}s)")
