"""The finetune stage's own process, started once per main run and kept for all its iterations: the policy and
its AdamW state stay in memory, so an iteration pays neither process start nor model and optimiser loads.
Every stage still ends with a complete checkpoint on disk, which the sampler serves and resume starts from.

Protocol: one JSON request per line on the worker's stdin ({"config": ..., "run_id": ...}), one JSON reply
per line on its original stdout; everything the libraries print goes to stderr."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class TrainerProcessError(RuntimeError):
    """The trainer process refused a request or died; the message is one line."""


class TrainerProcess:
    """Parent side: `train(cfg, run_id)` runs one finetune stage (cfg.annotated -> cfg.output) in the worker,
    logging into the MLflow run `run_id`, and returns its summary metrics."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        import mlflow

        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "GRPO_PARENT_PID": str(os.getpid()),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        env.pop("MLFLOW_RUN_ID", None)  # the worker opens each stage's run by id
        return subprocess.Popen([sys.executable, "-m", "grpo.trainer_process"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)

    def train(self, cfg, run_id: str) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = self._start()
        request = {"config": dataclasses.asdict(cfg), "run_id": run_id}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.process.wait()
            raise TrainerProcessError(f"finetune of iteration {cfg.iteration}: the trainer process died "
                                      f"(exit code {code}); its traceback is above")
        reply = json.loads(line)
        if "error" in reply:
            raise TrainerProcessError(f"finetune of iteration {cfg.iteration} failed: {reply['error']}")
        return reply["summary"]

    def close(self, kill: bool = False) -> None:
        """End the worker: politely after the last request, at once when the run is failing (its partial
        checkpoint is a temp folder that resume deletes)."""
        if self.process and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.stdin.close()  # end of requests: the worker exits
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


def _die_with_parent() -> None:
    """A SIGKILLed main run must not leave a trainer writing checkpoints that the resumed run also writes."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if str(os.getppid()) != os.environ.get("GRPO_PARENT_PID", str(os.getppid())):
        sys.exit("trainer: parent already gone")


def serve() -> None:
    """Worker side: answer requests until stdin closes. A fixable error (NaN, bad data) is replied and the
    in-memory state dropped, so the next request reloads the last complete checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is main's to handle: it stops this process itself
    import mlflow

    from grpo.config import Config
    from grpo.data import DataError
    from grpo.finetune import NumericsError, Trainer, train_logged
    from grpo.model import ModelError, pick_device
    from grpo.stages import read_jsonl
    from grpo.tracking import log_params

    _die_with_parent()
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # prints from libraries must not corrupt the replies
    trainer = None
    for line in sys.stdin:
        request = json.loads(line)
        cfg = Config(**request["config"])
        try:
            with mlflow.start_run(run_id=request["run_id"]):
                log_params(cfg.as_params("finetune"))
                mlflow.set_tag("grpo.trainer_pid", str(os.getpid()))  # one process serves every iteration
                if trainer is None or trainer.checkpoint != cfg.checkpoint:
                    trainer = Trainer(cfg, cfg.checkpoint, pick_device(cfg.device))
                summary = train_logged(trainer, cfg, read_jsonl(Path(cfg.annotated)), Path(cfg.output))
            reply = {"summary": summary}
        except (NumericsError, DataError, ModelError) as e:
            trainer = None
            reply = {"error": str(e)}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    serve()
