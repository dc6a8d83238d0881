"""The trainer in its own process, started once per main run and kept for all its iterations: the policy and
its AdamW state stay in memory, so an iteration pays neither process start nor model and optimiser loads.

Protocol: one JSON request per line on the worker's stdin, JSON replies on its original stdout (everything the
libraries print goes to stderr). A `train` request streams one line per optimiser step before its summary, so
main shows progress and knows the trainer is alive: no line for `timeout` seconds and main stops it.
Weights leave the worker in memory: CUDA IPC handles of one flat buffer on a GPU, a file in /dev/shm (RAM)
on a CPU. The worker never touches MLflow: main logs what it reports."""
from __future__ import annotations

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from grpo.artifacts import dumps, loads
from grpo.errors import GrpoError, TrainerError
from grpo.handoff import Exporter, receive

ROOT = Path(__file__).resolve().parent.parent


class TrainerClient:
    """Parent side. `train` yields the worker's step lines and returns its summary; `weights` yields (name,
    tensor) of the trained policy; `save` asks for a background checkpoint."""

    def __init__(self, timeout: float):
        self.timeout, self.process, self.lines = timeout, None, None
        self.who = "the trainer process"  # or the engine ranks (role="engine"), in what main says of it
        self.cuda_buffer = None  # (handle, tensor) of the worker's shared weights buffer
        self.loading = ""  # what the worker is doing while main has not yet read its ready reply

    def start(self, *args, **kwargs) -> dict:
        """`launch`, then wait until the worker is ready; its ready reply."""
        self.launch(*args, **kwargs)
        return self.ready()

    def ready(self) -> dict | None:
        """Wait for a launched worker's ready reply (None when it was read before)."""
        what, self.loading = self.loading, ""
        return self._read(what, timeout=max(self.timeout, 300)) if what else None  # imports and a model load

    def launch(self, model: str, optim, device: str, checkpoint: str, memory_fraction: float = 0.0,
               probe=None, group=None, batch_size: int = 64, role: str = "trainer", gpus: str | None = None,
               sharing: int = 0) -> None:
        """Start one trainer process, or with group.ranks != 1 or group.nodes > 1 a trainer group under torchrun
        (grpo.group) whose ranks also generate (batch_size sequences at once) and score for the reference, and
        return while it loads (`ready` waits for it). role="engine": engine ranks instead (grpo.engine_ranks;
        group.ranks of them), which never train. gpus: the CUDA_VISIBLE_DEVICES they get; sharing: processes
        started beside them that share the CPU cores."""
        from grpo import group as groups

        self.close(kill=True)
        self.who = "the trainer process" if role == "trainer" else "the engine ranks"
        env = {**os.environ, "GRPO_PARENT_PID": str(os.getpid()), "GRPO_GROUP_DEVICE": device,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        if device == "cuda":
            from grpo.checkpointing import host_allocator_conf

            env["PYTORCH_CUDA_ALLOC_CONF"] = host_allocator_conf(os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
        cmd = [sys.executable, "-m", "grpo.trainer_process"]
        grouped = group is not None and groups.is_group(group)
        if grouped:  # torchrun, started by a process that dies with main
            cmd += ["--exec", *groups.launch_command(group)]
        if grouped or sharing:
            share_cores(env, (groups.local_ranks(group) if grouped else 1) + sharing)
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, encoding="utf-8", env=env)
        self.lines = queue.Queue()
        threading.Thread(target=_pump, args=(self.process.stdout, self.lines), daemon=True).start()
        shard = grouped and group.shard
        self._send({"op": "init", "role": role, "model": model, "optim": dataclasses.asdict(optim), "device": device,
                    "checkpoint": checkpoint, "shard": shard, "memory_fraction": memory_fraction,
                    "batch_size": batch_size,
                    "probe": dataclasses.asdict(probe) if probe else None}, "loading the policy")
        self.loading = "loading the policy" if role == "trainer" else "loading the engines"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _send(self, request: dict, what: str) -> None:
        try:
            self.process.stdin.write(dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died(what)

    def _read(self, what: str, timeout: float | None = None) -> dict:
        timeout = timeout or self.timeout
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close(kill=True)
            raise TrainerError(f"{what}: no word from {self.who} for {timeout:g} s, so main stopped "
                               "it (raise trainer_timeout if that is normal here); the run can be resumed") \
                from None
        if line is None:
            self._died(what)
        reply = loads(line)
        if "error" in reply:
            raise TrainerError(f"{what} failed: {reply['error']}")
        return reply

    def _died(self, what: str):
        code = self.process.wait()
        self.process = None
        if code == -signal.SIGINT:  # Ctrl-C reached it before it could ignore it (while starting): the user's stop
            raise KeyboardInterrupt
        raise TrainerError(f"{what}: {self.who} died (exit code {code}); the traceback is above")

    def ask(self, request: dict, what: str) -> dict:
        self._send(request, what)
        return self._read(what)

    def post(self, request: dict, what: str):
        """Send a request now; returns the function that reads its reply (two workers' requests at once)."""
        self._send(request, what)
        return lambda: self._read(what)

    def train(self, annotated: Path, iteration: int, seed: int, total_steps: int):
        """Sends the request now (the worker starts training while main goes on: max_lag) and returns a generator
        of its replies: {"step", "metrics"} per optimiser step, the summary as its return value."""
        what = f"finetune of iteration {iteration}"
        self._send({"op": "train", "annotated": str(annotated), "iteration": iteration, "seed": seed,
                    "total_steps": total_steps}, what)
        return self._train_replies(what)

    def read_ahead(self, annotated: Path) -> None:
        """Let the worker read the rows of a finetune that main will send after the one running now (no reply)."""
        self._send({"op": "read_ahead", "annotated": str(annotated)}, "reading rows ahead")

    def _train_replies(self, what: str):
        while True:
            reply = self._read(what)
            if "summary" in reply:
                return reply["summary"]
            yield reply

    def probe(self) -> tuple[list[float], float]:
        """The trainer's logprobs of the probe sequence under its current weights as the engine serves them, and
        how far those stand from the float32 ones (the policy's sensitivity to the serving precision, which grows
        as training sharpens it)."""
        reply = self.ask({"op": "probe"}, "scoring the probe")
        return reply["probe"], reply["precision"]

    def weights(self):
        """Iterator of (name, tensor) of the worker's current policy, in memory; the worker exports them when the
        iterator is first read (an engine that serves the trainer's own weights never reads it)."""
        yield from receive(self.ask({"op": "weights"}, "handing the new weights over")["weights"], self)

    def export(self, folder: Path) -> None:
        """The current policy written as a bf16 Hugging Face folder (for a logged model)."""
        self.ask({"op": "export", "path": str(folder)}, "exporting the policy")

    def save(self, path: Path) -> None:
        self.ask({"op": "save", "path": str(path)}, "checkpoint")

    def wait_saved(self) -> None:
        self.ask({"op": "wait_saved"}, "finishing the last checkpoint")

    def close(self, kill: bool = False) -> None:
        """End the worker: politely (it finishes a checkpoint being written), at once when the run is failing
        (a partial checkpoint is a temp folder that resume deletes)."""
        if self.alive:
            if kill:
                self.process.kill()
            else:
                self.process.stdin.close()
            try:
                self.process.wait(timeout=None if not kill else 60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
        self.cuda_buffer = None
        self.loading = ""


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # end of stream: the worker exited


def share_cores(env: dict, processes: int) -> None:
    """Give each of `processes` started at once its share of the CPU cores (OMP_NUM_THREADS, unless the user set
    it): with a thread per core each, they would oversubscribe the machine."""
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))


def die_with_parent() -> None:
    """A process main starts dies when main dies (Linux parent-death signal, kept across exec): a SIGKILLed main
    run must not leave a trainer writing checkpoints that the resumed run also writes. A rank of a trainer group
    dies with its torchrun agent, which dies with main. Set in the child itself, not by Popen's preexec_fn, whose
    fork hooks can swallow a Ctrl-C that lands while main starts it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if "TORCHELASTIC_RUN_ID" in os.environ:
        if os.getppid() == 1:
            sys.exit("trainer rank: torchrun agent already gone")
    elif str(os.getppid()) != os.environ.get("GRPO_PARENT_PID", str(os.getppid())):
        sys.exit("grpo: parent process already gone")


def _requests(rank: int, size: int, reply):
    """Requests in order, on every rank: rank 0 reads main's lines (a train request with its rows, read once)
    and passes each on to the group; a bad rows file is answered at once and never reaches the others. Rank 0
    reads its lines in a thread of its own, so a `read_ahead` of the next finetune's rows (main sends it while the
    trainer still learns from the iteration before, max_lag 1) is read while the trainer is busy."""
    from grpo import group

    if rank != 0:
        while (request := group.broadcast()) is not None:
            yield request
        return
    requests, ahead = queue.Queue(), {}  # ahead: rows file -> (its version, its rows or the error reading them)

    def read() -> None:
        try:
            sys.stdin.reconfigure(encoding="utf-8")  # messages are UTF-8 whatever the locale (orjson: no escapes)
            for line in sys.stdin:
                request = loads(line)
                if request["op"] == "read_ahead":
                    ahead[request["annotated"]] = _version(request["annotated"]), _rows(request["annotated"])
                    continue
                if request["op"] == "train":
                    request["read_at"] = time.monotonic()  # the trainer's idle time ends here (rows are work)
                requests.put(request)
            requests.put(None)
        except BaseException as e:  # the serving loop raises it, as it would have reading the line itself
            requests.put(e)

    threading.Thread(target=read, name="requests", daemon=True).start()
    while (request := requests.get()) is not None:
        if isinstance(request, BaseException):
            raise request
        if request["op"] == "train":
            version, rows = ahead.pop(request["annotated"], (None, None))
            request["read_seconds"] = 0.0  # what the finetune waited for its rows
            if rows is None or version != _version(request["annotated"]):  # not read ahead, or written since
                started = time.perf_counter()
                rows = _rows(request["annotated"])
                request["read_seconds"] = time.perf_counter() - started
            if isinstance(rows, GrpoError):
                reply({"error": str(rows)})
                continue
            request["rows"] = rows
        if size > 1:
            group.broadcast(request)
        yield request
    if size > 1:
        group.broadcast(None)


def _version(path: str) -> tuple | None:
    """What tells a rows file written again since it was read ahead (None: it is not there)."""
    try:
        stat = os.stat(path)
        return stat.st_mtime_ns, stat.st_size, stat.st_ino
    except OSError:
        return None


def _rows(annotated: str):
    """The rows of an annotated file, or the GrpoError that says why they cannot be read."""
    from grpo.artifacts import read_jsonl

    try:
        return read_jsonl(Path(annotated))
    except GrpoError as e:
        return e


def serve() -> None:
    """Worker side: answer requests until stdin closes. A fixable error (NaN, bad data) is replied; the next
    `init` starts from the last complete checkpoint. In a trainer group every rank runs this loop on the same
    requests; rank 0 alone answers, exports and writes checkpoints (the ranks' weights are the same). Sharded
    (FSDP2), every rank takes part in those too: each holds only a shard of the weights, and a forward, an export
    or a checkpoint gathers them from all."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is main's to handle: it stops this process itself
    die_with_parent()
    from grpo import group
    from grpo.console import quiet

    quiet(tracking=False)
    rank, size = group.setup()
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8") if rank == 0 else None
    os.dup2(2, 1)  # prints from libraries must not corrupt the replies
    trainer, exporter, probe, work, sender = None, None, None, None, None
    trained_at = None  # when this process last finished a finetune
    reply = (lambda payload: replies.write(dumps(payload) + "\n")) if rank == 0 else (lambda payload: None)
    for request in _requests(rank, size, reply):
        try:
            op = request["op"]
            lead = rank == 0 or (trainer is not None and trainer.sharded)  # ranks that do rank 0's ops
            if op == "init" and request.get("role") == "engine":
                from grpo.engine_ranks import EngineWork

                probe, work = _probe(request), EngineWork(request["model"], request["device"], request["batch_size"])
                reply({"ready": {"ranks": size, "role": "engine"}})
            elif op == "init":
                trainer, exporter, probe = _init(request)
                work = group.RankWork(trainer, request["batch_size"]) if size > 1 else None
                reply({"ready": {"global_step": trainer.step, "iteration": trainer.iteration, "ranks": size,
                                  "sharded": trainer.sharded}})
            elif op == "receive_weights":  # an engine rank's
                reply({"received": work.receive(request)})
            elif op == "send_weights" and lead:
                from grpo.engine_ranks import Sender

                sender = sender or Sender()
                reply({"sent": sender.send(trainer, request["channel"])})
            elif op == "train":
                if os.environ.get("GRPO_FAILPOINT") == "trainer-hang":  # tests: a trainer that stops answering
                    threading.Event().wait()
                from grpo.trainer import drain

                summary = drain(trainer.train(request["rows"], request["iteration"], request["seed"],
                                              request["total_steps"]), reply)
                if trained_at is not None:  # not training since the last one
                    summary["idle_seconds"] = request["read_at"] - trained_at
                summary["rows_read_seconds"] = request["read_seconds"]
                reply({"summary": summary})
                trained_at = time.monotonic()
            elif op == "generate":
                reply(work.generate(request))
            elif op == "score":
                reply(work.score(request))
            elif op == "engine_probe" and lead:
                reply({"probe": work.probe(probe)})
            elif op == "probe" and lead:
                served, precision = trainer.probe_with_precision(probe)
                reply({"probe": served, "precision": precision})
            elif op == "weights" and rank == 0:
                reply({"weights": exporter.export(trainer)})
            elif op == "export" and lead:
                trainer.export(Path(request["path"]))
                reply({"exported": request["path"]})
            elif op == "save" and lead:
                trainer.save(Path(request["path"]))
                reply({"saving": request["path"]})
            elif op == "wait_saved" and lead:
                trainer.wait_saved()
                reply({"saved": True})
        except GrpoError as e:
            reply({"error": str(e)})
    if trainer is not None and rank == 0:
        trainer.wait_saved()
    if exporter is not None:
        exporter.close()


def _init(request: dict):
    import torch

    from grpo.config import Optim
    from grpo.trainer import Trainer

    device = request["device"]
    if device.startswith("cuda:"):  # a GPU of its own: "cuda" below means it, and the IPC buffer lives there
        torch.cuda.set_device(int(device.split(":")[1]))
        device = "cuda"
    if device == "cuda" and request["memory_fraction"]:
        torch.cuda.set_per_process_memory_fraction(request["memory_fraction"])
    trainer = Trainer(request["model"], Optim(**request["optim"]), device, request["checkpoint"],
                      request.get("shard", False))
    return trainer, Exporter(device), _probe(request)


def _probe(request: dict):
    from grpo.engines.base import Probe

    return Probe(**request["probe"]) if request["probe"] else None


if __name__ == "__main__":
    if sys.argv[1:2] == ["--exec"]:  # the trainer group's torchrun agent, dying with main
        die_with_parent()
        os.execv(sys.argv[2], sys.argv[2:])
    serve()
